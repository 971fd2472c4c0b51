"""Shared by the `moh train` tests: tiny converted models, recipes for them, and reading a run's outputs."""
import json
import os
from pathlib import Path

import yaml

import moh_convert

from .conftest import synthetic_text

REPO = Path(__file__).resolve().parents[1]
CPU_2PROC = REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"


def child_env(tmp_path: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "HF_MODULES_CACHE": str(tmp_path / "hf-modules")}


def tiny_moh_models(tiny_checkpoints: dict[str, Path], root: Path) -> dict[str, Path]:
    """Tiny llama converted twice (3 of 4 heads, 1 shared): query-norm router and learned router; plus text.
    (Each test module makes it its `tiny_moh` fixture.)"""
    folders = {
        "query-norm": moh_convert.convert(tiny_checkpoints["llama"], root / "moh-qn", active_heads=3, shared_heads=1, no_calibration=True),
        "learned": moh_convert.convert(tiny_checkpoints["llama"], root / "moh-learned", active_heads=3,
                                       shared_heads=1, router="learned", no_calibration=True),
        "text": root / "train.txt",
    }
    folders["text"].write_text(synthetic_text(12000))
    return folders


def tiny_recipe(model: Path, text: Path, output_dir: Path, **changes) -> dict:
    recipe = {
        "model": str(model), "output_dir": str(output_dir), "data": {"path": str(text)},
        "seq_len": 32, "max_steps": 6, "global_batch_tokens": 128, "micro_batch_size": 2,
        "learning_rate": 3e-3, "final_learning_rate": 3e-4, "warmup_steps": 2, "eval_windows": 2, "eval_every": 3,
    }
    recipe.update(changes)
    return recipe


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it). A port derived from the pid could be
    one that another job on a shared CI host already serves a rendezvous on; torchrun's workers then wait on the
    wrong store forever."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# A two-process run of a tiny recipe takes ~15 s here; a rendezvous that never completes must fail the test with its
# output instead of holding CI until its own time limit.
LAUNCH_TIMEOUT_S = 600


def run_process_group(command: list[str], timeout_s: float, **popen_kwargs) -> "subprocess.CompletedProcess | None":
    """Run command in its own session; on timeout kill the whole group (accelerate's launcher and its torchrun
    workers, which hold the output pipes: killing the launcher alone would leave the read blocked) and return None."""
    import signal
    import subprocess

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **popen_kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def train_in_one_and_two_processes(recipe_path: Path, tmp_path: Path) -> tuple[list[dict], list[dict]]:
    """Run the recipe in one process (output_dir=one) and with accelerate's two-CPU-process launch (output_dir=two),
    from tmp_path; returns both runs' metrics. The launch gets a fresh free port; if it hangs past LAUNCH_TIMEOUT_S
    (e.g. the port was taken between probing and binding), it is killed and tried once more on another port."""
    import shutil
    import sys

    env = child_env(tmp_path)
    single = run_process_group([sys.executable, "-m", "moh_convert.train", str(recipe_path), "--set", "output_dir=one"],
                               LAUNCH_TIMEOUT_S, env=env, cwd=tmp_path)
    assert single is not None and single.returncode == 0, single and single.stderr[-3000:]
    for _attempt in (1, 2):
        launched = run_process_group(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC), "--main_process_port",
             str(free_local_port()), "-m", "moh_convert.train", str(recipe_path), "--set", "output_dir=two"],
            LAUNCH_TIMEOUT_S, env=env, cwd=tmp_path)
        if launched is not None:
            break
        shutil.rmtree(tmp_path / "two", ignore_errors=True)
    assert launched is not None, f"the two-process launch hung past {LAUNCH_TIMEOUT_S} s twice"
    assert launched.returncode == 0, launched.stderr[-3000:]
    return read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
