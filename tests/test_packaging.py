"""`pip install .` (not editable) gives a working `moh eval`: the suites and local-twin specs ship inside the wheel.

The package is built from a clean copy of the checkout and installed into a fresh virtual environment that borrows
torch, transformers and lm-eval from the system site; everything then runs from a folder outside the checkout. The
system site also holds the editable install of moh_convert, so the test checks that the environment's own copy is
the one imported and the one whose suites are read.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .test_evaluate import REAL_EVAL_DATA, REPO_ROOT, tiny_models  # noqa: F401 (fixture)

# Never part of a build: version control, caches and earlier build output (a stale build/lib would leak into the
# wheel), and the checkout's own output folders.
NOT_BUILD_INPUTS = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".venv", "demo-output", "bench-output",
    "runs",
)


def outside_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(command: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(part) for part in command], cwd=cwd, env=outside_env(), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """{"venv", "elsewhere"}: a fresh venv with moh_convert installed from a wheel, and a folder outside the checkout."""
    root = tmp_path_factory.mktemp("wheel-install")
    # Building in the checkout itself would write build/ and *.egg-info there; a copy leaves it untouched.
    source = root / "source"
    shutil.copytree(REPO_ROOT, source, ignore=NOT_BUILD_INPUTS)
    venv = root / "venv"
    # --without-pip: pip and setuptools come from the system site too. The setuptools that ensurepip would put in
    # the venv (65.x) has no bdist_wheel of its own, so it cannot build offline next to wheel>=0.46. Installs go to
    # the venv (sys.prefix) all the same; the system's editable moh_convert is left alone ("outside environment").
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    install = run([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                   "--disable-pip-version-check", "-q", source], cwd=root)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return {"venv": venv, "elsewhere": elsewhere}


def is_inside(path: str | Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


@pytest.mark.slow
def test_the_venvs_own_copy_and_its_suites_are_used(installed):
    venv, elsewhere = installed["venv"], installed["elsewhere"]
    probe = run([venv / "bin" / "python", "-c",
                 "import moh_convert, moh_convert.eval_tasks as tasks; from importlib import resources; "
                 "print(moh_convert.__file__); print(tasks.SUITES_FILE); print(tasks.LAYOUTS_FILE); "
                 "texts = resources.files('moh_convert.calibrate') / 'texts'; "
                 "print(texts / 'prose.txt'); print(texts / 'math.txt'); print(texts / 'README.md')"], cwd=elsewhere)
    assert probe.returncode == 0, probe.stderr[-3000:]
    paths = probe.stdout.strip().splitlines()
    assert len(paths) == 6, probe.stdout  # the calibration texts ship too: the default calibration reads them
    for path in paths:
        assert is_inside(path, venv) and not is_inside(path, REPO_ROOT), paths
    assert all(Path(path).is_file() for path in paths), paths

    help_text = run([venv / "bin" / "moh", "eval", "--help"], cwd=elsewhere)
    assert help_text.returncode == 0, help_text.stderr[-3000:]
    assert "suites (task(few-shot count))" in help_text.stdout
    assert "paper: mmlu(5), ceval-valid(5)" in help_text.stdout and "quick: " in help_text.stdout


@pytest.mark.slow
@pytest.mark.skipif(not REAL_EVAL_DATA.is_dir(), reason=f"no benchmark files in {REAL_EVAL_DATA}")
def test_moh_eval_runs_from_the_installed_wheel(installed, tiny_models):  # noqa: F811 (fixture)
    venv, elsewhere = installed["venv"], installed["elsewhere"]
    model = tiny_models["moh_3of4"]
    result = run([venv / "bin" / "moh", "eval", model, "--data-dir", REAL_EVAL_DATA, "--tasks", "arc_easy",
                  "--limit", "5"], cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| arc_easy | acc_norm | 0 |" in result.stdout
    output = elsewhere / f"eval-{model.name}"  # the default output folder, in the working directory
    for name in ("results_moh.json", "comparison.json", "results_table.md", "local_tasks/arc_easy.yaml",
                 "local_tasks/local_layouts.py"):
        assert (output / name).is_file(), name
    comparison = json.loads((output / "comparison.json").read_text())
    assert [row["task"] for row in comparison["tasks"]] == ["arc_easy"]
    assert json.loads((output / "results_moh.json").read_text())["n-samples"]["arc_easy"]["effective"] == 5
