"""`--calibration-device` / `--calibration-dtype`: checked before any work, recorded in the report; bfloat16
calibration gives routers as good as float32's. (No GPU here: CUDA runs are checked on a GPU machine.)"""
import importlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import moh_convert
from moh_convert import MoHError
from moh_convert.calibrate import CalibrationSettings, calibrate, load_calibration_windows
from moh_convert.calibrate import data as calibration_data
from moh_convert.calibrate import run as calibration_run
from moh_convert.calibrate.device import resolve_calibration_device
from moh_convert.cli import build_parser, main
from moh_convert.perplexity import perplexity

from .conftest import synthetic_text

convert_module = importlib.import_module("moh_convert.convert")  # the module: the package's `convert` is the function
calibration_api = importlib.import_module("moh_convert.calibrate.api")

SETTINGS = dict(calibration_tokens=1024, calibration_seq_len=64, calibration_heldout_tokens=256, calibration_batch_size=4)
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where PyTorch sees no CUDA device")
CUDA_MESSAGE = (r"--calibration-device cuda: no CUDA device is visible to PyTorch \(torch .+\); use --calibration-device "
                r"cpu or ")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("device-text") / "text.txt"
    path.write_text(synthetic_text(2000))
    return path


@pytest.fixture
def converted(tiny_checkpoints, tmp_path):
    return moh_convert.convert(tiny_checkpoints["llama"], tmp_path / "moh", active_heads=2, shared_heads=1,
                               no_calibration=True)


@pytest.fixture
def no_work(monkeypatch, converted):  # after `converted`, which writes weights itself
    """Any text generation or calibration fails the test: a bad device must be reported before them."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the calibration device was checked")

    monkeypatch.setattr(calibration_data, "load_dense_model", forbidden)
    monkeypatch.setattr(calibration_data, "load_calibration_mix", forbidden)
    monkeypatch.setattr(calibration_run, "load_calibration_mix", forbidden)
    monkeypatch.setattr(calibration_api, "calibrate_folder", forbidden)
    monkeypatch.setattr(convert_module, "calibrate_folder", forbidden)
    monkeypatch.setattr(convert_module, "write_weights", forbidden)  # no weights copied for nothing


@no_cuda
def test_cuda_without_cuda_fails_before_any_work(converted, no_work, tmp_path, tiny_checkpoints, capsys):
    config_before = (converted / "config.json").read_text()
    fix = "install a CUDA build of PyTorch" if torch.version.cuda is None else ""
    with pytest.raises(MoHError, match=CUDA_MESSAGE + fix):
        calibrate(converted, calibration_data="self", calibration_device="cuda")
    assert main(["calibrate", str(converted), "--calibration-data", "self", "--calibration-device", "cuda"]) == 2
    assert main(["convert", str(tiny_checkpoints["llama"]), str(tmp_path / "out"), "--calibration-device", "cuda"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and errors[0].startswith("moh calibrate: error: --calibration-device cuda: no CUDA device")
    assert errors[1].startswith("moh convert: error: --calibration-device cuda: no CUDA device")
    assert (converted / "config.json").read_text() == config_before and not (tmp_path / "out").exists()


@no_cuda
def test_cuda_without_cuda_is_one_line_on_the_command_line(converted):
    result = subprocess.run([sys.executable, "-m", "moh_convert", "calibrate", str(converted), "--calibration-data",
                             "default", "--calibration-device", "cuda"], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("moh calibrate: error:")]
    assert len(errors) == 1 and "no CUDA device is visible to PyTorch" in errors[0]


@pytest.mark.parametrize("device, shown", [("gpu", "gpu"), ("cuda:x", "cuda:x"), ("meta", "meta"), ("cpu:1", "cpu:1"),
                                           ("", "''")])
def test_an_invalid_device_fails(converted, no_work, tmp_path, tiny_checkpoints, device, shown):
    with pytest.raises(MoHError, match=rf"--calibration-device {shown}: not a device calibration can use; use "
                                       r"'auto', 'cpu', 'cuda' or 'cuda:N'"):
        calibrate(converted, calibration_data="self", calibration_device=device)
    with pytest.raises(MoHError, match=r"not a device calibration can use"):
        moh_convert.convert(tiny_checkpoints["llama"], tmp_path / "out", calibration_device=device)
    assert not (tmp_path / "out").exists()


def test_device_resolution(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_calibration_device("auto") == torch.device("cpu")
    assert resolve_calibration_device("CPU") == torch.device("cpu")
    # With one CUDA device visible, 'auto' and 'cuda' pick it and an index beyond it is an error.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_calibration_device("auto") == resolve_calibration_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(MoHError, match=r"--calibration-device cuda:3: PyTorch sees 1 CUDA device \(cuda:0\); use one "
                                       r"of them or --calibration-device cpu"):
        resolve_calibration_device("cuda:3")


def test_bfloat16_calibration_gives_routers_close_to_float32(tiny_checkpoints, text_file, tmp_path):
    folders = {}
    for dtype in ("float32", "bfloat16"):
        folders[dtype] = moh_convert.convert(tiny_checkpoints["llama"], tmp_path / dtype, active_heads=2, shared_heads=1,
                                             no_calibration=True)
        calibrate(folders[dtype], calibration_data=str(text_file), calibration_dtype=dtype, calibration_device="cpu",
                  **SETTINGS)
    reports = {dtype: json.loads((folder / "calibration_report.json").read_text()) for dtype, folder in folders.items()}
    assert (reports["float32"]["device"], reports["float32"]["dtype"]) == ("cpu", "float32")
    assert (reports["bfloat16"]["device"], reports["bfloat16"]["dtype"]) == ("cpu", "bfloat16")
    assert "peak_cuda_memory_mb" not in reports["bfloat16"]
    # The saved routers, run in float32, are about as good whichever dtype the layers were calibrated in.
    settings = CalibrationSettings(calibration_data=str(text_file), **SETTINGS)
    windows = load_calibration_windows(settings, AutoTokenizer.from_pretrained(folders["float32"]), folders["float32"])[1]
    measured = {dtype: perplexity(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), windows,
                                  progress=False) for dtype, folder in folders.items()}
    assert measured["bfloat16"] == pytest.approx(measured["float32"], rel=0.02)
    assert measured["float32"] == pytest.approx(reports["float32"]["heldout_perplexity"]["after"], rel=2e-3)
    # The report's own numbers, computed in bfloat16, are close too.
    for key in ("dense", "after"):
        assert reports["bfloat16"]["heldout_perplexity"][key] == pytest.approx(
            reports["float32"]["heldout_perplexity"][key], rel=0.02)
    # Router tensors are stored in the weights' dtype (float32 here), whatever the calibration dtype.
    with safe_open(folders["bfloat16"] / "model-moh-routers.safetensors", framework="pt") as handle:
        assert all(handle.get_tensor(name).dtype == torch.float32 for name in handle.keys())


@pytest.mark.parametrize("command", ["calibrate", "convert"])
def test_help_lists_the_device_flags(command):
    subparsers = next(action for action in build_parser()._actions if action.dest == "command")
    help_text = subparsers.choices[command].format_help()
    assert "--calibration-device" in help_text and "'auto' = CUDA when available" in " ".join(help_text.split())
    assert "--calibration-dtype {float32,bfloat16}" in help_text
