"""glibc malloc tuning, so that calibrating one layer after another does not keep every layer's freed memory.
Without glibc (macOS, Windows, musl) these do nothing."""
import ctypes

M_MMAP_THRESHOLD = -3  # mallopt parameter


def _glibc():
    """The C library when it is glibc (malloc tuning below), else None (macOS, Windows, musl: nothing to tune)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def return_large_blocks_to_the_os() -> None:
    """Serve every allocation of 1 MB or more from its own memory map (glibc's M_MMAP_THRESHOLD), which goes back
    to the OS when the tensor is freed. By default glibc raises that threshold to the largest block freed so far
    (up to 32 MB), after which a layer's activations come from the heap and its freed space stays with the process
    (see the 1.1B memory figure in BENCHMARKS.md). Process-wide; allocations under 1 MB are unaffected."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


def release_freed_memory() -> None:
    """Give memory freed by the last layer back to the OS. glibc keeps freed blocks below its (adaptive) mmap
    threshold in the heap, and a layer's tensors of varying sizes then make the heap grow layer after layer."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
