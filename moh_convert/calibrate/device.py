"""Where and in which dtype calibration computes (`--calibration-device`, `--calibration-dtype`): the device string
checked up front (before any data is loaded or text generated), modules placed on it one at a time, and the
report's description of it. The fits (moh_convert.calibrate.fits) always accumulate in float32 or float64,
whatever dtype the layers run in."""
import torch

from ..errors import MoHError

CALIBRATION_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEVICE_OPTION = "--calibration-device"
DEVICE_CHOICES = "'auto', 'cpu', 'cuda' or 'cuda:N' (e.g. cuda:1)"


def resolve_calibration_device(name: str) -> torch.device:
    """'auto' -> CUDA (the current device) when PyTorch sees one, else the CPU; 'cpu', 'cuda', 'cuda:N' as given,
    once checked. Anything else, or CUDA where PyTorch sees none, is a MoHError naming the problem and the fix."""
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise MoHError(f"{DEVICE_OPTION} {name or repr(name)}: not a device calibration can use; use {DEVICE_CHOICES}")
    if device.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        fix = "install a CUDA build of PyTorch" if torch.version.cuda is None else \
            "check the NVIDIA driver and CUDA_VISIBLE_DEVICES"
        raise MoHError(f"{DEVICE_OPTION} {name}: no CUDA device is visible to PyTorch (torch {torch.__version__}); "
                       f"use {DEVICE_OPTION} cpu or {fix}")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise MoHError(f"{DEVICE_OPTION} {name}: PyTorch sees {count} CUDA device{'s' if count > 1 else ''} "
                       f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}); use one of them or {DEVICE_OPTION} cpu")
    return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)


def check_calibration_device(name: str) -> None:
    """The up-front check of `moh calibrate` / `moh convert` (a MoHError before any long work)."""
    resolve_calibration_device(name)


def generation_placement(device_name: str, dtype_name: str) -> tuple[torch.device, torch.dtype]:
    """Where 'self' / 'chat' text is generated: on CUDA (in the calibration dtype) when calibration runs there,
    else on the CPU in float32, as always."""
    device = resolve_calibration_device(device_name)
    return (device, CALIBRATION_DTYPES[dtype_name]) if device.type == "cuda" else (device, torch.float32)


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """`module` on `device` with its floating-point parameters in `dtype`. Buffers keep their dtype: rotary
    frequencies, embedding scales and the like stay as computed (float32). On the CPU in float32 (the default)
    nothing moves or changes."""
    module.to(device)
    for param in module.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return module


def describe_device(device: torch.device) -> str:
    """'cpu', or 'cuda:0 (NVIDIA H100 80GB HBM3)': the report's record of where calibration ran."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def peak_device_memory_mb(device: torch.device) -> float | None:
    """Peak CUDA memory allocated by PyTorch during the run (None on the CPU, where peak RSS says it)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
