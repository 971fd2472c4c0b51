"""`moh train`: the learning-rate schedule, routing losses, LoRA under MoH's hooks, distributed equivalence,
kill + resume, routers/LoRA saves. (Recipes: test_recipe.py; the token stream: test_token_stream.py.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moh_convert
from moh_convert import train as moh_train
from moh_convert.cli import main as moh_main
from moh_convert.modeling.modeling_moh import routing_modules

from .conftest import synthetic_text
from .train_helpers import (
    REPO, child_env, read_metrics, tiny_moh_models, tiny_recipe, train_in_one_and_two_processes, write_recipe,
)


@pytest.fixture(scope="module")
def tiny_moh(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    return tiny_moh_models(tiny_checkpoints, tmp_path_factory.mktemp("train-tiny"))


# ------------------------------------------------------------------------------------------- pieces of the loop


def test_learning_rate_warms_up_then_reaches_the_final_rate():
    recipe = moh_train.TrainRecipe(model="m", output_dir="o", data={"path": "x"}, max_steps=10, warmup_steps=2,
                                   learning_rate=1.0, final_learning_rate=0.1)
    rates = [moh_train.learning_rate_at(step, recipe, 10) for step in range(10)]
    assert rates[:3] == [0.5, 1.0, 1.0] and rates[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[1:], rates[2:]))


def test_routing_losses_follow_their_formulas(tiny_moh):
    model = AutoModelForCausalLM.from_pretrained(tiny_moh["learned"], dtype=torch.float32)
    with torch.no_grad():  # a learned router with non-zero weights, so routing is not uniform
        for name, parameter in model.named_parameters():
            if ".moh." in name:
                parameter.normal_(0, 0.5)
    routings = routing_modules(model)
    model.train()
    model(input_ids=torch.randint(4, 100, (2, 16)))
    moh_losses = moh_train.routing_losses(routings, "moh", with_z_loss=True)
    moa_losses = moh_train.routing_losses(routings, "moa", with_z_loss=True)
    expected_balance, expected_z = [], []
    for routing in routings:
        probs, mask, logits = routing.last_router_probs, routing.last_routed_mask, routing.last_router_logits
        expected_balance.append((probs.mean(dim=(0, 1)) * mask.mean(dim=(0, 1))).sum())
        expected_z.append((torch.logsumexp(logits, -1) ** 2).mean())
        # the recorded logits are the router's: softmax of them is the routing probabilities
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits.softmax(-1), probs)
    torch.testing.assert_close(moh_losses.load_balance_loss, torch.stack(expected_balance).mean())
    torch.testing.assert_close(moa_losses.load_balance_loss, torch.stack(expected_balance).mean() * 3 / 2)
    torch.testing.assert_close(moh_losses.z_loss, torch.stack(expected_z).mean())
    assert moh_losses.z_loss.requires_grad and moh_losses.z_loss > 0
    assert moh_train.routing_losses(routings, "moh", with_z_loss=False).z_loss == 0  # z-loss only when weighted
    assert moh_losses.load_balance_loss.requires_grad  # it trains the routers
    assert 0 < moh_losses.load_spread <= 1


@pytest.mark.parametrize("attention_path", ["sparse", "masked"])
def test_lora_on_o_proj_sees_the_gated_heads(tiny_moh, attention_path):
    """peft wraps o_proj and q_proj; MoH's hooks on them (the query-norm router's q_proj hook; the masked path's
    o_proj gate) must be re-attached to the wrappers, or the LoRA branches see ungated heads / queries the router
    does not read, and the merged model (which routes and gates everything) would differ from the trained one."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_moh["query-norm"], dtype=torch.float32).eval()
    model.set_attention_path(attention_path)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    input_ids = torch.randint(4, 100, (2, 12))
    with torch.no_grad():
        not_reattached = peft_model(input_ids=input_ids).logits
        routings = routing_modules(peft_model)
        assert len(routings) == 2
        for routing in routings:
            routing.attach(routing.attention_block)
            # the hooks now sit on peft's wrappers: the q_proj hook, and on the masked path the o_proj gate
            assert type(routing.attention_block.q_proj).__module__.startswith("peft")
            assert (routing.output_gate_handle is not None) == (attention_path == "masked")
        trained_view = peft_model(input_ids=input_ids).logits
        # What the merged save holds, loaded as a plain MoH model (merging drops the wrappers and their hooks).
        merged_model = AutoModelForCausalLM.from_pretrained(tiny_moh["query-norm"], dtype=torch.float32).eval()
        merged_model.load_state_dict(peft_model.merge_and_unload().state_dict())
        merged = merged_model(input_ids=input_ids).logits
    torch.testing.assert_close(trained_view, merged, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(not_reattached, merged, atol=1e-3)  # without re-attaching, training sees another model


def test_make_trainable_lora_reattaches_the_routing_hooks(tiny_moh, tmp_path):
    """`trainable: lora` puts every routing module's hooks on the LoRA wrappers (make_trainable re-attaches them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    recipe = moh_train.TrainRecipe(**tiny_recipe(tiny_moh["query-norm"], tiny_moh["text"], tmp_path / "run",
                                                 trainable="lora", lora={"target_modules": ["q_proj", "o_proj"]}))
    plan = moh_train.plan_training(recipe, num_processes=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_moh["query-norm"], dtype=torch.float32)
    model.set_attention_path("masked")
    model = moh_train.make_trainable(model, recipe, plan)
    for routing in routing_modules(model):
        attention = routing.attention_block
        assert isinstance(attention.q_proj, BaseTunerLayer) and isinstance(attention.o_proj, BaseTunerLayer)
        assert routing.input_hook_handle.id in attention.q_proj._forward_hooks
        assert routing.output_gate_handle.id in attention.o_proj._forward_pre_hooks
        assert not attention.q_proj.get_base_layer()._forward_hooks
        assert not attention.o_proj.get_base_layer()._forward_pre_hooks


def test_gradient_checkpointing_trains_the_same(tiny_moh, tmp_path):
    """Routing losses use router probabilities recorded inside checkpointed layers: with non-reentrant checkpointing
    their gradients still flow, so the run is the same as without checkpointing."""
    runs = {}
    for checkpointing in (False, True):
        output_dir = tmp_path / f"checkpointing-{checkpointing}"
        moh_train.train(tiny_recipe(tiny_moh["learned"], tiny_moh["text"], output_dir, max_steps=3, eval_windows=0,
                                    gradient_checkpointing=checkpointing))
        runs[checkpointing] = read_metrics(output_dir)
    for plain, recomputed in zip(runs[False], runs[True]):
        assert recomputed["loss"] == pytest.approx(plain["loss"], rel=1e-6)
        assert recomputed["load_balance_loss"] == pytest.approx(plain["load_balance_loss"], rel=1e-6)
    assert runs[False][-1]["load_balance_loss"] != runs[False][0]["load_balance_loss"]  # the routers did train


# ------------------------------------------------------------------------------------------- kill + resume

KILL_AFTER_FIRST_CHECKPOINT = r"""
import os, signal, sys
from moh_convert.cli import main
from moh_convert.train import loop
save_checkpoint = loop.save_checkpoint
def save_then_die(*args, **kwargs):
    save_checkpoint(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # as a node failure would: no cleanup, no final save
loop.save_checkpoint = save_then_die
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_sigkill_after_checkpoint_then_resume_matches_an_uninterrupted_run(tiny_moh, tmp_path, capsys):
    common = dict(save_every=2, eval_windows=2, eval_every=3)
    reference = tmp_path / "uninterrupted"
    moh_train.train(tiny_recipe(tiny_moh["query-norm"], tiny_moh["text"], reference, **common))

    run = tmp_path / "interrupted"
    recipe_path = write_recipe(tmp_path / "recipe.yaml",
                               tiny_recipe(tiny_moh["query-norm"], tiny_moh["text"], run, **common))
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_CHECKPOINT, str(recipe_path)],
                            capture_output=True, text=True, env=child_env(tmp_path), cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [m["step"] for m in read_metrics(run)] == [1, 2] and not (run / "model").exists()
    # A checkpoint being written when the process died is ignored on resume.
    (run / "checkpoints" / ".step-00000004.partial").mkdir()

    # The restart goes through the CLI entry point (in this process: no second interpreter start-up to wait for).
    assert moh_main(["train", str(recipe_path), "--resume"]) == 0
    assert "(step 2, 8 sequences done)" in capsys.readouterr().out

    expected, actual = read_metrics(reference), read_metrics(run)
    assert [m["step"] for m in actual] == [1, 2, 3, 4, 5, 6]
    for want, got in zip(expected, actual):
        assert (got["step"], got["sequences_consumed"], got["tokens"]) == (
            want["step"], want["sequences_consumed"], want["tokens"])
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), got["step"]
        assert got.get("heldout_perplexity") == pytest.approx(want.get("heldout_perplexity"), rel=1e-5)
    # On disk the same as one clean run: the dead run's unfinished checkpoint is gone, no hidden staging or lock.
    def listing(folder):
        return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))
    assert listing(run) == listing(reference)
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []
    final_expected, final_actual = tensors(reference / "model"), tensors(run / "model")
    assert final_expected.keys() == final_actual.keys()
    for name in final_expected:
        torch.testing.assert_close(final_actual[name], final_expected[name], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------- routers / LoRA saves

LOAD_WITHOUT_TOOLKIT = r"""
import json, sys
sys.modules["moh_convert"] = None  # any import of moh_convert now raises ImportError
import torch
from transformers import AutoModelForCausalLM
input_ids = torch.tensor([[5, 9, 13, 17, 21, 25, 29, 33]])
logits = {}
for path in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        logits[path] = model(input_ids=input_ids).logits[0, -1].tolist()
print("LOGITS" + json.dumps(logits))
"""


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    result = {}
    for shard in folder.glob("*.safetensors"):
        result.update(load_file(shard))
    return result


def test_trainable_routers_and_lora_save_models_that_load_without_the_toolkit(tiny_moh, tmp_path):
    source = tiny_moh["learned"]
    routers = moh_train.train(tiny_recipe(source, tiny_moh["text"], tmp_path / "routers", trainable="routers",
                                          max_steps=3, warmup_steps=0, eval_every=0))
    attention = moh_train.train(tiny_recipe(source, tiny_moh["text"], tmp_path / "attention", trainable="attention",
                                            max_steps=2, warmup_steps=0, eval_windows=0))
    lora = moh_train.train(tiny_recipe(source, tiny_moh["text"], tmp_path / "lora", trainable="lora", max_steps=3,
                                       warmup_steps=0, eval_every=0, lora={"r": 4, "alpha": 8}))
    adapter = moh_train.train(tiny_recipe(source, tiny_moh["text"], tmp_path / "adapter", trainable="lora",
                                          max_steps=2, warmup_steps=0, eval_windows=0,
                                          lora={"r": 4, "save": "adapter"}))
    before = tensors(source)

    # routers: only the router tensors moved
    after = tensors(routers)
    assert after.keys() == before.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(".moh." in name for name in changed), sorted(changed)[:5]

    # attention: the attention blocks' projections and routers moved; MLPs, norms and embeddings did not
    after = tensors(attention)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert all(".self_attn." in name for name in changed), sorted(changed)[:5]
    assert {name.split(".")[-2] for name in changed} >= {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert any(".moh." in name for name in changed)

    # lora, merged: same tensor names as a converted model, the adapted projections (not o_proj) changed
    after = tensors(lora)
    assert after.keys() == before.keys()
    changed = {name.split(".")[-2] for name in before if not torch.equal(before[name], after[name])}
    assert {"q_proj", "v_proj", "down_proj"} <= changed and "o_proj" not in changed, changed

    # both folders are laid out like `moh convert` output and carry a Training section
    for folder in (routers, attention, lora):
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == "moh" and config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_moh")
        assert (folder / "modeling_moh.py").read_bytes() == (REPO / "moh_convert/modeling/modeling_moh.py").read_bytes()
        assert (folder / "tokenizer.json").is_file()
        card = (folder / "README.md").read_text()
        assert "## Training" in card and "| trainable |" in card and "## Conversion" in card

    # adapter: a peft folder that applies to the converted model
    from peft import PeftModel

    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    PeftModel.from_pretrained(base, adapter)

    loaded = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_TOOLKIT, str(routers), str(lora)],
                            capture_output=True, text=True, env=child_env(tmp_path), cwd=tmp_path,
                            stdin=subprocess.DEVNULL)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    remote_logits = json.loads(loaded.stdout.split("LOGITS", 1)[1])
    input_ids = torch.tensor([[5, 9, 13, 17, 21, 25, 29, 33]])
    for folder in (routers, lora):  # the remote-code model computes what the toolkit's own class computes
        native = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            expected = native(input_ids=input_ids).logits[0, -1]
        torch.testing.assert_close(torch.tensor(remote_logits[str(folder)]), expected, atol=1e-5, rtol=1e-5)


def test_fsdp_config_wraps_each_family_decoder_layer(tiny_checkpoints, tmp_path):
    """recipes/accelerate/fsdp.yaml names no layer class: accelerate then wraps the model's `_no_split_modules`,
    which a MoH model takes from its source family (the decoder layer class differs per family)."""
    import yaml

    fsdp = yaml.safe_load((REPO / "recipes/accelerate/fsdp.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp
    for family in ("llama", "qwen3", "gemma3_text", "phi3"):
        folder = moh_convert.convert(tiny_checkpoints[family], tmp_path / family, active_heads=3, shared_heads=1, no_calibration=True)
        model = AutoModelForCausalLM.from_pretrained(folder)
        layer_classes = {type(layer).__name__ for layer in model.model.layers}
        assert set(model._no_split_modules) == layer_classes and len(layer_classes) == 1, family


# ------------------------------------------------------------------------------------------- 1 vs 2 processes


@pytest.fixture(scope="module")
def smollm2_moh_6of9(smollm2_folder, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted with the paper's defaults at 6 of 9 heads (4 shared + top-2 of 5)."""
    return moh_convert.convert(smollm2_folder, tmp_path_factory.mktemp("smollm2-train") / "moh-6of9", active_heads=6, no_calibration=True)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_on_smollm2(smollm2_moh_6of9, tmp_path):
    text = tmp_path / "valid.txt"
    wikitext = Path(os.environ.get("MOH_DATA_DIR", REPO.parent / "shared" / "data")) / "wikitext-2" / "valid.txt"
    text.write_text(wikitext.read_text()[:20000] if wikitext.is_file() else synthetic_text(4000))
    recipe = {
        "model": str(smollm2_moh_6of9), "output_dir": "run", "data": {"path": str(text)}, "seq_len": 32,
        "max_steps": 2, "global_batch_tokens": 64, "micro_batch_size": 1, "learning_rate": 1e-4,
        "final_learning_rate": 1e-5, "eval_windows": 2, "eval_every": 2,
    }
    recipe_path = write_recipe(tmp_path / "recipe.yaml", recipe)
    one, two = train_in_one_and_two_processes(recipe_path, tmp_path)
    assert json.loads((tmp_path / "two" / "model" / "training_summary.json").read_text())["processes"] == 2
    assert [m["step"] for m in two] == [m["step"] for m in one] == [1, 2]
    for a, b in zip(one, two):
        assert b["lr"] == a["lr"] and b["sequences_consumed"] == a["sequences_consumed"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["load_balance_loss"] == pytest.approx(a["load_balance_loss"], rel=1e-5, abs=1e-6)
    # held-out perplexity, computed by the two processes on one window each, matches too
    assert two[-1]["heldout_perplexity"] == pytest.approx(one[-1]["heldout_perplexity"], rel=1e-5)
    assert one[1]["loss"] != one[0]["loss"]  # the first step did train
