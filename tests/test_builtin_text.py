"""The built-in calibration sources of real text (moh_convert.calibrate.builtin_text): 'prose' and 'math' ship with
the package, 'code' reads installed packages' modules (never the standard library, which evaluation uses), and
each reads as windows with its origin recorded in the calibration report and card."""
import json
import sys

import pytest
import torch

from moh_convert import MoHError
from moh_convert.calibrate import CalibrationSettings
from moh_convert.calibrate.builtin_text import CODE_MODULES, code_excerpt, installed_code_text, read_builtin_text
from moh_convert.calibrate.data import check_calibration_source, load_calibration_mix, spread_windows
from moh_convert.calibrate.settings import BUILTIN_SOURCES, DEFAULT_CALIBRATION_DATA, parse_calibration_data

from .conftest import tiny_tokenizer


def test_the_default_mix_covers_four_kinds_of_text_in_equal_shares():
    entries = parse_calibration_data("default")
    assert {entry.source for entry in entries} == {"chat", *BUILTIN_SOURCES}
    assert all(entry.weight == pytest.approx(0.25) for entry in entries) and len(DEFAULT_CALIBRATION_DATA) == 4


def test_shipped_prose_and_math_are_whole_documents_of_real_text():
    prose = read_builtin_text("prose", needed_chars=0)
    assert prose.text.startswith(" = Homarus gammarus = \n") and len(prose.text) > 100_000
    assert prose.files == ["moh_convert/calibrate/texts/prose.txt"] and "CC BY-SA" in prose.origin
    math = read_builtin_text("math", needed_chars=0)
    problems = math.text.strip().split("\n\n")
    assert len(problems) > 150 and all(p.startswith("Question: ") and "\nAnswer: " in p for p in problems)
    assert all("\n#### " in problem for problem in problems)  # GSM8K's final-answer line: solutions are whole
    assert "MIT" in math.origin


def test_code_reads_installed_packages_never_the_standard_library():
    code = installed_code_text(needed_chars=20_000)
    packages = {package for package, _ in CODE_MODULES}
    assert not packages & set(sys.stdlib_module_names)
    assert code.text.startswith(f"# file: {code.files[0]}\n") and len(code.text) >= 20_000
    assert all(name.split("/")[0] in packages for name in code.files) and len(code.files) >= 5
    # More text asked for: longer excerpts of every module rather than nothing more.
    more = installed_code_text(needed_chars=400_000)
    assert len(more.text) >= 400_000 and len(more.files) >= len(code.files)


def test_code_excerpts_start_at_a_definition_and_end_before_one():
    source = ("# Copyright notice\n# Licensed under ...\nimport os\nimport sys\n\n\n"
              "@decorator\ndef first():\n    return 1\n\n\nclass Second:\n    def method(self):\n        pass\n\n"
              "    def other(self):\n        pass\n\n\ndef third():\n    pass\n")
    assert code_excerpt(source, budget=20) == "@decorator\ndef first():\n    return 1\n"  # stops before a method
    assert code_excerpt(source, budget=60).endswith("    def method(self):\n        pass\n")
    whole = code_excerpt(source, budget=10_000)
    assert whole.startswith("@decorator") and whole.endswith("def third():\n    pass\n")


def test_builtin_sources_read_as_windows_with_their_origin(tmp_path):
    opts = CalibrationSettings(calibration_data=["prose", "math", "code"], calibration_tokens=192,
                               calibration_seq_len=32, calibration_heldout_tokens=96)
    mix = load_calibration_mix(opts, tiny_tokenizer(), tmp_path)  # no model is needed for real text
    assert mix.calibration.shape == (6, 32) and mix.heldout.shape == (3, 32)
    assert [item.entry.source for item in mix.sources] == ["prose", "math", "code"]
    assert all(item.origin["text"] and item.origin["files"] for item in mix.sources)
    assert mix.calibration_source.tolist() == [0, 1, 2, 0, 1, 2]
    # held-out windows come after the calibration windows in the same text: never the same tokens
    for item in mix.sources:
        assert not any(item.heldout[0].equal(window) for window in item.calibration)


def test_windows_come_from_all_over_a_builtin_text_and_held_out_ones_from_among_them():
    windows = torch.arange(56).view(56, 1)  # window i holds token i
    calibration, heldout = spread_windows(windows, num_calibration=8, num_heldout=1)
    assert calibration.flatten().tolist() == [3, 9, 15, 21, 34, 40, 46, 52] and heldout.flatten().tolist() == [28]
    calibration, heldout = spread_windows(torch.arange(10).view(10, 1), num_calibration=8, num_heldout=2)
    assert sorted(calibration.flatten().tolist() + heldout.flatten().tolist()) == list(range(10))
    assert heldout.flatten().tolist() == [2, 7]
    calibration, heldout = spread_windows(windows, num_calibration=4, num_heldout=0)
    assert calibration.flatten().tolist() == [7, 21, 35, 49] and heldout.numel() == 0


def test_a_builtin_source_too_short_for_the_tokens_asked_says_what_to_lower(tmp_path):
    opts = CalibrationSettings(calibration_data="math", calibration_tokens=2_000_000, calibration_seq_len=512)
    with pytest.raises(MoHError, match=r"calibration source 'math' has \d+ tokens; .* lower --calibration-tokens or "
                                       r"this source's weight"):
        load_calibration_mix(opts, tiny_tokenizer(), tmp_path)


def test_named_sources_pass_the_early_checks_without_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no files called prose/math/code here
    check_calibration_source(["prose:1", "math:1", "code:1", "chat:1", "self:1", "default"], "text")
    with pytest.raises(MoHError, match=r"named source \('self', 'chat', 'prose', 'math', 'code', 'default'\)"):
        check_calibration_source("poetry.txt", "text")


def test_report_and_card_say_where_builtin_text_came_from(tiny_checkpoints, tmp_path):
    import moh_convert

    out = moh_convert.convert(tiny_checkpoints["llama"], tmp_path / "moh", active_heads=2,
                              calibration_data=["prose:0.5", "code:0.5"], calibration_tokens=256,
                              calibration_seq_len=32, calibration_heldout_tokens=64)
    report = json.loads((out / "calibration_report.json").read_text())
    prose, code = report["sources"]
    assert prose["source"] == "prose" and prose["files"] == ["moh_convert/calibrate/texts/prose.txt"]
    assert code["source"] == "code" and code["files"][0] == "/".join(CODE_MODULES[0])
    card = (out / "README.md").read_text()
    assert f"- `prose`: {prose['text']}" in card and f"- `code`: {code['text']}" in card
