"""Every command that writes a folder: never the source or a folder around it, --overwrite only over what
moh_convert wrote, one run per output at a time, nothing half-written left behind by a killed run."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import moh_convert
from moh_convert.cli import main
from moh_convert.model_folder import OutputLock

from .conftest import synthetic_text
from .train_helpers import child_env

CALIBRATION = ["--calibration-tokens", "256", "--calibration-seq-len", "32", "--calibration-heldout-tokens", "64"]


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` (hidden ones included) -> file content (None for folders)."""
    return {str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes()
            for path in sorted(folder.rglob("*"))}


def names(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"moh {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture()
def source(tiny_checkpoints, tmp_path) -> Path:
    """A copy of the tiny llama in its own folder, next to an unrelated file of the user's."""
    import shutil

    folder = tmp_path / "work" / "src"
    shutil.copytree(tiny_checkpoints["llama"], folder)
    (tmp_path / "work" / "notes.txt").write_text("the user's own file")
    return folder


def test_convert_refuses_output_equal_to_the_source(source, capsys):
    before = tree(source.parent)
    assert main(["convert", "--no-calibration", str(source), str(source), "--overwrite"]) == 2
    assert "is the source itself" in error_line(capsys, "convert")
    assert tree(source.parent) == before


def test_convert_refuses_output_around_the_source(source, capsys):
    before = tree(source.parent)
    assert main(["convert", "--no-calibration", str(source), str(source.parent), "--overwrite"]) == 2
    assert "contains the source" in error_line(capsys, "convert")
    assert tree(source.parent) == before


def test_convert_refuses_output_inside_the_source(source, capsys):
    before = tree(source.parent)
    assert main(["convert", "--no-calibration", str(source), str(source / "moh")]) == 2
    assert "lies inside the source" in error_line(capsys, "convert")
    assert tree(source.parent) == before


def test_overwrite_replaces_only_what_moh_convert_wrote(source, tmp_path, capsys):
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "cat.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["convert", "--no-calibration", str(source), str(unrelated), "--overwrite"]) == 2
    assert "is not a MoH model folder" in error_line(capsys, "convert")
    assert (unrelated / "cat.jpg").read_bytes() == b"\xff\xd8 not really a jpeg"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert", "--no-calibration", str(source), str(empty), "--overwrite"]) == 0
    assert (empty / "config.json").is_file()
    # A MoH folder written earlier is replaced, with the new settings.
    assert main(["convert", "--no-calibration", str(source), str(empty), "--overwrite", "--active-heads", "2", "--shared-heads", "1"]) == 0
    assert '"routed_top_k": 1' in (empty / "config.json").read_text()


def test_output_path_through_a_file_is_one_line(source, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    assert main(["convert", "--no-calibration", str(source), str(tmp_path / "a-file" / "out")]) == 2
    assert "is a file, not a folder" in error_line(capsys, "convert")
    assert main(["convert", "--no-calibration", str(source), str(tmp_path / "a-file"), "--overwrite"]) == 2
    assert "is a file" in error_line(capsys, "convert")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_parent_is_one_line(source, tmp_path, capsys):
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["convert", "--no-calibration", str(source), str(locked / "out")]) == 2
        assert "permission denied" in error_line(capsys, "convert")
    finally:
        locked.chmod(0o755)


def test_a_second_run_on_the_same_output_is_refused(source, tmp_path, capsys):
    output = tmp_path / "out"
    with OutputLock(output):  # what a first run holds for its whole duration
        assert main(["convert", "--no-calibration", str(source), str(output)]) == 2
        assert "another moh command is writing" in error_line(capsys, "convert")
    assert not output.exists()
    assert not (tmp_path / ".out.lock").exists()  # the lock file goes with the lock


def test_an_output_that_appears_during_the_run_is_left_alone(source, tmp_path, monkeypatch, capsys):
    import importlib

    convert_module = importlib.import_module("moh_convert.convert")  # (the package's `convert` is the function)
    output = tmp_path / "out"
    real_write_model_card = convert_module.write_model_card

    def write_card_while_someone_creates_output(*args, **kwargs):
        output.mkdir()
        (output / "theirs.txt").write_text("written by someone else meanwhile")
        return real_write_model_card(*args, **kwargs)

    monkeypatch.setattr(convert_module, "write_model_card", write_card_while_someone_creates_output)
    assert main(["convert", "--no-calibration", str(source), str(output)]) == 2
    assert "appeared while this run was working" in error_line(capsys, "convert")
    assert names(output) == ["theirs.txt"]
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def test_calibrate_output_must_stay_clear_of_the_model(source, tmp_path, capsys):
    moh = moh_convert.convert(source, tmp_path / "moh", active_heads=2, shared_heads=1, no_calibration=True)
    text = tmp_path / "text.txt"
    text.write_text(synthetic_text(800))
    before = tree(moh)
    assert main(["calibrate", str(moh), "--calibration-data", str(text), "--output", str(moh / "calibrated"),
                 *CALIBRATION]) == 2
    assert "lies inside the source" in error_line(capsys, "calibrate")
    assert tree(moh) == before


def test_eval_refuses_to_replace_a_folder_it_did_not_write(tmp_path, capsys):
    import shutil

    output = tmp_path / "results"
    output.mkdir()
    (output / "thesis.tex").write_text("months of work")
    # The model check comes first and needs a real folder: the pre-refactor llama is small and complete.
    model = tmp_path / "model"
    shutil.copytree(Path(__file__).parent / "data" / "pre_refactor" / "llama-paper", model)
    assert main(["eval", str(model), "--tasks", "arc_easy", "--output", str(output)]) == 2
    assert "is not a `moh eval` output folder" in error_line(capsys, "eval")
    assert names(output) == ["thesis.tex"]


def test_eval_checks_the_baseline_before_evaluating(tmp_path, capsys, monkeypatch):
    import moh_convert.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "evaluate_one_model",
                        lambda *args, **kwargs: pytest.fail("the model was evaluated before the baseline was checked"))
    model = Path(__file__).parent / "data" / "pre_refactor" / "llama-paper"
    assert main(["eval", str(model), "--tasks", "arc_easy", "--baseline", str(tmp_path / "missing-folder"),
                 "--output", str(tmp_path / "out")]) == 2
    assert "--baseline" in error_line(capsys, "eval")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- killed runs


KILL_WHEN_CALLED = r"""
import importlib, os, signal, sys
module_name, function_name = sys.argv[1], sys.argv[2]
module = importlib.import_module(module_name)
real = getattr(module, function_name)
def die(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup at all, as a power cut or the OOM killer
setattr(module, function_name, die)
from moh_convert.cli import main
sys.exit(main(sys.argv[3:]))
"""


def run_killed(module: str, function: str, args: list[str], tmp_path: Path) -> None:
    killed = subprocess.run([sys.executable, "-c", KILL_WHEN_CALLED, module, function, *args],
                            capture_output=True, text=True, env=child_env(tmp_path), cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]


@pytest.mark.parametrize("function", ["write_weights", "write_model_card", "calibrate_folder"])
def test_killed_convert_then_rerun_leaves_what_one_clean_run_leaves(source, tmp_path, function, capsys):
    text = tmp_path / "text.txt"
    text.write_text(synthetic_text(800))
    args = ["--active-heads", "2", "--calibration-data", str(text), *CALIBRATION]
    clean = tmp_path / "clean"
    clean.mkdir()
    assert main(["convert", str(source), str(clean / "out"), *args]) == 0

    killed = tmp_path / "killed"
    killed.mkdir()
    run_killed("moh_convert.convert", function, ["convert", str(source), str(killed / "out"), *args], tmp_path)
    assert not (killed / "out").exists()
    assert any(name.startswith(".out.partial-") for name in names(killed))  # what the dead run left
    capsys.readouterr()
    assert main(["convert", str(source), str(killed / "out"), *args]) == 0
    assert "removed 1 unfinished folder(s) of an interrupted earlier run" in capsys.readouterr().err
    assert names(killed) == names(clean)


def test_killed_calibrate_then_rerun_leaves_what_one_clean_run_leaves(source, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(synthetic_text(800))
    runs = {}
    for name in ("clean", "killed"):
        runs[name] = tmp_path / name
        moh_convert.convert(source, runs[name] / "moh", active_heads=2, shared_heads=1, no_calibration=True)
    args = ["--calibration-data", str(text), *CALIBRATION]
    assert main(["calibrate", str(runs["clean"] / "moh"), *args]) == 0
    before = tree(runs["killed"] / "moh")
    run_killed("moh_convert.calibrate.run", "calibrate_layer", ["calibrate", str(runs["killed"] / "moh"), *args],
               tmp_path)
    assert tree(runs["killed"] / "moh") == before  # in place: MoH folder untouched until the new one is complete
    assert main(["calibrate", str(runs["killed"] / "moh"), *args]) == 0
    assert names(runs["killed"]) == names(runs["clean"])


def test_a_second_training_run_on_the_same_output_dir_is_refused(source, tmp_path, capsys):
    from .train_helpers import tiny_recipe, write_recipe

    moh = moh_convert.convert(source, tmp_path / "moh", active_heads=3, shared_heads=1, no_calibration=True)
    text = tmp_path / "train.txt"
    text.write_text(synthetic_text(2000))
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(moh, text, run, max_steps=1, warmup_steps=0, eval_windows=0))
    with OutputLock(run):
        assert main(["train", str(recipe)]) == 2
        assert "another moh command is writing" in error_line(capsys, "train")
    assert not (run / "model").exists()
    # and a training run may not write into the model it trains
    inside = write_recipe(tmp_path / "inside.yaml", tiny_recipe(moh, text, moh / "run", max_steps=1, warmup_steps=0, eval_windows=0))
    assert main(["train", str(inside)]) == 2
    assert "lies inside the source" in error_line(capsys, "train")
    assert not (moh / "run").exists()
