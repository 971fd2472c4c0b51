"""`moh train` with a `distill:` section: the teacher (by default the model the MoH folder was converted from),
the losses, and the same guarantees as plain training (resume after SIGKILL, DDP = one process)."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from moh_convert import MoHError
from moh_convert.cli import main as moh_main
from moh_convert.train import train
from moh_convert.train.distill import distillation_losses, next_token_loss
from moh_convert.train.recipe import DistillSettings

from .test_train import KILL_AFTER_FIRST_CHECKPOINT
from .train_helpers import (
    child_env, read_metrics, tiny_moh_models, tiny_recipe, train_in_one_and_two_processes, write_recipe,
)


@pytest.fixture(scope="module")
def tiny_moh(tiny_checkpoints, tmp_path_factory):
    return tiny_moh_models(tiny_checkpoints, tmp_path_factory.mktemp("distill-models"))


def test_losses_are_zero_when_the_student_is_the_teacher(tiny_checkpoints):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"]).eval()
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = model(input_ids=ids, output_hidden_states=True)
    for temperature in (1.0, 2.0):
        losses = distillation_losses(outputs, outputs, DistillSettings(temperature=temperature, hidden_states_weight=1))
        assert losses.kl.abs().item() < 1e-6 and losses.hidden.item() == 0.0
    # ... and positive otherwise: the KL of two different distributions, per token, times T^2.
    shifted = SimpleNamespace(logits=outputs.logits.roll(1, dims=-1), hidden_states=outputs.hidden_states)
    expected = torch.nn.functional.kl_div(shifted.logits.flatten(0, 1).log_softmax(-1),
                                          outputs.logits.flatten(0, 1).log_softmax(-1), log_target=True,
                                          reduction="batchmean")
    assert distillation_losses(shifted, outputs, DistillSettings()).kl.item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_logged_next_token_loss_is_the_models_own(tiny_checkpoints):
    """Distilling without a next-token term logs `loss` computed outside the graph: the same number as the model's
    loss with labels (metrics stay comparable with plain training runs)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"]).eval()
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    outputs = model(input_ids=ids, labels=ids)
    logged = next_token_loss(outputs.logits, ids)
    assert not logged.requires_grad
    assert logged.item() == pytest.approx(outputs.loss.item(), rel=1e-6)


def test_distillation_from_the_recorded_source_lowers_the_kl(tiny_moh, tmp_path):
    config = json.loads((tiny_moh["learned"] / "config.json").read_text())
    assert config["source_model"] and os.path.isdir(config["source_model"])  # recorded by moh convert
    run = tmp_path / "run"
    train(tiny_recipe(tiny_moh["learned"], tiny_moh["text"], run, max_steps=12, distill={"hidden_states_weight": 0.5},
                      learning_rate=1e-3, load_balance_coef=0.0))
    metrics = read_metrics(run)
    assert metrics[-1]["distill_kl"] < 0.5 * metrics[0]["distill_kl"]
    assert all("distill_hidden" in m and "loss" in m for m in metrics)
    summary = json.loads((run / "model" / "training_summary.json").read_text())
    assert summary["objective"].startswith(f"distillation from {config['source_model']}: KL at temperature 1")


def test_teacher_problems_are_one_line_before_any_model_loads(tiny_moh, tmp_path, monkeypatch):
    import moh_convert.train.loop as loop

    monkeypatch.setattr(loop, "load_model", lambda *args: pytest.fail("model loaded before the teacher was checked"))
    recipe = tiny_recipe(tiny_moh["learned"], tiny_moh["text"], tmp_path / "run",
                         distill={"teacher": str(tmp_path / "missing")})
    with pytest.raises(MoHError, match="recipe key 'distill.teacher'.*missing"):
        train(recipe)
    # A folder whose config records no source (converted by an older moh_convert, or dense): say what to set.
    old = tmp_path / "old"
    old.mkdir()
    for path in tiny_moh["learned"].iterdir():
        if path.is_file():
            (old / path.name).write_bytes(path.read_bytes())
    config = json.loads((old / "config.json").read_text())
    config.pop("source_model")
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoHError, match="set distill.teacher to the dense model's folder"):
        train(tiny_recipe(old, tiny_moh["text"], tmp_path / "run2", distill={}))


def test_resume_after_sigkill_gives_the_same_distillation_losses(tiny_moh, tmp_path):
    common = dict(save_every=2, eval_windows=2, eval_every=3, distill={"lm_loss_weight": 0.5})
    reference = tmp_path / "uninterrupted"
    train(tiny_recipe(tiny_moh["learned"], tiny_moh["text"], reference, **common))
    run = tmp_path / "interrupted"
    recipe_path = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tiny_moh["learned"], tiny_moh["text"], run, **common))
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_CHECKPOINT, str(recipe_path)],
                            capture_output=True, text=True, env=child_env(tmp_path), cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert moh_main(["train", str(recipe_path), "--resume"]) == 0
    expected, actual = read_metrics(reference), read_metrics(run)
    assert [m["step"] for m in actual] == [m["step"] for m in expected] == [1, 2, 3, 4, 5, 6]
    for want, got in zip(expected, actual):
        for key in ("loss", "distill_kl"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (key, got["step"])


def test_two_process_ddp_gives_the_same_distillation_losses(tiny_moh, tmp_path):
    recipe_path = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(
        tiny_moh["learned"], tiny_moh["text"], "run", max_steps=3, eval_every=3, distill={"lm_loss_weight": 0.5}))
    one, two = train_in_one_and_two_processes(recipe_path, tmp_path)
    assert [m["step"] for m in two] == [m["step"] for m in one] == [1, 2, 3]
    for a, b in zip(one, two):
        for key in ("loss", "distill_kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (key, a["step"])
    assert one[-1]["distill_kl"] != one[0]["distill_kl"]


def test_generated_training_text_is_written_once_and_reused_on_resume(tiny_moh, tmp_path, monkeypatch):
    """`data: {generate: default}`: the teacher's chat replies and free samples, interleaved, written once into the
    run folder; training reads them like a file."""
    import moh_convert.train.generated_text as generated_text

    calls = []
    original = generated_text.write_documents
    monkeypatch.setattr(generated_text, "write_documents", lambda *args: calls.append(1) or original(*args))
    run = tmp_path / "run"
    recipe = tiny_recipe(tiny_moh["learned"], tiny_moh["text"], run, max_steps=2, eval_windows=0, eval_every=0,
                         warmup_steps=0, save_every=1, distill={}, data={"generate": "default", "generate_tokens": 256})
    train(recipe)
    lines = [json.loads(line)["text"] for line in (run / "generated-text.jsonl").read_text().splitlines()]
    assert len(lines) >= 8 and all(lines)  # 128 chat + 128 sampled tokens in documents of seq_len (32) tokens
    assert calls == [1] and not list(run.glob(".generated-*"))
    summary = json.loads((run / "model" / "training_summary.json").read_text())
    assert summary["data"].startswith("generated: default (256 tokens written by ")
    # --resume (here: a longer run continuing from the last checkpoint) reads the same file, writes nothing new.
    before = (run / "generated-text.jsonl").read_bytes()
    recipe["max_steps"] = 3
    import shutil

    shutil.rmtree(run / "model")
    train(recipe, resume=True)
    assert calls == [1] and (run / "generated-text.jsonl").read_bytes() == before


@pytest.mark.parametrize("name, trainable", [("smollm2-135m-moh-distill.yaml", "all"),
                                             ("llama3-8b-moh75-distill.yaml", "all")])
def test_shipped_distillation_recipes_parse(name, trainable):
    from moh_convert.train.recipe import load_recipe

    from .train_helpers import REPO

    recipe = load_recipe(REPO / "recipes" / name)
    assert recipe.distill is not None and recipe.distill.kl_weight == 1.0 and recipe.trainable == trainable


def test_files_and_generated_text_mix_by_weight(tiny_moh, tmp_path):
    """`data: [{path: ...}, {generate: self, weight: ...}]`: each generated entry gets its own file, the run trains
    on both, and the summary lists each source with its share."""
    run = tmp_path / "run"
    recipe = tiny_recipe(tiny_moh["learned"], tiny_moh["text"], run, max_steps=2, eval_windows=0, eval_every=0,
                         warmup_steps=0, distill={}, data=[{"path": str(tiny_moh["text"]), "weight": 3},
                                                           {"generate": "self", "generate_tokens": 128}])
    train(recipe)
    assert (run / "generated-text-1.jsonl").is_file() and not (run / "generated-text.jsonl").exists()
    summary = json.loads((run / "model" / "training_summary.json").read_text())
    assert len(summary["data"]) == 2 and summary["data"][0] == f"75%: {tiny_moh['text']}"
    assert summary["data"][1].startswith("25%: generated: self (128 tokens written by ")
