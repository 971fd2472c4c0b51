"""Folders written by an earlier moh_convert (tests/data/pre_refactor, made by make_pre_refactor_models.py at commit
e40e73e) still load and compute what they computed then, and calibrating their source again gives the same model."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moh_convert

from .conftest import synthetic_text

PRE_REFACTOR = Path(__file__).parent / "data" / "pre_refactor"
EXPECTED = json.loads((PRE_REFACTOR / "expected_logits.json").read_text())
FOLDERS = ["llama-paper", "llama-calibrated", "qwen3-paper", "qwen3-calibrated"]


@pytest.mark.parametrize("name", FOLDERS)
def test_earlier_folders_give_the_same_logits(name):
    model = AutoModelForCausalLM.from_pretrained(PRE_REFACTOR / name, dtype=torch.float32).eval()
    for path in ("sparse", "masked"):
        model.set_attention_path(path)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(EXPECTED["input_ids"])).logits[:, :, :8].flatten()
        expected = torch.tensor(EXPECTED["logits"][f"{name}/{path}"])
        torch.testing.assert_close(logits, expected, atol=2e-5, rtol=0)


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in folder.glob("*.safetensors"):
        tensors.update(load_file(shard))
    return tensors


def test_calibrating_the_source_again_gives_the_same_model(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(synthetic_text(3000))  # the text make_pre_refactor_models.py calibrated on
    out = moh_convert.convert(
        PRE_REFACTOR / "llama-source", tmp_path / "moh", active_heads=2, calibration_data=str(text),
        calibration_tokens=1024, calibration_seq_len=64, calibration_heldout_tokens=256,
        objective="quality",  # the split rule of that version (the default objective is now "balanced")
        output_ridge=1e-2,  # the output projection's ridge of that version (the default is now 0.1)
        refit_router=False,  # that version fitted each router once (the default now refits it after o_proj)
    )
    earlier = PRE_REFACTOR / "llama-calibrated"
    new_report = json.loads((out / "calibration_report.json").read_text())
    old_report = json.loads((earlier / "calibration_report.json").read_text())
    assert new_report["heldout_perplexity"] == pytest.approx(old_report["heldout_perplexity"], rel=1e-4)
    assert [layer["shared_heads"] for layer in new_report["layers"]] == [
        layer["shared_heads"] for layer in old_report["layers"]]
    assert json.loads((out / "config.json").read_text())["shared_heads"] == json.loads(
        (earlier / "config.json").read_text())["shared_heads"]
    new_tensors, old_tensors = all_tensors(out), all_tensors(earlier)
    assert new_tensors.keys() == old_tensors.keys()
    for name, tensor in old_tensors.items():
        torch.testing.assert_close(new_tensors[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
