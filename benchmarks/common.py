"""What the benchmark scripts share: memory sampling, the machine description and the BENCHMARKS.md section writer.

Standard library only: convert_speed.py's parent process must not import torch (it would skew its children's
measurements)."""
import os
import platform
import threading
import time
from importlib import metadata
from pathlib import Path


def anonymous_rss_bytes() -> int:
    """Resident memory that is the process's own (RssAnon), as opposed to mapped file pages the kernel can drop."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakAnonymousRss:
    """Samples RssAnon every 5 ms in a thread while the block runs: `peak`, and `extra`, the peak above the value at
    entry (what the block allocated). ru_maxrss also counts mmapped file pages (safetensors loads shards by mmap), so
    this tells real allocations apart from the page cache mapped in."""

    def __enter__(self):
        self.start = self.peak = anonymous_rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, anonymous_rss_bytes())

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anonymous_rss_bytes())
        self.extra = self.peak - self.start


class Clock:
    """Wall time and this process's CPU time (all threads) of a block. On a machine shared with other jobs the CPU
    time is the steadier measure of the work done: it does not count the time other processes held the cores."""

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc_info):
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu


def rotated(names: list[str], round_index: int) -> list[str]:
    """The models' order in a round: rotated by one every round, so that no model always runs first or last."""
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def time_prefill_round(models: dict, order: list[str], inputs: dict, seconds: dict) -> None:
    """One round of prefills: every input through every model in `order` (one forward, `logits_to_keep=1`, no
    cache), appending (wall, cpu) seconds to seconds[name][measure]. (The caller holds torch.no_grad().)"""
    for measure, input_ids in inputs.items():
        for name in order:
            with Clock() as clock:
                models[name](input_ids=input_ids, logits_to_keep=1, use_cache=False)
            seconds[name][measure].append((clock.wall, clock.cpu))


def decode_turn(model, state: tuple, tokens: int, cache_name: str) -> tuple[Clock, tuple]:
    """`tokens` greedy decoding steps with the KV cache from `state` = (cache, last token ids); returns the Clock
    of the turn divided per token, and the new state. (The caller holds torch.no_grad(): this module imports no
    torch.)"""
    cache, token = state
    with Clock() as clock:
        for _ in range(tokens):
            output = model(input_ids=token, use_cache=True, **{cache_name: cache})
            cache, token = getattr(output, cache_name), output.logits[:, -1:].argmax(-1)
    clock.wall, clock.cpu = clock.wall / tokens, clock.cpu / tokens
    return clock, (cache, token)


def machine_description() -> str:
    """CPU, cores, memory, library versions and the load average now (a busy machine inflates wall times)."""
    cpu_model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor() or "unknown CPU",
    )
    mem_total_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:")
    )
    versions = []
    for name in ("torch", "transformers", "safetensors"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return (f"nproc {os.cpu_count()}, {mem_total_kb * 1024 / 2**30:.1f} GiB RAM, CPU \"{cpu_model}\", no GPU; "
            f"Python {platform.python_version()}, {', '.join(versions)}; load average at the start "
            f"{os.getloadavg()[0]:.1f}")


def write_markdown_section(path: Path, markers: tuple[str, str], body: str) -> None:
    """Put `body` between the two marker comments in `path` (replacing what was there, or appended at the end);
    everything else in the file is kept."""
    start_marker, end_marker = markers
    section = "\n".join([start_marker, body, end_marker])
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    start, end = text.find(start_marker), text.find(end_marker)
    if start != -1 and end > start:
        text = text[:start] + section + text[end + len(end_marker):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
