"""Calibration text (moh_convert.calibrate.data): what each source reads as, and its errors."""
import json

import pytest

from moh_convert import MoHError
from moh_convert.calibrate import CalibrationSettings
from moh_convert.calibrate import data as calibration_data
from moh_convert.calibrate.data import read_calibration_text


def settings(source: str, **options) -> CalibrationSettings:
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
