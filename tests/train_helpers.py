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


def train_in_one_and_two_processes(recipe_path: Path, tmp_path: Path, port_base: int) -> tuple[list[dict], list[dict]]:
    """Run the recipe in one process (output_dir=one) and with accelerate's two-CPU-process launch (output_dir=two),
    from tmp_path; returns both runs' metrics."""
    import subprocess
    import sys

    env = child_env(tmp_path)
    single = subprocess.run([sys.executable, "-m", "moh_convert.train", str(recipe_path), "--set", "output_dir=one"],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC), "--main_process_port",
         str(port_base + os.getpid() % 300), "-m", "moh_convert.train", str(recipe_path), "--set", "output_dir=two"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    return read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
