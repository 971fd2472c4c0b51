"""benchmarks/text_kinds.py: every kind of text gives windows of the right shape, the same on every call; chat uses
the tokenizer's chat template when it has one (a plain User/Assistant layout otherwise)."""
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from benchmarks import text_kinds  # noqa: E402

DATA_DIR = Path(__file__).parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not (DATA_DIR / "eval" / "gsm8k_test.jsonl").is_file(),
                                reason=f"real data folder {DATA_DIR} missing")

TEMPLATE = ("{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}</{{ message['role'] }}>\n"
            "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
WINDOW, MAX_WINDOWS = 64, 5


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def built(chat_tokenizer):
    return text_kinds.build_text_kinds(chat_tokenizer, DATA_DIR, window=WINDOW, max_windows=MAX_WINDOWS)


def test_every_kind_gives_windows_of_the_right_shape(built):
    assert list(built) == list(text_kinds.KINDS)
    for kind, item in built.items():
        assert item.windows.shape == (MAX_WINDOWS, WINDOW), kind
        assert item.windows.dtype == torch.long
        assert item.tokens_available > item.tokens_used == MAX_WINDOWS * WINDOW
        assert 1 <= item.documents_used <= item.kind.documents
        assert item.kind.description and item.kind.sources


def test_windows_are_deterministic(chat_tokenizer, built):
    """A second build gives the same windows (prose: checked against wikitext_windows below)."""
    again = text_kinds.text_kind_windows(chat_tokenizer, DATA_DIR, kinds=("chat", "math", "code"), window=WINDOW,
                                         max_windows=MAX_WINDOWS)
    assert list(again) == ["chat", "math", "code"]
    for kind, windows in again.items():
        assert torch.equal(windows, built[kind].windows), kind
    assert text_kinds.code_text().text == built["code"].kind.text


def test_prose_windows_are_wikitext_windows(chat_tokenizer, built):
    from moh_convert.perplexity import wikitext_windows

    assert torch.equal(built["prose"].windows, wikitext_windows(chat_tokenizer, DATA_DIR, "test", WINDOW, MAX_WINDOWS))


def test_chat_uses_the_template_when_there_is_one(chat_tokenizer, built):
    text = built["chat"].kind.text
    assert text.startswith("<user>") and "</user>\n<assistant>The answer is: " in text
    assert "User: " not in text and "chat template" in built["chat"].kind.description
    plain = text_kinds.chat_text(tiny_tokenizer(), DATA_DIR)  # no template
    assert plain.text.startswith("User: ") and "\nAssistant: The answer is: " in plain.text
    assert "NO chat template" in plain.description


def test_chat_replies_are_the_datasets_text():
    arc, piqa = text_kinds.chat_pairs(DATA_DIR)
    first_arc = text_kinds._read_jsonl(DATA_DIR / "eval" / "arc_easy_test.jsonl")[0]
    correct = first_arc["choices"]["text"][first_arc["choices"]["label"].index(first_arc["answerKey"])]
    assert arc[0][0].startswith(first_arc["question"]) and arc[0][1] == f"The answer is: {correct.rstrip('.')}."
    first_piqa = text_kinds._read_jsonl(DATA_DIR / "eval" / "piqa_validation.jsonl")[0]
    assert piqa[0] == (first_piqa["goal"].strip(), first_piqa[f"sol{first_piqa['label'] + 1}"].strip())


def test_code_modules_exist_and_excerpts_start_at_a_definition():
    for name in text_kinds.CODE_MODULES:
        assert (text_kinds.stdlib_dir() / name).is_file(), name
    assert list(text_kinds.CODE_MODULES) == sorted(text_kinds.CODE_MODULES)
    for document in text_kinds.code_text().text.split("\n\n# file: ")[1:]:
        second_line = document.split("\n", 2)[1]
        assert second_line.startswith(("def ", "class ", "async def ", "@")), second_line


def test_unknown_kind_is_refused(chat_tokenizer):
    with pytest.raises(ValueError, match="unknown kinds"):
        text_kinds.text_kinds(chat_tokenizer, DATA_DIR, kinds=("poetry",))


def test_no_shipped_calibration_prompt_is_evaluation_text(built):
    """The 'chat' calibration default writes replies to prompts.jsonl: none of those may come from the texts here."""
    prompts_file = REPO_ROOT / "moh_convert" / "calibrate" / "prompts.jsonl"
    if not prompts_file.is_file():
        pytest.skip("no shipped calibration prompts")
    import json

    prompts = [json.loads(line)["prompt"].strip() for line in prompts_file.read_text().splitlines() if line.strip()]
    texts = [item.kind.text for item in built.values()]
    assert [prompt for prompt in prompts if any(prompt in text for text in texts)] == []
