"""Calibration: layer-by-layer fitting of shared heads and routers, checked against the full model."""
import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import moh_convert
from moh_convert import MoHError
from moh_convert.calibrate import CalibrationSettings, calibrate, load_calibration_windows
from moh_convert.perplexity import perplexity

from .conftest import synthetic_text

SETTINGS = dict(calibration_tokens=1024, calibration_seq_len=64, calibration_heldout_tokens=256, calibration_batch_size=4)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calibration-text") / "text.txt"
    path.write_text(synthetic_text(2000))
    return path


def converted(tiny_checkpoints, model_type, folder, **options):
    return moh_convert.convert(tiny_checkpoints[model_type], folder, active_heads=2, shared_heads=1, **options, no_calibration=True)


def heldout_windows(folder, text_file):
    settings = CalibrationSettings(calibration_data=str(text_file), **SETTINGS)
    return load_calibration_windows(settings, AutoTokenizer.from_pretrained(folder), folder)[1]


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text", "phi3"])
def test_layerwise_calibration_matches_the_saved_model(model_type, tiny_checkpoints, text_file, tmp_path):
    # The report's perplexities come from the layer-by-layer machinery (meta-device skeleton, recorded masks and
    # position embeddings); the saved model, loaded normally, must give the same numbers on the same windows.
    out = converted(tiny_checkpoints, model_type, tmp_path / "moh")
    calibrate(out, calibration_data=str(text_file), **SETTINGS)
    report = json.loads((out / "calibration_report.json").read_text())
    windows = heldout_windows(out, text_file)
    calibrated = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    dense = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[model_type], dtype=torch.float32)
    ppl = report["heldout_perplexity"]
    assert perplexity(calibrated, windows, progress=False) == pytest.approx(ppl["after"], rel=2e-3)
    assert perplexity(dense, windows, progress=False) == pytest.approx(ppl["dense"], rel=2e-3)


def test_calibrated_config_and_files(tiny_checkpoints, text_file, tmp_path):
    out = converted(tiny_checkpoints, "llama", tmp_path / "moh")
    calibrate(out, calibration_data=str(text_file), **SETTINGS)
    config = json.loads((out / "config.json").read_text())
    assert config["router"] == "learned" and config["head_fallback"] is True and config["router_bias"] is True
    for layer, shared in enumerate(config["shared_heads"]):
        assert len(shared) + config["routed_top_k"][layer] == 2, "active heads per layer must stay as converted"
    report = json.loads((out / "calibration_report.json").read_text())
    assert report["calibration_tokens"] == 1024 and len(report["layers"]) == 2
    assert [layer["shared_heads"] for layer in report["layers"]] == config["shared_heads"]
    assert "## Calibration" in (out / "README.md").read_text()
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["model.layers.1.self_attn.moh.router.routed_proj.weight"] == "model-moh-routers.safetensors"
    assert index["model.layers.1.self_attn.moh.head_fallback"] == "model-moh-routers.safetensors"
    # Unselected heads output a constant, so the model keeps working with any padding/batching.
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generate(torch.tensor([[1, 40, 41, 42]]), max_new_tokens=4, do_sample=False).shape == (1, 8)


def test_calibration_moves_the_model_towards_dense(tiny_checkpoints, text_file, tmp_path):
    out = converted(tiny_checkpoints, "mistral", tmp_path / "moh")
    before = AutoModelForCausalLM.from_pretrained(out).eval()
    calibrate(out, calibration_data=str(text_file), **SETTINGS)
    after = AutoModelForCausalLM.from_pretrained(out).eval()
    dense = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["mistral"]).eval()
    windows = heldout_windows(out, text_file)
    with torch.no_grad():
        reference = dense(windows).logits
        error_before = (before(windows).logits - reference).pow(2).mean()
        error_after = (after(windows).logits - reference).pow(2).mean()
    assert error_after < error_before


def test_calibration_is_deterministic(tiny_checkpoints, text_file, tmp_path):
    tensors = []
    for name in ("a", "b"):
        out = converted(tiny_checkpoints, "llama", tmp_path / name)
        calibrate(out, calibration_data=str(text_file), **SETTINGS)
        with safe_open(out / "model-moh-routers.safetensors", framework="pt") as handle:
            tensors.append({key: handle.get_tensor(key) for key in handle.keys()})
    assert tensors[0].keys() == tensors[1].keys()
    assert all(torch.equal(tensors[0][key], tensors[1][key]) for key in tensors[0])


def test_fixed_number_of_shared_heads(tiny_checkpoints, text_file, tmp_path):
    out = moh_convert.convert(tiny_checkpoints["llama"], tmp_path / "moh", active_heads=3, shared_heads=1, no_calibration=True)
    calibrate(out, calibration_data=str(text_file), shared_heads=2, **SETTINGS)
    config = json.loads((out / "config.json").read_text())
    assert [len(shared) for shared in config["shared_heads"]] == [2, 2]
    assert config["routed_top_k"] == [1, 1]


def test_convert_with_calibration_and_output_option(tiny_checkpoints, text_file, tmp_path):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": line}) for line in synthetic_text(2000).split(". ")))
    out = moh_convert.convert(
        tiny_checkpoints["granite"], tmp_path / "moh", active_heads=3, calibration_data=str(jsonl),
        calibration_column="body", **SETTINGS,
    )
    report = json.loads((out / "calibration_report.json").read_text())
    assert report["calibration_data"] == str(jsonl)
    # `moh calibrate --output` leaves the input model untouched.
    plain = converted(tiny_checkpoints, "llama", tmp_path / "plain")
    calibrate(plain, output=str(tmp_path / "calibrated"), calibration_data=str(text_file), **SETTINGS)
    assert not (plain / "calibration_report.json").exists()
    assert json.loads((plain / "config.json").read_text())["router"] == "query-norm"
    assert (tmp_path / "calibrated" / "calibration_report.json").exists()


def test_self_generated_calibration_data(tiny_checkpoints, tmp_path):
    out = converted(tiny_checkpoints, "llama", tmp_path / "moh")
    calibrate(out, calibration_data="self", calibration_tokens=256, calibration_seq_len=32, calibration_heldout_tokens=64)
    report = json.loads((out / "calibration_report.json").read_text())
    assert report["calibration_data"] == "self" and report["calibration_tokens"] == 256
    assert report["self_sampling"]["temperature"] > 1.0  # a little hotter than the model: more varied activations
    assert report["output_projection_refit"] is False  # fitted to its own samples, the refit measured worse
    assert math.isfinite(report["heldout_perplexity"]["after"])


def test_errors(tiny_checkpoints, text_file, tmp_path):
    out = converted(tiny_checkpoints, "llama", tmp_path / "moh")
    with pytest.raises(MoHError, match=r"calibration file .*missing.txt not found"):
        calibrate(out, calibration_data=str(tmp_path / "missing.txt"))
    with pytest.raises(MoHError, match=r"needs --calibration-data"):
        calibrate(out)
    with pytest.raises(MoHError, match=r"has \d+ tokens; \d+ are needed .* lower --calibration-tokens"):
        calibrate(out, calibration_data=str(text_file), calibration_tokens=10**6)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"content": "hello"}\n')
    with pytest.raises(MoHError, match=r"bad.jsonl:1 is not a JSON object with a 'text' field"):
        calibrate(out, calibration_data=str(bad_jsonl))
    with pytest.raises(MoHError, match=r"is not a MoH model; convert it first"):
        calibrate(tiny_checkpoints["llama"], calibration_data=str(text_file))
    with pytest.raises(MoHError, match=r"unknown option 'calibration_token'"):
        calibrate(out, calibration_data=str(text_file), calibration_token=5)
    # Nothing was changed by the failed runs.
    assert json.loads((out / "config.json").read_text())["router"] == "query-norm"


def test_mean_fallback_and_per_layer_shared_count(tiny_checkpoints, text_file, tmp_path):
    out = moh_convert.convert(tiny_checkpoints["llama"], tmp_path / "moh", active_heads=3, shared_heads=1, no_calibration=True)
    calibrate(out, calibration_data=str(text_file), head_fallback="mean", **SETTINGS)
    config = json.loads((out / "config.json").read_text())
    assert all(len(heads) + top_k == 3 for heads, top_k in zip(config["shared_heads"], config["routed_top_k"]))
    with safe_open(out / "model-moh-routers.safetensors", framework="pt") as handle:
        assert handle.get_tensor("model.layers.0.self_attn.moh.head_fallback").abs().sum() > 0
    windows = heldout_windows(out, text_file)
    report = json.loads((out / "calibration_report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert perplexity(model, windows, progress=False) == pytest.approx(report["heldout_perplexity"]["after"], rel=2e-3)


def source_tensors(folder) -> dict:
    """Every tensor of the model's own shards (not the MoH router shard)."""
    tensors = {}
    for shard in folder.glob("model*.safetensors"):
        if shard.name != "model-moh-routers.safetensors":
            with safe_open(shard, framework="pt") as handle:
                tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def test_refit_rewrites_only_o_proj_in_the_shards_and_keeps_dtypes(tiny_checkpoints, text_file, tmp_path):
    source = moh_convert.convert(tiny_checkpoints["llama"], tmp_path / "moh", active_heads=2, shared_heads=1,
                                 dtype="bfloat16", no_calibration=True)
    before = source_tensors(source)
    out = tmp_path / "calibrated"
    calibrate(source, output=str(out), calibration_data=str(text_file), **SETTINGS)
    after = source_tensors(out)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype == torch.bfloat16 and after[name].shape == tensor.shape
        changed = not torch.equal(after[name], tensor)
        assert changed == name.endswith("self_attn.o_proj.weight"), name
    # The input model (hard-linked into the staging copy) is untouched.
    assert all(torch.equal(tensor, before[name]) for name, tensor in source_tensors(source).items())
    report = json.loads((out / "calibration_report.json").read_text())
    assert report["output_projection_refit"] is True
    windows = heldout_windows(out, text_file)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert perplexity(model, windows, progress=False) == pytest.approx(report["heldout_perplexity"]["after"], rel=2e-2)
    # Its attention is no longer the source's: calibrating it again would fit to the wrong teacher.
    with pytest.raises(MoHError, match=r"refitted output projections.*calibrate again from the source"):
        calibrate(out, calibration_data=str(text_file), **SETTINGS)


def test_without_refit_o_proj_is_the_sources(tiny_checkpoints, text_file, tmp_path):
    out = converted(tiny_checkpoints, "llama", tmp_path / "moh")
    original = source_tensors(out)
    calibrate(out, calibration_data=str(text_file), refit_output_projection=False, **SETTINGS)
    assert all(torch.equal(tensor, original[name]) for name, tensor in source_tensors(out).items())
    assert json.loads((out / "calibration_report.json").read_text())["output_projection_refit"] is False


def test_router_refit_after_the_output_projection_refit_changes_routers_and_is_reported(tiny_checkpoints, text_file,
                                                                                      tmp_path):
    folders = {}
    for refit_router in (True, False):  # one shared head fixed: every layer routes (a static layer has no router)
        out = converted(tiny_checkpoints, "llama", tmp_path / f"moh-{refit_router}")
        calibrate(out, calibration_data=str(text_file), refit_router=refit_router, shared_heads=1, **SETTINGS)
        report = json.loads((out / "calibration_report.json").read_text())
        assert report["router_refit"] is refit_router and report["output_projection_refit"] is True
        assert ("router refitted" in report["method"]) is refit_router
        folders[refit_router] = {}
        for shard in out.glob("*.safetensors"):
            with safe_open(shard, framework="pt") as handle:
                folders[refit_router].update({name: handle.get_tensor(name) for name in handle.keys()})
    # The single fit and the refit differ in the routers and in o_proj (refitted again for the new routing).
    for part in (".moh.router", "o_proj"):
        names = [name for name in folders[True] if part in name]
        assert names and any(not torch.equal(folders[True][name], folders[False][name]) for name in names)


def test_objective_chooses_static_layers_and_they_run_sparse(tiny_checkpoints, text_file, tmp_path, monkeypatch):
    """--objective: every layer's candidate splits are reported with their lost output and cost; a speed weight
    large enough makes every layer static (its active heads shared, no router), and such a model's sparse path
    equals its masked path and says so in its card."""
    quality = converted(tiny_checkpoints, "llama", tmp_path / "quality")
    calibrate(quality, calibration_data=str(text_file), objective="quality", **SETTINGS)
    report = json.loads((quality / "calibration_report.json").read_text())
    assert report["objective"] == "quality"
    for layer in report["layers"]:
        assert [c["shared"] for c in layer["split_candidates"]] == [0, 1, 2]
        chosen = min(layer["split_candidates"], key=lambda c: c["error"])  # quality: the least lost output
        assert chosen["shared"] == len(layer["shared_heads"])

    from moh_convert.calibrate import settings as calibration_settings
    monkeypatch.setitem(calibration_settings.SPEED_WEIGHTS, "speed", 100.0)
    fast = converted(tiny_checkpoints, "llama", tmp_path / "speed")
    calibrate(fast, calibration_data=str(text_file), objective="speed", **SETTINGS)
    config = json.loads((fast / "config.json").read_text())
    assert config["routed_top_k"] == [0, 0] and all(len(shared) == 2 for shared in config["shared_heads"])
    assert "| static layers (fixed heads, no router) | 2 of 2 (0, 1) |" in (fast / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(fast).eval()
    assert all(routing.is_static for routing in model.head_routing)
    input_ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sparse = model(input_ids=input_ids).logits
        masked = model.set_attention_path("masked")(input_ids=input_ids).logits
    torch.testing.assert_close(sparse, masked, atol=1e-4, rtol=0)
    # `moh push` verifies the per-layer split (a fresh process loads the folder) and keeps it in the card.
    from moh_convert import hub

    result = hub.push(fast, "me/tiny-static", dry_run=True)
    assert result.dry_run and not result.load_check_skipped
    card = next(upload for upload in result.files if upload.path_in_repo == "README.md")
    assert b"| static layers (fixed heads, no router) | 2 of 2 (0, 1) |" in card.content
