"""Writing a safetensors file one tensor at a time, so a cast shard never has to sit in memory whole."""
import json
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch

from .errors import MoHError

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}


def read_safetensors_header(path: Path, fix: str = "re-run `moh convert`") -> tuple[int, dict]:
    """(offset of the tensor data, tensors: name -> {dtype, shape, data_offsets}) of a safetensors file, read without
    loading tensors ("__metadata__" left out). An empty, truncated or damaged file is a MoHError naming it and
    ending in `fix` (a MoH folder is converted again, a source checkpoint re-downloaded)."""
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise MoHError(f"weights file {path.name} is empty or truncated; {fix}")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > file_size - 8:
            raise MoHError(f"weights file {path.name} is truncated or not a safetensors file; {fix}")
        try:
            header = json.loads(handle.read(header_size))
        except ValueError:
            raise MoHError(f"weights file {path.name} has a damaged header; {fix}") from None
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    data_size = max((info["data_offsets"][1] for info in tensors.values()), default=0)
    if 8 + header_size + data_size > file_size:
        raise MoHError(
            f"weights file {path.name} is truncated: its header needs {8 + header_size + data_size:,} bytes, "
            f"the file has {file_size:,}; {fix}"
        )
    return 8 + header_size, tensors


def read_safetensors_tensor(path: Path, data_start: int, entry: dict) -> torch.Tensor:
    """One tensor read with plain file reads. Unlike safetensors' memory map, pages read this way do not stay in the
    process's resident memory, so reading a whole model one tensor at a time keeps RSS at about one tensor."""
    begin, end = entry["data_offsets"]
    dtype = TORCH_DTYPES[entry["dtype"]]
    # Read straight into the tensor's own memory: no intermediate bytes object, so the transient is the tensor only.
    tensor = torch.empty(end - begin, dtype=torch.uint8)
    with open(path, "rb") as handle:
        handle.seek(data_start + begin)
        if handle.readinto(memoryview(tensor.numpy())) != end - begin:
            raise OSError(f"{path}: file ends inside tensor data (truncated download?)")
    return tensor.view(dtype).reshape(entry["shape"])


def write_safetensors_streaming(
    path: Path,
    tensor_specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
    load_tensor: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `path` from (name, dtype, shape) specs; `load_tensor(name)` is called once per tensor, in order, and
    must return a tensor of that dtype and shape. Peak memory is about the largest single tensor."""
    specs = list(tensor_specs)
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape in specs:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # tensor data starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header_bytes)))
        handle.write(header_bytes)
        for name, dtype, shape in specs:
            tensor = load_tensor(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: expected {dtype} {tuple(shape)}, got {tensor.dtype} {tuple(tensor.shape)}")
            handle.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
