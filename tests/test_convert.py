"""`moh convert` on files: output layout, streaming of sharded/bin/dtype sources, atomic writes, every error case."""
import importlib
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import moh_convert
from moh_convert import MoHError, convert

# `moh_convert.convert` is the function (the package re-exports it); the module is needed to patch its steps.
convert_module = importlib.import_module("moh_convert.convert")


def tensors_in(folder):
    names = {}
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    for file_name in files:
        with safe_open(folder / file_name, framework="pt") as handle:
            for name in handle.keys():
                names[name] = handle.get_tensor(name)
    return names


def test_output_folder_is_complete(tiny_checkpoints, tmp_path):
    out = convert(tiny_checkpoints["llama"], tmp_path / "out", active_heads=3, shared_heads=2, no_calibration=True)
    files = {path.name for path in out.iterdir()}
    assert {"config.json", "generation_config.json", "modeling_moh.py", "configuration_moh.py", "README.md"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_moh.MoHConfig", "AutoModelForCausalLM": "modeling_moh.MoHForCausalLM",
    }
    assert config["model_type"] == "moh" and config["text_config"]["model_type"] == "llama"
    assert config["shared_heads"] == [[0, 1], [0, 1]] and config["routed_top_k"] == 1
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "mixture-of-heads" in card and "heads 0, 1 in every layer" in card
    # Nothing temporary is left next to the output.
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_source_tensors_are_kept_unchanged(tiny_checkpoints, tmp_path):
    out = convert(tiny_checkpoints["qwen3"], tmp_path / "out", router="learned", no_calibration=True)
    source, converted = tensors_in(tiny_checkpoints["qwen3"]), tensors_in(out)
    for name, tensor in source.items():
        assert torch.equal(converted[name], tensor), name
    router_names = set(converted) - set(source)
    assert router_names == {f"model.layers.{i}.self_attn.moh.router.routed_proj.weight" for i in range(2)}
    assert all(torch.all(converted[name] == 0) for name in router_names)


def test_default_is_papers_setting(tiny_checkpoints, tmp_path):
    # 4 heads: 75% active -> 3, 50% shared -> 2, so each token picks 1 of the 2 routed heads.
    out = convert(tiny_checkpoints["llama"], tmp_path / "out", no_calibration=True)
    config = json.loads((out / "config.json").read_text())
    assert config["shared_heads"][0] == [0, 1] and config["routed_top_k"] == 1
    assert config["router"] == "query-norm" and config["gate_mode"] == "binary"


def test_sharded_source_is_streamed_with_index(tiny_checkpoints, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(path.name for path in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2
    out = convert(tmp_path / "sharded", tmp_path / "out", router="learned", active_heads=2, shared_heads=1, no_calibration=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(shards) <= set(index["weight_map"].values())
    for shard in shards:  # byte-for-byte copies
        assert (out / shard).read_bytes() == (tmp_path / "sharded" / shard).read_bytes()
    moh = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(moh.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)


def test_dtype_conversion(tiny_checkpoints, tmp_path):
    out = convert(tiny_checkpoints["mistral"], tmp_path / "out", dtype="bfloat16", router="learned", no_calibration=True)
    tensors, source = tensors_in(out), tensors_in(tiny_checkpoints["mistral"])
    assert {tensor.dtype for tensor in tensors.values()} == {torch.bfloat16}
    for name, tensor in source.items():  # written one tensor at a time by our own safetensors writer
        assert torch.equal(tensors[name], tensor.to(torch.bfloat16)), name
    moh = AutoModelForCausalLM.from_pretrained(out)
    assert moh.dtype == torch.bfloat16


def test_pytorch_bin_source(tiny_checkpoints, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    (tmp_path / "bin").mkdir()
    shutil.copy(tiny_checkpoints["llama"] / "config.json", tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    out = convert(tmp_path / "bin", tmp_path / "out", active_heads=4, no_calibration=True)
    moh = AutoModelForCausalLM.from_pretrained(out).eval()
    input_ids = torch.arange(3, 13)[None]
    with torch.no_grad():
        torch.testing.assert_close(moh(input_ids).logits, model.eval()(input_ids).logits, atol=1e-5, rtol=0)


def test_overwrite_replaces_output(tiny_checkpoints, tmp_path):
    out = convert(tiny_checkpoints["llama"], tmp_path / "out", active_heads=4, no_calibration=True)
    (out / "stale.txt").write_text("old")
    convert(tiny_checkpoints["llama"], tmp_path / "out", active_heads=2, overwrite=True, no_calibration=True)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["routed_top_k"] == 0
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_interrupted_conversion_leaves_no_output(tiny_checkpoints, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C while the model card is written

    monkeypatch.setattr(convert_module, "write_model_card", crash)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_checkpoints["llama"], tmp_path / "out", no_calibration=True)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_previous_output(tiny_checkpoints, tmp_path, monkeypatch):
    out = convert(tiny_checkpoints["llama"], tmp_path / "out", active_heads=4, no_calibration=True)
    monkeypatch.setattr(convert_module, "write_model_card", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        convert(tiny_checkpoints["llama"], out, active_heads=3, overwrite=True, no_calibration=True)
    assert json.loads((out / "config.json").read_text())["routed_top_k"] == 2  # 4 active - 2 shared
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


# --- error cases: one clear line that names the problem and the fix ---------------------------------------


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(MoHError, match=r"unsupported architecture 'gpt2'; supported model types: .*llama.*phi3"):
        convert(tmp_path / "gpt2", tmp_path / "out", no_calibration=True)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(active_heads=5), r"--active-heads 5 is more than the model's 4 attention heads"),
        (dict(active_heads=2, shared_heads=3), r"--shared-heads 3 is more than --active-heads 2"),
        (dict(active_heads=0), r"--active-heads must be at least 1"),
        (dict(active_heads=3, shared_heads=-1), r"--shared-heads must be >= 0"),
        (dict(active_ratio=1.5), r"--active-ratio must be between 0 and 1"),
        (dict(active_heads=3, active_ratio=0.5), r"either --active-heads or --active-ratio"),
        (dict(router="learned-ish"), r"router: Input should be 'query-norm' or 'learned'"),
        (dict(router="query-norm", gate_mode="two-stage"), r"--gate-mode two-stage needs --router learned"),
        (dict(active_head=3), r"unknown option 'active_head' \(valid options: active_heads, .*\)"),
    ],
)
def test_impossible_options(tiny_checkpoints, tmp_path, options, message):
    with pytest.raises(MoHError, match=message):
        convert(tiny_checkpoints["llama"], tmp_path / "out", **options, no_calibration=True)
    assert list(tmp_path.iterdir()) == []


def test_missing_source(tmp_path):
    with pytest.raises(MoHError, match=r"source '.*nowhere' not found: pass an existing checkpoint folder"):
        convert(str(tmp_path / "nowhere"), tmp_path / "out", no_calibration=True)


def test_missing_config(tiny_checkpoints, tmp_path):
    shutil.copytree(tiny_checkpoints["llama"], tmp_path / "src")
    (tmp_path / "src" / "config.json").unlink()
    with pytest.raises(MoHError, match=r"has no config.json; it is not a Hugging Face checkpoint folder"):
        convert(tmp_path / "src", tmp_path / "out", no_calibration=True)


def test_missing_weights(tiny_checkpoints, tmp_path):
    shutil.copytree(tiny_checkpoints["llama"], tmp_path / "src")
    (tmp_path / "src" / "model.safetensors").unlink()
    with pytest.raises(MoHError, match=r"has no weights"):
        convert(tmp_path / "src", tmp_path / "out", no_calibration=True)


def test_corrupt_safetensors(tiny_checkpoints, tmp_path):
    shutil.copytree(tiny_checkpoints["llama"], tmp_path / "src")
    (tmp_path / "src" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(MoHError, match=r"weights file model.safetensors is truncated or not a safetensors file; re-download"):
        convert(tmp_path / "src", tmp_path / "out", no_calibration=True)


def test_index_names_missing_shard(tiny_checkpoints, tmp_path):
    AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"]).save_pretrained(tmp_path / "src", max_shard_size="100KB")
    victim = sorted((tmp_path / "src").glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(MoHError, match=rf"names missing shard\(s\) {victim.name}; re-download"):
        convert(tmp_path / "src", tmp_path / "out", no_calibration=True)


def test_checkpoint_without_attention_tensors(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_checkpoints["llama"], tmp_path / "src")
    tensors = load_file(tmp_path / "src" / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.weight"]
    save_file(tensors, tmp_path / "src" / "model.safetensors")
    with pytest.raises(MoHError, match=r"lacks tensor\(s\) model.layers.1.self_attn.o_proj.weight; it is incomplete"):
        convert(tmp_path / "src", tmp_path / "out", no_calibration=True)


def test_gguf_without_gguf_package(tmp_path, monkeypatch):
    import importlib.util

    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(MoHError, match=r"reading GGUF files needs the gguf package: pip install gguf"):
        convert(gguf_file, tmp_path / "out", no_calibration=True)


def test_corrupt_gguf(tmp_path):
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(MoHError, match=r"could not read GGUF file .*model.gguf"):
        convert(gguf_file, tmp_path / "out", no_calibration=True)


def test_output_exists_without_overwrite(tiny_checkpoints, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(MoHError, match=r"already exists; pass --overwrite to replace it"):
        convert(tiny_checkpoints["llama"], tmp_path / "out", no_calibration=True)


def test_hub_id_not_cached_while_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MoHError, match=r"not in the local Hugging Face cache and the Hub cannot be reached"):
        convert("someone/some-model", tmp_path / "out", no_calibration=True)


def test_hub_id_resolved_from_cache(tiny_checkpoints, tmp_path, monkeypatch):
    # A model already in the HF cache converts offline, through huggingface_hub's own cache lookup.
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_checkpoints["llama"], snapshot)
    (cache / "models--someone--tiny-llama" / "refs").mkdir()
    (cache / "models--someone--tiny-llama" / "refs" / "main").write_text("a" * 40)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    out = convert("someone/tiny-llama", tmp_path / "out", no_calibration=True)
    assert "base_model: someone/tiny-llama" in (out / "README.md").read_text()


def test_already_moh_source(tiny_checkpoints, tmp_path):
    out = convert(tiny_checkpoints["llama"], tmp_path / "out", no_calibration=True)
    with pytest.raises(MoHError, match=r"already a MoH model"):
        convert(out, tmp_path / "again", no_calibration=True)


def test_push_to_hub_fails_before_converting_when_offline(tiny_checkpoints, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MoHError, match=r"offline mode is on"):
        convert(tiny_checkpoints["llama"], tmp_path / "out", push_to_hub="me/tiny-moh", no_calibration=True)
    assert list(tmp_path.iterdir()) == []


def test_push_to_hub_uploads_the_finished_folder(tiny_checkpoints, tmp_path, monkeypatch):
    from moh_convert import hub

    pushed = []
    monkeypatch.setattr(hub, "check_push_ready", lambda repo_id: None)
    monkeypatch.setattr(hub, "push", lambda folder, repo_id, **options: pushed.append((folder, repo_id)) or "pushed")
    monkeypatch.setattr(hub, "describe_push", lambda result: result)
    out = convert(tiny_checkpoints["llama"], tmp_path / "out", push_to_hub="me/tiny-moh", no_calibration=True)
    assert pushed == [(out, "me/tiny-moh")] and (out / "config.json").exists()


def test_convert_calibrates_by_default(tiny_checkpoints, tmp_path):
    """No data option: the model is calibrated on the default mix (text the model writes itself), so a user who
    never heard of calibration does not get the paper's untrained conversion."""
    from moh_convert.calibrate.settings import DEFAULT_CALIBRATION_DATA

    out = convert(tiny_checkpoints["llama"], tmp_path / "out", active_heads=3, calibration_tokens=256,
                  calibration_seq_len=32, calibration_heldout_tokens=64)
    report = json.loads((out / "calibration_report.json").read_text())
    assert report["calibration_data"] == "default"
    sources = sorted(entry["source"] for entry in report["sources"])
    assert sources == sorted(entry.split(":")[0] for entry in DEFAULT_CALIBRATION_DATA)
    assert json.loads((out / "config.json").read_text())["router"] == "learned"
    assert "## Calibration" in (out / "README.md").read_text()


def test_no_calibration_gives_the_paper_conversion(tiny_checkpoints, tmp_path):
    out = convert(tiny_checkpoints["llama"], tmp_path / "out", active_heads=3, no_calibration=True)
    assert not (out / "calibration_report.json").exists()
    assert json.loads((out / "config.json").read_text())["router"] == "query-norm"
    with pytest.raises(MoHError, match="either --calibration-data or --no-calibration"):
        convert(tiny_checkpoints["llama"], tmp_path / "again", no_calibration=True, calibration_data="self")
