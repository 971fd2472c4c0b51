"""Calibration text (moh_convert.calibrate.data, chat_text): what each source reads as, its errors, several sources
mixed with weights (SOURCE[:WEIGHT]) and 'chat', the dialogues a model writes itself."""
import json

import pytest
import torch

from moh_convert import MoHError
from moh_convert.calibrate import CalibrationSettings, chat_text
from moh_convert.calibrate import data as calibration_data
from moh_convert.calibrate.data import (
    check_calibration_source, load_calibration_mix, read_calibration_text, window_shares,
)
from moh_convert.calibrate.settings import DEFAULT_CALIBRATION_DATA, SourceEntry, parse_calibration_data, split_entry

from .conftest import synthetic_text, tiny_tokenizer


def settings(source: str | list[str], **options) -> CalibrationSettings:
    return CalibrationSettings(calibration_data=source, **options)


def test_a_text_file_reads_as_its_whole_text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("first line\nsecond line\n\nthird\n" * 20000)  # several pieces of text_sources' chunk size
    assert read_calibration_text(settings(str(path)), needed_chars=10) == path.read_text()


def test_a_jsonl_file_reads_as_its_records_joined(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two\nlines"}) + "\n")
    assert read_calibration_text(settings(str(path), calibration_column="body"), needed_chars=1) == "one\n\ntwo\nlines"
    with pytest.raises(MoHError, match=r"data.jsonl:1 is not a JSON object with a 'text' field \(set --calibration-column\)"):
        read_calibration_text(settings(str(path)), needed_chars=1)


def test_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(MoHError, match=r"calibration file .*missing.txt not found"):
        read_calibration_text(settings(str(tmp_path / "missing.txt")), needed_chars=1)


def test_a_hub_dataset_reads_rows_until_enough_text(monkeypatch):
    rows = [{"text": "a" * 10}, {"text": "b" * 10}, {"text": "c" * 10}]
    opened = []
    monkeypatch.setattr(calibration_data, "open_dataset", lambda *args: opened.append(args) or iter(rows))
    text = read_calibration_text(settings("corpus", calibration_split="validation"), needed_chars=15)
    assert text == "a" * 10 + "\n\n" + "b" * 10
    assert opened == [("corpus", None, "validation")]
    with pytest.raises(MoHError, match=r"dataset 'corpus' has no column 'body' \(columns: text\); set --calibration-column"):
        read_calibration_text(settings("corpus", calibration_column="body"), needed_chars=15)


def test_dataset_errors_become_moh_errors(monkeypatch):
    def fail(*args):
        raise FileNotFoundError("no such dataset")

    monkeypatch.setattr(calibration_data, "open_dataset", fail)
    with pytest.raises(MoHError, match=r"no file missing-corpus, and the Hub dataset could not be read: "
                                       r"FileNotFoundError: no such dataset; pass a local"):
        read_calibration_text(settings("missing-corpus"), needed_chars=15)


# ---------------------------------------------------------------- several sources: SOURCE[:WEIGHT] entries

FAST = ["--calibration-tokens", "256", "--calibration-seq-len", "32", "--calibration-heldout-tokens", "64"]


def test_entries_and_weights_are_parsed():
    assert parse_calibration_data("self") == [SourceEntry("self", 1.0)]
    assert parse_calibration_data(["a.txt:0.7", "chat:0.3"]) == [SourceEntry("a.txt", 0.7), SourceEntry("chat", 0.3)]
    assert parse_calibration_data(["a.txt:3", "b.jsonl"]) == [SourceEntry("a.txt", 0.75), SourceEntry("b.jsonl", 0.25)]
    # Only a number after the LAST colon is a weight: Windows paths and file names with colons stay names.
    assert split_entry(r"C:\data\x.txt") == (r"C:\data\x.txt", None)
    assert split_entry(r"C:\data\x.txt:0.5") == (r"C:\data\x.txt", 0.5)
    assert split_entry("a:b.txt") == ("a:b.txt", None)
    assert split_entry("notes:v2.txt:1e-1") == ("notes:v2.txt", 0.1)
    assert split_entry("org/name") == ("org/name", None)
    for bad, message in [("a.txt:0", "must be a positive number, not 0"), ("a.txt:-1", "positive number, not -1"),
                         (":2", "has a weight but no source")]:
        with pytest.raises(MoHError, match=message):
            parse_calibration_data(bad)


def test_default_expands_to_its_one_constant():
    expected = [SourceEntry(*split_entry(entry)) for entry in DEFAULT_CALIBRATION_DATA]
    total = sum(entry.weight for entry in expected)
    assert parse_calibration_data("default") == [SourceEntry(e.source, e.weight / total) for e in expected]
    # As an entry, its weight scales the mix; a source named twice adds up.
    mixed = parse_calibration_data(["default:1", "wiki.txt:1"])
    assert mixed[-1] == SourceEntry("wiki.txt", 0.5) and sum(e.weight for e in mixed) == pytest.approx(1.0)
    assert parse_calibration_data(["self", "self", "chat:2"]) == [SourceEntry("self", 0.5), SourceEntry("chat", 0.5)]


def test_one_entry_stays_a_string_and_an_empty_list_is_refused():
    from moh_convert.calibrate import CalibrateOptions
    from moh_convert.options import validate_options

    assert settings(["a.txt"]).calibration_data == "a.txt"  # one value of --calibration-data reads as before
    assert settings(["a.txt:1", "self:1"]).calibration_data == ["a.txt:1", "self:1"]
    with pytest.raises(MoHError, match="calibration-data: Value error, give at least one source"):
        validate_options(CalibrateOptions, {"calibration_data": []})


def test_every_entry_is_checked_up_front(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("some text\n")
    check_calibration_source([f"{text}:0.5", "self:0.25", "chat:0.25"], "text")
    check_calibration_source(["default", str(text)], "text")
    check_calibration_source("chat", "text")
    with pytest.raises(MoHError, match=r"calibration file .*missing.txt not found"):
        check_calibration_source([f"{text}:0.5", f"{tmp_path / 'missing.txt'}:0.5"], "text")
    with pytest.raises(MoHError, match=r"the weight must be a positive number, not -2"):
        check_calibration_source([f"{text}:-2", "self"], "text")


def test_window_shares_round_and_give_every_source_a_window():
    assert window_shares(8, [0.75, 0.25]) == [6, 2]
    assert window_shares(2, [0.75, 0.25]) == [1, 1]  # at least one each when the total allows
    assert window_shares(3, [0.98, 0.01, 0.01]) == [1, 1, 1]
    assert window_shares(1, [0.5, 0.5]) == [1, 0]
    assert window_shares(0, [0.5, 0.5]) == [0, 0]
    assert window_shares(7, [1.0]) == [7]
    assert sum(window_shares(33, [0.2, 0.3, 0.5])) == 33


def windows_of(text: str, tokenizer, seq_len: int) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)


def test_two_files_share_the_windows_by_weight(tmp_path):
    tokenizer = tiny_tokenizer()
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text(synthetic_text(600, seed=1))
    second.write_text(synthetic_text(600, seed=2).upper())
    opts = settings([f"{first}:0.75", f"{second}:0.25"], calibration_tokens=8 * 32, calibration_seq_len=32,
                    calibration_heldout_tokens=4 * 32)
    mix = load_calibration_mix(opts, tokenizer, tmp_path)
    assert mix.calibration.shape == (8, 32) and mix.heldout.shape == (4, 32)
    assert mix.calibration_source.tolist().count(0) == 6 and mix.heldout_source.tolist() == [0, 0, 1, 0]
    for index, path in enumerate([first, second]):
        expected = windows_of(path.read_text(), tokenizer, 32)
        calibration = mix.calibration[mix.calibration_source == index]
        heldout = mix.heldout[mix.heldout_source == index]
        # Held-out windows are the source's text right after its calibration windows: other documents.
        assert torch.equal(torch.cat([calibration, heldout]), expected[: len(calibration) + len(heldout)])
    assert [item.entry.source for item in mix.sources] == [str(first), str(second)]
    for batch in mix.calibration_source.split(4):  # interleaved: every batch of the default size mixes sources
        assert set(batch.tolist()) == {0, 1}


def test_a_single_file_gives_the_windows_it_always_gave(tmp_path):
    tokenizer = tiny_tokenizer()
    path = tmp_path / "text.txt"
    path.write_text(synthetic_text(800))
    mix = load_calibration_mix(settings(str(path), calibration_tokens=200, calibration_seq_len=32,
                                        calibration_heldout_tokens=64), tokenizer, tmp_path)
    expected = windows_of(path.read_text(), tokenizer, 32)
    assert torch.equal(mix.calibration, expected[:7]) and torch.equal(mix.heldout, expected[7:9])
    assert mix.calibration_source.tolist() == [0] * 7 and mix.sources[0].entry == SourceEntry(str(path), 1.0)


# ---------------------------------------------------------------- 'chat': dialogues the model writes itself

CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def as_text(tokenizer, ids: torch.Tensor) -> str:
    """The tiny character-level tokenizer's tokens joined without the spaces its decode puts between them."""
    return "".join(token or "?" for token in tokenizer.convert_ids_to_tokens(ids.tolist()))  # the model has 128 ids


@pytest.fixture(scope="module")
def chat_moh(tiny_checkpoints, tmp_path_factory):
    """A tiny converted llama whose tokenizer has a chat template."""
    import moh_convert

    folder = moh_convert.convert(tiny_checkpoints["llama"], tmp_path_factory.mktemp("chat") / "moh", active_heads=2,
                                 shared_heads=1, no_calibration=True)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def short_replies(monkeypatch):
    monkeypatch.setattr(chat_text, "CHAT_MAX_NEW_TOKENS", 24)  # the random tiny model rarely stops by itself


def test_the_shipped_prompts_are_varied():
    prompts = chat_text.load_prompts()
    kinds = [item["kind"] for item in prompts]
    assert len(prompts) >= 150 and {kind: kinds.count(kind) >= 35 for kind in set(kinds)} == dict.fromkeys(
        ["chat", "code", "math", "prose"], True)
    assert len({item["prompt"] for item in prompts}) == len(prompts)


def test_chat_text_is_whole_dialogues_and_held_out_on_other_prompts(chat_moh, short_replies):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_moh)
    text = chat_text.sample_chat_text(chat_moh, tokenizer, 320, 96, 32, seed=0, batch_size=4)
    assert text.calibration.numel() >= 320 and text.heldout.numel() >= 96 and text.chat_template
    assert not set(text.calibration_prompts) & set(text.heldout_prompts)
    decoded = as_text(tokenizer, text.calibration)
    first = text.calibration_prompts[0]
    assert decoded.startswith(f"<|user|> {first}</s><|assistant|> ")
    assert decoded.count("<|assistant|>") == len(text.calibration_prompts)  # whole dialogues, back to back
    heldout = as_text(tokenizer, text.heldout)
    assert text.heldout_prompts[0] in heldout and first not in heldout
    # Same seed, same text.
    again = chat_text.sample_chat_text(chat_moh, tokenizer, 320, 96, 32, seed=0, batch_size=4)
    assert torch.equal(again.calibration, text.calibration)


def test_chat_windows_have_the_right_shape(chat_moh, short_replies):
    from transformers import AutoTokenizer

    opts = settings("chat", calibration_tokens=256, calibration_seq_len=32, calibration_heldout_tokens=64)
    mix = load_calibration_mix(opts, AutoTokenizer.from_pretrained(chat_moh), chat_moh)
    assert mix.calibration.shape == (8, 32) and mix.heldout.shape == (2, 32)
    record = mix.sources[0].sampling
    assert record["chat_template"] is True and record["max_new_tokens"] == 24 and record["prompts"] >= 150
    assert record["calibration_dialogues"] >= 1 and record["heldout_dialogues"] >= 1


def test_default_mixes_the_sources_of_its_constant(chat_moh, short_replies):
    from transformers import AutoTokenizer

    opts = settings("default", calibration_tokens=256, calibration_seq_len=32, calibration_heldout_tokens=64)
    mix = load_calibration_mix(opts, AutoTokenizer.from_pretrained(chat_moh), chat_moh)
    entries = parse_calibration_data(DEFAULT_CALIBRATION_DATA)
    assert [item.entry for item in mix.sources] == entries
    assert [len(item.calibration) for item in mix.sources] == window_shares(8, [e.weight for e in entries])
    assert mix.calibration.shape == (8, 32) and mix.heldout.shape == (2, 32)


def test_without_a_chat_template_prompts_are_plain_text(chat_moh, short_replies):
    tokenizer = tiny_tokenizer()  # no chat template
    text = chat_text.sample_chat_text(chat_moh, tokenizer, 64, 32, 32, seed=1, batch_size=2)
    assert not text.chat_template and "no chat template" in text.record(160)["note"]
    # "\n\n" is one unknown token of the tiny tokenizer
    assert as_text(tokenizer, text.calibration).startswith(text.calibration_prompts[0] + "<unk>")


def test_cli_mixes_a_file_and_self_and_reports_each_source(chat_moh, tiny_checkpoints, tmp_path, capsys):
    from moh_convert.cli import main

    text = tmp_path / "a.txt"
    text.write_text(synthetic_text(1500))
    out = tmp_path / "moh"
    assert main(["convert", str(tiny_checkpoints["llama"]), str(out), "--active-heads", "2", "--calibration-data",
                 f"{text}:0.5", "self:0.5", *FAST]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "calibration_report.json").read_text())
    assert report["calibration_data"] == [f"{text}:0.5", "self:0.5"]
    assert [(source["source"], source["weight"]) for source in report["sources"]] == [(str(text), 0.5), ("self", 0.5)]
    assert [source["calibration_tokens"] for source in report["sources"]] == [128, 128]
    assert [source["heldout_tokens"] for source in report["sources"]] == [32, 32]
    assert report["calibration_tokens"] == 256 and report["heldout_tokens"] == 64
    assert report["self_sampling"]["temperature"] > 1.0 and "chat" not in report["self_sampling"]
    overall = report["heldout_perplexity"]
    per_source = [source["heldout_perplexity"] for source in report["sources"]]
    for name in ("dense", "before", "after"):
        values = sorted(ppl[name] for ppl in per_source)
        assert values[0] * 0.999 <= overall[name] <= values[1] * 1.001  # the mean loss lies between the sources'
    assert "calibrated / dense perplexity per source: " in printed and "self " in printed
    card = (out / "README.md").read_text()
    assert "| source | weight |" in card and "| `self` | 0.50 |" in card


def test_a_single_source_reports_one_source_with_the_overall_numbers(tmp_path, tiny_checkpoints):
    import moh_convert

    text = tmp_path / "a.txt"
    text.write_text(synthetic_text(1500))
    out = moh_convert.convert(tiny_checkpoints["llama"], tmp_path / "moh", active_heads=2, calibration_data=str(text),
                              calibration_tokens=256, calibration_seq_len=32, calibration_heldout_tokens=64)
    report = json.loads((out / "calibration_report.json").read_text())
    assert report["calibration_data"] == str(text) and report["self_sampling"] is None
    assert report["sources"] == [{"source": str(text), "weight": 1.0, "calibration_tokens": 256, "heldout_tokens": 64,
                                  "heldout_perplexity": report["heldout_perplexity"]}]
    assert "| source | weight |" not in (out / "README.md").read_text()


def test_only_fields_that_opt_in_take_several_values():
    import argparse

    from moh_convert.calibrate import CalibrateOptions
    from moh_convert.eval_tasks import EvalOptions
    from moh_convert.options import add_options_to_parser

    parser = argparse.ArgumentParser()
    add_options_to_parser(parser, CalibrateOptions)
    assert parser.parse_args(["--calibration-data", "a.txt:0.5", "self:0.5"]).calibration_data == ["a.txt:0.5", "self:0.5"]
    assert parser.parse_args(["--calibration-data", "self"]).calibration_data == ["self"]
    parser = argparse.ArgumentParser()
    add_options_to_parser(parser, EvalOptions)
    assert parser.parse_args(["--tasks", "piqa,arc_easy"]).tasks == "piqa,arc_easy"
    assert EvalOptions(tasks="piqa,arc_easy").tasks == ["piqa", "arc_easy"]
