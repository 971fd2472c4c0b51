"""Bad input stops every command with ONE line naming the problem and the fix, exit code 2 and no traceback, before
the long work starts (nothing written, the source unchanged); good input that looks unusual still works."""
import hashlib
import importlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

import moh_convert
from moh_convert.calibrate import data as calibration_data
from moh_convert.calibrate.data import check_calibration_source
from moh_convert.cli import main
from moh_convert.errors import MoHError
from moh_convert.train import plan_training
from moh_convert.train.recipe import TrainRecipe

from .conftest import synthetic_text
from .train_helpers import tiny_recipe

LATIN1_TEXT = "caf\u00e9 au lait, " * 50  # é is one byte (0xe9) in Latin-1: not UTF-8
FAST_CALIBRATION = ["--calibration-tokens", "256", "--calibration-seq-len", "32", "--calibration-heldout-tokens", "64"]


@pytest.fixture(scope="module")
def tiny_moh(tiny_checkpoints, tmp_path_factory) -> Path:
    """A tiny converted llama (2 of 4 heads active, 1 shared); tests copy it before changing it."""
    return moh_convert.convert(tiny_checkpoints["llama"], tmp_path_factory.mktemp("reliability") / "moh",
                               active_heads=2, shared_heads=1, no_calibration=True)


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "calibration.txt"
    path.write_text(synthetic_text(3000), encoding="utf-8")
    return path


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.fixture
def no_weights_written(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were written before the input was checked")

    monkeypatch.setattr(importlib.import_module("moh_convert.convert"), "write_weights", refuse)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its bytes: equal snapshots mean nothing was changed."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def moh(capsys, argv: list[str]) -> int:
    """`moh ARGV` in this process, with what the test's setup printed cleared first."""
    capsys.readouterr()
    return main(argv)


def one_line_error(capsys, command: str, *phrases: str) -> str:
    """The single stderr line of a failed command; it must contain every phrase."""
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"moh {command}: error: "), lines[0]
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def assert_nothing_written(output: Path) -> None:
    assert not output.exists()
    assert not list(output.parent.glob(f".{output.name}.*")), list(output.parent.iterdir())  # no partial, no lock


# ---------------------------------------------------------------- 1. text that is not UTF-8


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_calibrate_refuses_text_that_is_not_utf8(tiny_moh, tmp_path, capsys, suffix):
    path = tmp_path / f"latin1{suffix}"
    text = LATIN1_TEXT if suffix == ".txt" else json.dumps({"text": LATIN1_TEXT}, ensure_ascii=False) + "\n"
    path.write_bytes(text.encode("latin-1"))
    before = snapshot(tiny_moh)
    assert moh(capsys, ["calibrate", str(tiny_moh), "--calibration-data", str(path),
                        "--output", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "calibrate", f"{path} is not UTF-8 text (invalid byte at position "
                   f"{3 if suffix == '.txt' else 13}); convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)")
    assert_nothing_written(tmp_path / "out")
    assert snapshot(tiny_moh) == before


@pytest.mark.parametrize("key", ["data", "eval_data"])
def test_train_refuses_text_that_is_not_utf8_before_loading(tiny_moh, tmp_path, capsys, no_model_loading, key):
    good, bad = tmp_path / "train.txt", tmp_path / "latin1.jsonl"
    good.write_text(synthetic_text(2000))
    bad.write_bytes((json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": LATIN1_TEXT}, ensure_ascii=False)
                     + "\n").encode("latin-1"))
    recipe = tiny_recipe(tiny_moh, good, tmp_path / "run")
    recipe[key] = {"path": [str(good), str(bad)] if key == "data" else str(bad)}
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    assert moh(capsys, ["train", str(recipe_path)]) == 2
    position = len(json.dumps({"text": "fine"})) + 1 + len('{"text": "caf')
    one_line_error(capsys, "train", f"recipe key '{key}.path': {bad} is not UTF-8 text (invalid byte at position "
                   f"{position}); convert it to UTF-8")
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_bad_jsonl_line_before_loading(tiny_moh, tmp_path, capsys, no_model_loading):
    bad = tmp_path / "train.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text key"}) + "\n")
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe(tiny_moh, bad, tmp_path / "run")))
    assert moh(capsys, ["train", str(recipe_path)]) == 2
    one_line_error(capsys, "train", "train.jsonl:2 is not a JSON object with a 'text' field (set recipe key "
                   "'data.column')")
    assert not (tmp_path / "run").exists()


def test_utf8_text_with_non_ascii_characters_still_calibrates(tiny_moh, tmp_path, capsys):
    path = tmp_path / "unicode.jsonl"
    lines = [json.dumps({"text": f"{synthetic_text(200, seed)} caf\u00e9 \u00fcber na\u00efve \u65e5\u672c"},
                        ensure_ascii=False) for seed in range(10)]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode("utf-8"))  # with a byte-order mark, as Windows writes
    assert moh(capsys, ["calibrate", str(tiny_moh), "--calibration-data", str(path), "--output", str(tmp_path / "out"),
                 *FAST_CALIBRATION]) == 0
    report = json.loads((tmp_path / "out" / "calibration_report.json").read_text())
    assert report["calibration_tokens"] == 256


def test_utf8_training_text_with_non_ascii_characters_plans(tiny_moh, tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(synthetic_text(2000) + " caf\u00e9 \u65e5\u672c\n", encoding="utf-8")
    plan = plan_training(TrainRecipe(**tiny_recipe(tiny_moh, path, tmp_path / "run")), num_processes=1)
    assert plan.max_steps == 6


# ---------------------------------------------------------------- 2. damaged source shards


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # the header's JSON is garbled
        path.write_bytes(data[:8] + b"#" * 16 + data[24:])


@pytest.mark.parametrize("how, problem", [("empty", "is empty or truncated"), ("truncated", "is truncated"),
                                          ("header", "has a damaged header")])
@pytest.mark.parametrize("dtype", [None, "float16"])
def test_convert_checks_every_source_shard_before_writing(tiny_checkpoints, tmp_path, capsys, no_weights_written,
                                                          how, problem, dtype):
    source = tmp_path / "src"
    AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"]).save_pretrained(source, max_shard_size="100KB")
    shutil.copy(tiny_checkpoints["llama"] / "tokenizer.json", source)
    shards = sorted(source.glob("*.safetensors"))
    assert len(shards) > 2
    damage(shards[-1], how)  # the last shard: all are checked before the first is copied
    before = snapshot(source)
    assert moh(capsys, ["convert", "--no-calibration", str(source), str(tmp_path / "out"), *(["--dtype", dtype] if dtype else [])]) == 2
    one_line_error(capsys, "convert", f"weights file {shards[-1].name} {problem}", "re-download the checkpoint")
    assert_nothing_written(tmp_path / "out")
    assert snapshot(source) == before


def test_a_damaged_single_weights_file_is_one_line(tiny_checkpoints, tmp_path, capsys, no_weights_written):
    source = tmp_path / "src"
    shutil.copytree(tiny_checkpoints["llama"], source)
    damage(source / "model.safetensors", "truncated")
    assert moh(capsys, ["convert", "--no-calibration", str(source), str(tmp_path / "out"), "--dtype", "float16"]) == 2
    one_line_error(capsys, "convert", "weights file model.safetensors is truncated", "re-download the checkpoint")
    assert_nothing_written(tmp_path / "out")


# ---------------------------------------------------------------- 3. the model given to `moh calibrate`


@pytest.mark.parametrize("content", [b'{"model_type": "moh", ', b"\xff\xfe not text"])
def test_calibrate_refuses_a_config_that_is_not_json(tiny_moh, tmp_path, text_file, capsys, content):
    model = tmp_path / "model"
    shutil.copytree(tiny_moh, model)
    (model / "config.json").write_bytes(content)
    before = snapshot(model)
    assert moh(capsys, ["calibrate", str(model), "--calibration-data", str(text_file)]) == 2
    one_line_error(capsys, "calibrate", f"{model / 'config.json'} is not valid JSON", "re-convert the model")
    assert snapshot(model) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["calibration.txt", "model"]


def test_calibrate_refuses_a_model_without_tokenizer_files(tiny_moh, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_moh, model)
    for path in model.glob("tokenizer*"):
        path.unlink()
    assert moh(capsys, ["calibrate", str(model), "--calibration-data", "self"]) == 2
    one_line_error(capsys, "calibrate", f"{model} has no tokenizer files",
                   "copy the tokenizer of the model it came from")


# ---------------------------------------------------------------- 4. Hub dataset ids


def test_an_org_name_calibration_source_is_tried_as_a_hub_dataset(tiny_moh, tmp_path, capsys, monkeypatch):
    opened = []
    real_open_dataset = calibration_data.open_dataset

    def recording_open_dataset(name, *args, **kwargs):
        opened.append(name)
        return real_open_dataset(name, *args, **kwargs)  # offline (HF_HUB_OFFLINE=1): fails at once

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(calibration_data, "open_dataset", recording_open_dataset)
    check_calibration_source("Salesforce/wikitext", "text")  # a Hub id passes the up-front check
    before = snapshot(tiny_moh)
    assert moh(capsys, ["calibrate", str(tiny_moh), "--calibration-data", "Salesforce/wikitext",
                 "--output", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "calibrate", "no file Salesforce/wikitext, and the Hub dataset could not be read: ")
    assert opened == ["Salesforce/wikitext"]
    assert_nothing_written(tmp_path / "out")
    assert snapshot(tiny_moh) == before


@pytest.mark.parametrize("source", ["data/missing.txt", "./wikitext", "/nowhere/corpus", "a/b/c"])
def test_paths_that_cannot_be_dataset_ids_are_missing_files(source, monkeypatch):
    monkeypatch.setattr(calibration_data, "open_dataset", lambda *args: pytest.fail("tried as a Hub dataset"))
    with pytest.raises(MoHError, match=rf"calibration file {source} not found"):
        check_calibration_source(source, "text")


# ---------------------------------------------------------------- 5. `moh train` on a model without a tokenizer


def test_train_refuses_a_model_folder_without_tokenizer_files(tiny_moh, tmp_path, capsys, no_model_loading):
    model = tmp_path / "model"
    shutil.copytree(tiny_moh, model)
    for path in model.glob("tokenizer*"):
        path.unlink()
    text = tmp_path / "train.txt"
    text.write_text(synthetic_text(2000))
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe(model, text, tmp_path / "run")))
    assert moh(capsys, ["train", str(recipe_path)]) == 2
    one_line_error(capsys, "train", f"recipe key 'model': {model} has no tokenizer files",
                   "copy the tokenizer of the model it came from into it")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 6. calibration data checked before converting


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "calibration file {path} not found"),
        ("latin1.txt", LATIN1_TEXT.encode("latin-1"), "{path} is not UTF-8 text (invalid byte at position 3)"),
        ("bad.jsonl", b'{"text": "one"}\n{"text": "two"\n', "{path}:2 is not a JSON object with a 'text' field "
                                                            "(set --calibration-column)"),
        ("number.jsonl", b'{"text": 5}\n', "{path}:1: the 'text' field is a int, not text"),
        ("empty.txt", b"\n\n", "calibration file {path} holds no text"),
        ("folder", "folder", "calibration data {path} is a folder"),
    ],
)
def test_convert_checks_calibration_data_before_writing(tiny_checkpoints, tmp_path, capsys, no_weights_written,
                                                        name, content, message):
    path = tmp_path / name
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    assert moh(capsys, ["convert", str(tiny_checkpoints["llama"]), str(tmp_path / "out"), "--calibration-data",
                 str(path)]) == 2
    one_line_error(capsys, "convert", message.format(path=path))
    assert_nothing_written(tmp_path / "out")


def test_calibrate_checks_calibration_data_before_copying(tiny_moh, tmp_path, capsys, monkeypatch):
    from moh_convert.calibrate import api

    monkeypatch.setattr(api, "StagedFolder", lambda *args, **kwargs: pytest.fail("the model was staged first"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "hello"}\n')
    assert moh(capsys, ["calibrate", str(tiny_moh), "--calibration-data", str(bad)]) == 2
    one_line_error(capsys, "calibrate", f"{bad}:1 is not a JSON object with a 'text' field")
