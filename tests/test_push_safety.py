"""`moh push` runs nothing from a folder whose Python code is not moh_convert's: a modified modeling file, an
auto_map pointing elsewhere, an extra .py file or a tokenizer auto_map is refused in one line before any load check;
the load check gets a minimal environment (no HF_TOKEN); --allow-custom-code uploads such code without running it;
folders written by an earlier release (tests/data/pre_refactor, commit e40e73e) are accepted."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from moh_convert import MoHError, hub
from moh_convert import folder_checks
from moh_convert.cli import main
from moh_convert.model_folder import MODELING_DIR

from .test_hub import RecordingHub, moh_folder, tiny_moh_template  # noqa: F401 (fixtures)

PRE_REFACTOR = Path(__file__).parent / "data" / "pre_refactor"
CUSTOM_CODE_HINT = "re-run `moh convert`, or pass --allow-custom-code if you wrote it yourself"


@pytest.fixture
def marker(tmp_path) -> Path:
    """A file that code planted in the folder creates when it is imported: it must never appear."""
    return tmp_path / "code-from-the-folder-ran"


def plant(path: Path, marker: Path, base: Path | None = None) -> None:
    """Write PATH as BASE's code (default: PATH's own) plus a line that creates MARKER at import."""
    code = (base or path).read_text()
    path.write_text(code + f"\nopen({str(marker)!r}, 'w').close()\n")


@pytest.fixture
def subprocess_runs(monkeypatch) -> list[dict]:
    """Records the keyword arguments (env included) of every subprocess.run, then runs it for real."""
    calls, real_run = [], subprocess.run

    def recording_run(*args, **kwargs):
        calls.append(kwargs)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(folder_checks.subprocess, "run", recording_run)
    return calls


def refusal(folder: Path, **options) -> str:
    with pytest.raises(MoHError) as raised:
        hub.push(folder, "me/tiny-moh", **options)
    message = str(raised.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- refused before anything runs


def test_planted_code_does_run_when_the_folder_is_loaded(moh_folder, marker):
    # What the refusals below prevent: the load check imports the folder's modeling code.
    plant(moh_folder / "modeling_moh.py", marker)
    folder_checks.check_loads_in_fresh_process(moh_folder)
    assert marker.exists()


def test_modified_modeling_file_is_refused_before_it_runs(moh_folder, marker, monkeypatch, subprocess_runs):
    plant(moh_folder / "modeling_moh.py", marker)
    digest = folder_checks.file_sha256(moh_folder / "modeling_moh.py")

    message = refusal(moh_folder, dry_run=True)
    assert message == (
        f"modeling_moh.py differs from the modeling code moh_convert ships (sha256 {digest}); {CUSTOM_CODE_HINT}"
    )
    fake_hub = RecordingHub(monkeypatch)  # a real push: refused the same way, the Hub never called
    assert refusal(moh_folder) == message
    assert fake_hub.calls == []
    assert subprocess_runs == [] and not marker.exists()


def point_auto_map_at_evil(folder: Path, marker: Path) -> None:
    plant(folder / "evil.py", marker, base=folder / "modeling_moh.py")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "evil.MoHForCausalLM"
    (folder / "config.json").write_text(json.dumps(config))


def add_unreferenced_file(folder: Path, marker: Path) -> None:
    plant(folder / "helpers.py", marker, base=folder / "modeling_moh.py")


def add_file_in_subfolder(folder: Path, marker: Path) -> None:
    (folder / "extras").mkdir()
    plant(folder / "extras" / "tool.py", marker, base=folder / "modeling_moh.py")


def add_tokenizer_auto_map(folder: Path, marker: Path) -> None:
    # Refused for the auto_map alone (with its file next to it, that .py file would be refused first).
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


def modify_configuration_file(folder: Path, marker: Path) -> None:
    plant(folder / "configuration_moh.py", marker)


def add_auto_map_entry(folder: Path, marker: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoTokenizer"] = [None, "modeling_moh.MoHForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "tamper, message",
    [
        (point_auto_map_at_evil, "config.json's auto_map differs from the one moh_convert writes (AutoModelForCausalLM: "
         "'evil.MoHForCausalLM' instead of 'modeling_moh.MoHForCausalLM'), so loading the folder would run code "
         f"moh_convert does not ship; {CUSTOM_CODE_HINT}"),
        (add_auto_map_entry, "config.json's auto_map differs from the one moh_convert writes (AutoTokenizer: "
         "[None, 'modeling_moh.MoHForCausalLM'] instead of None)"),
        (add_unreferenced_file, "helpers.py is Python code moh_convert does not ship (a MoH folder holds only "
         "configuration_moh.py and modeling_moh.py); remove it, or pass --allow-custom-code if you wrote it yourself"),
        (add_file_in_subfolder, "extras/tool.py is Python code moh_convert does not ship"),
        (add_tokenizer_auto_map, 'tokenizer_config.json has an auto_map ({"AutoTokenizer": [null, '
         '"tokenization_evil.EvilTokenizer"]}): a custom tokenizer class would run code from the folder; remove it, '
         "or pass --allow-custom-code if you wrote it yourself"),
        (modify_configuration_file, "configuration_moh.py differs from the modeling code moh_convert ships (sha256 "),
    ],
)
def test_code_that_is_not_ours_is_refused_before_it_runs(moh_folder, marker, subprocess_runs, tamper, message):
    tamper(moh_folder, marker)
    assert message in refusal(moh_folder, dry_run=True)
    assert subprocess_runs == [] and not marker.exists()


def test_cli_refusal_is_one_line_and_exit_code_2(moh_folder, marker, capsys, subprocess_runs):
    plant(moh_folder / "modeling_moh.py", marker)
    assert main(["push", str(moh_folder), "me/x", "--dry-run"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err and captured.out == ""
    assert lines[0].startswith("moh push: error: modeling_moh.py differs from the modeling code moh_convert ships")
    assert subprocess_runs == [] and not marker.exists()


# ---------------------------------------------------------------- the load check's environment


def test_load_check_environment_holds_no_token(moh_folder, tmp_path, monkeypatch, subprocess_runs):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_marker")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_secret_marker")
    monkeypatch.setenv("SOME_API_KEY", "hf_secret_marker")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "users-hf-home"))

    result = hub.push(moh_folder, "me/tiny-moh", dry_run=True)  # a good folder still passes

    assert not result.load_check_skipped
    (call,) = subprocess_runs
    env = call["env"]
    assert "HF_TOKEN" not in env and "HUGGING_FACE_HUB_TOKEN" not in env
    assert not any("hf_secret_marker" in value for value in env.values())
    assert set(env) <= {
        "PATH", "LANG", "LC_ALL", "PYTHONPATH", "PYTHONHOME", "LD_LIBRARY_PATH", "PYTHONUSERBASE", "HOME", "TMPDIR",
        "HF_HOME", "HF_MODULES_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
    }
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    work_dir = Path(env["HOME"])
    assert call["cwd"] == env["TMPDIR"] == str(work_dir)
    assert {Path(env["HF_HOME"]).parent, Path(env["HF_MODULES_CACHE"]).parent} == {work_dir}
    assert not work_dir.exists()  # a temporary folder, removed after the check


# ---------------------------------------------------------------- --allow-custom-code


def test_allow_custom_code_uploads_it_without_running_it(moh_folder, marker, capsys, monkeypatch, subprocess_runs):
    plant(moh_folder / "modeling_moh.py", marker)
    add_unreferenced_file(moh_folder, marker)

    assert main(["push", str(moh_folder), "me/tiny-moh", "--dry-run", "--allow-custom-code"]) == 0
    printed = capsys.readouterr().out
    for name in ("modeling_moh.py", "helpers.py"):
        assert f"{(moh_folder / name).stat().st_size:,} bytes  {name}\n" in printed
    assert hub.LOAD_CHECK_SKIPPED_MESSAGE in printed
    assert "Load check skipped: with --allow-custom-code" in printed and "nothing was uploaded" in printed

    fake_hub = RecordingHub(monkeypatch)
    result = hub.push(moh_folder, "me/tiny-moh", allow_custom_code=True)
    assert result.load_check_skipped
    (args, _, _), = fake_hub.named("create_commit")
    assert {"modeling_moh.py", "helpers.py"} <= {operation.path_in_repo for operation in args[1]}
    assert subprocess_runs == [] and not marker.exists()


# ---------------------------------------------------------------- folders of an earlier release


def test_code_of_the_e40e73e_release_is_accepted():
    # Only llama-calibrated keeps the modeling files that release wrote (the other folders' were identical copies).
    folder_checks.check_code_is_shipped(PRE_REFACTOR / "llama-calibrated")


def test_dry_run_accepts_a_folder_written_at_e40e73e(tmp_path, subprocess_runs):
    folder = Path(shutil.copytree(PRE_REFACTOR / "llama-calibrated", tmp_path / "llama-calibrated"))
    # Its modeling_moh.py is the e40e73e one, not today's: accepted through known_modeling_files.json.
    assert folder_checks.file_sha256(folder / "modeling_moh.py") != folder_checks.file_sha256(
        MODELING_DIR / "modeling_moh.py"
    )
    result = hub.push(folder, "me/llama-moh", dry_run=True)
    assert "modeling_moh.py" in {upload.path_in_repo for upload in result.files}
    assert len(subprocess_runs) == 1  # and it loaded in the fresh Python
