"""The `moh` command line: flags mirror the Python API, errors are one line with exit code 2."""
import json
import shutil
import subprocess
import sys

import pytest

from moh_convert.cli import main


def run_moh(*args):
    return subprocess.run([sys.executable, "-m", "moh_convert", *map(str, args)], capture_output=True, text=True)


def test_console_script_is_installed():
    assert shutil.which("moh"), "pip install -e . should put the `moh` command on PATH"
    result = subprocess.run(["moh", "convert", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ("--active-heads", "--active-ratio", "--shared-heads", "--shared-ratio", "--router", "--dtype", "--overwrite"):
        assert flag in result.stdout


def test_convert_flags_reach_the_api(tiny_checkpoints, tmp_path):
    code = main(["convert", "--no-calibration", str(tiny_checkpoints["phi3"]), str(tmp_path / "out"), "--active-heads", "3",
                 "--shared-heads", "1", "--router", "learned", "--dtype", "float16"])
    assert code == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["routed_top_k"] == 2 and config["shared_heads"][0] == [0] and config["router"] == "learned"
    assert config["text_config"]["dtype"] == "float16"


@pytest.mark.parametrize(
    "extra_args, message",
    [
        (["--active-heads", "7"], "--active-heads 7 is more than the model's 4 attention heads"),
        (["--active-heads", "2", "--shared-heads", "3"], "--shared-heads 3 is more than --active-heads 2"),
    ],
)
def test_bad_head_counts_exit_with_one_line(tiny_checkpoints, tmp_path, extra_args, message):
    result = run_moh("convert", "--no-calibration", tiny_checkpoints["llama"], tmp_path / "out", *extra_args)
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("moh convert: error:")]
    assert len(error_lines) == 1 and message in error_lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tiny_checkpoints, tmp_path):
    (tmp_path / "out").mkdir()
    result = run_moh("convert", "--no-calibration", tiny_checkpoints["llama"], tmp_path / "out")
    assert result.returncode == 2
    assert "already exists; pass --overwrite" in result.stderr and "Traceback" not in result.stderr


def test_every_command_help_renders_its_option_texts():
    """`moh COMMAND --help` works for every command and shows each option's description as written (a literal % in
    a description once made argparse's help formatting raise)."""
    from moh_convert.cli import build_parser

    subparsers = next(action for action in build_parser()._actions if action.dest == "command")
    for name, parser in subparsers.choices.items():
        assert "usage:" in parser.format_help(), name
    convert_help = " ".join(subparsers.choices["convert"].format_help().split())
    assert "at most ~11% less attention output" in convert_help
