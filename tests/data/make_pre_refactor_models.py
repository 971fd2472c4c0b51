"""Writes tests/data/pre_refactor/: small MoH folders made by moh_convert as of commit e40e73e (before the
package was reorganised), with the logits they gave then. tests/test_compat.py loads them with today's code and
checks the logits, so a refactor cannot silently change what an existing converted model computes. (The modeling
files were deleted from three of the folders afterwards: see the end of main().)

Run from the repository root at that commit (kept for the record; re-running it with newer code would defeat the
purpose): python tests/data/make_pre_refactor_models.py
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import moh_convert  # noqa: E402
from tests.conftest import synthetic_text, tiny_source_config, tiny_tokenizer  # noqa: E402

HERE = Path(__file__).resolve().parent / "pre_refactor"
INPUT_IDS = [[1, 40, 41, 42, 7, 8, 9, 50, 51, 52, 60, 61, 62, 70, 71, 72], [1, 90, 80, 70, 60, 50, 40, 30, 20, 10, 5, 6, 7, 8, 9, 10]]


def main():
    shutil.rmtree(HERE, ignore_errors=True)
    work = HERE.parent / ".pre_refactor-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    text = work / "text.txt"
    text.write_text(synthetic_text(3000))
    models = {}
    for model_type in ("llama", "qwen3"):
        torch.manual_seed(0)
        # The llama source is kept: the test calibrates it again with today's code and compares the results.
        source = (HERE if model_type == "llama" else work) / f"{model_type}-source"
        AutoModelForCausalLM.from_config(tiny_source_config(model_type)).save_pretrained(source)
        tiny_tokenizer().save_pretrained(source)
        paper = moh_convert.convert(source, HERE / f"{model_type}-paper", active_heads=3, shared_heads=2)
        calibrated = moh_convert.convert(
            source, HERE / f"{model_type}-calibrated", active_heads=2, calibration_data=str(text),
            calibration_tokens=1024, calibration_seq_len=64, calibration_heldout_tokens=256,
        )
        models[paper.name], models[calibrated.name] = paper, calibrated
    input_ids = torch.tensor(INPUT_IDS)
    expected = {"input_ids": INPUT_IDS, "logits": {}}
    for name, folder in models.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        for path in ("sparse", "masked"):
            model.set_attention_path(path)
            with torch.no_grad():
                logits = model(input_ids=input_ids).logits
            expected["logits"][f"{name}/{path}"] = [round(v, 6) for v in logits[:, :, :8].flatten().tolist()]
    (HERE / "expected_logits.json").write_text(json.dumps(expected) + "\n")
    shutil.rmtree(work)
    # The four folders' modeling files are identical: one copy (llama-calibrated) is kept, for the push check of an
    # earlier release's code; the other folders load natively (moh_convert imported) and do not need them.
    for name in models:
        if name != "llama-calibrated":
            for file_name in ("modeling_moh.py", "configuration_moh.py"):
                (HERE / name / file_name).unlink()


if __name__ == "__main__":
    main()
