"""The head-sparse attention path (config.attention_path = "sparse") against the masked reference path: same logits on
every supported family, with padding, batches, the KV cache (chunked prefill and token-by-token decoding), sliding
windows and soft-capping; and it really computes only the selected (token, head) pairs."""
import inspect

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

import moh_convert
from moh_convert import MoHConfig
from moh_convert.modeling import modeling_moh
from moh_convert.modeling.modeling_moh import MoHForCausalLM

from .conftest import TINY_FAMILIES

# The KV cache's keyword in forward(): `cache` from transformers 5.25, `past_key_values` before.
CACHE = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"

NUM_HEADS = 4
SEQ = 20
# Small chunks so that the routed rows of 20 tokens make several kernel calls, and chunks that end and start inside
# one token's rows (GQA: several routed heads read one key/value head).
TEST_ROWS_PER_CALL = 3


@pytest.fixture(autouse=True)
def small_routed_chunks(monkeypatch):
    monkeypatch.setattr(modeling_moh, "ROUTED_ROWS_PER_CALL", TEST_ROWS_PER_CALL)
    # Tiny inputs would otherwise take the dense-then-gate path that short real prefills take.
    monkeypatch.setattr(modeling_moh, "ROWS_PATH_CHUNK_TOKENS", 0)


@pytest.fixture(scope="module")
def converted_half_heads(tiny_checkpoints, tmp_path_factory):
    """2 of 4 heads per token: 1 shared + top-1 of 3 routed, query-norm router (the paper's conversion)."""
    root = tmp_path_factory.mktemp("sparse-half-heads")
    return {
        model_type: moh_convert.convert(folder, root / model_type, active_heads=2, shared_heads=1, no_calibration=True)
        for model_type, folder in tiny_checkpoints.items()
    }


def padded_batch(seq=SEQ):
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, 128, (2, seq), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0  # left padding on the second row
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


class CountQueryRows:
    """Wraps the sparse kernel's `attend` and counts the (token, head) query rows it computes."""

    def __init__(self, monkeypatch):
        self.rows = 0
        original = modeling_moh.attend

        def counting_attend(query, *args):
            self.rows += query.shape[0] * query.shape[1] * query.shape[2]
            return original(query, *args)

        monkeypatch.setattr(modeling_moh, "attend", counting_attend)


def logits(model, attention_path, **inputs):
    model.set_attention_path(attention_path)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("model_type", list(TINY_FAMILIES))
def test_sparse_matches_masked_and_skips_unselected_heads(model_type, converted_half_heads, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(converted_half_heads[model_type]).eval()
    base = "eager" if model_type == "gemma2" else "sdpa"  # gemma2 needs soft-capping: eager only
    assert model.config.attention_path == "sparse"
    assert model.config.text_config._attn_implementation == f"moh_sparse_{base}"
    input_ids, attention_mask, position_ids = padded_batch()
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    masked = logits(model, "masked", **inputs)
    assert model.config.text_config._attn_implementation == base
    counter = CountQueryRows(monkeypatch)
    sparse = logits(model, "sparse", **inputs)
    torch.testing.assert_close(sparse, masked, atol=1e-4, rtol=0)

    # Each token ran its 1 shared + 1 selected head in every layer: half the query rows of the masked path.
    active_per_token = 2
    assert counter.rows == model.config.num_layers * input_ids.numel() * active_per_token

    # No padding: sdpa gets no mask at all (plain causal), the kernel builds causal masks from positions.
    unpadded = dict(input_ids=input_ids)
    torch.testing.assert_close(logits(model, "sparse", **unpadded), logits(model, "masked", **unpadded), atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", list(TINY_FAMILIES))
def test_sparse_with_kv_cache_matches_masked_full_forward(model_type, converted_half_heads):
    """Prefill 12 tokens, then a 4-token chunk with the cache (the sparse kernel with a cache offset), then 4 single
    tokens (decoding); every step's logits must equal one masked forward over the whole padded batch."""
    from transformers import DynamicCache

    model = AutoModelForCausalLM.from_pretrained(converted_half_heads[model_type]).eval()
    input_ids, attention_mask, position_ids = padded_batch()
    reference = logits(model, "masked", input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    model.set_attention_path("sparse")
    cache = DynamicCache(config=model.config.text_config)
    steps = [(0, 12), (12, 16)] + [(t, t + 1) for t in range(16, SEQ)]
    with torch.no_grad():
        for start, end in steps:
            step_logits = model(
                input_ids=input_ids[:, start:end], attention_mask=attention_mask[:, :end],
                position_ids=position_ids[:, start:end], use_cache=True, **{CACHE: cache},
            ).logits
            # Real tokens only: what a padding query outputs depends on how many keys there are (eager spreads it
            # uniformly over all of them), so a 12-token prefill and a 20-token forward differ there on any path.
            real = attention_mask[:, start:end].bool()
            torch.testing.assert_close(step_logits[real], reference[:, start:end][real], atol=1e-4, rtol=0)

    # generate() end to end: same greedy tokens on both paths.
    assert_same_greedy_tokens(model, input_ids[:, :12], attention_mask[:, :12], max_new_tokens=5)


def assert_same_greedy_tokens(model, input_ids, attention_mask, max_new_tokens):
    generated = {}
    for path in ("sparse", "masked"):
        model.set_attention_path(path)
        with torch.no_grad():
            generated[path] = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=0,
            )
    assert torch.equal(generated["sparse"], generated["masked"])


def routed_model(tiny_checkpoints, seed, **routing):
    """A MoH model on the tiny llama checkpoint with the given routing config fields and random router (and
    fallback) weights, so that tokens pick different heads."""
    source_config = AutoConfig.from_pretrained(tiny_checkpoints["llama"])
    config = MoHConfig(text_config=source_config.to_dict(), **routing)
    dense = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    model = MoHForCausalLM(config).eval()
    model.load_state_dict(dense.state_dict(), strict=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".moh." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


def calibrated_like_model(tiny_checkpoints, gate_mode):
    """What calibration produces: per-layer shared heads and top-K, learned router, head fallback."""
    router = "query-norm" if gate_mode == "binary-query-norm" else "learned"
    return routed_model(
        tiny_checkpoints, 5, shared_heads=[[3, 1], [2]], routed_top_k=[1, 2], router=router,
        gate_mode=gate_mode.removesuffix("-query-norm"), head_fallback=True,
    )


@pytest.mark.parametrize("gate_mode", ["binary", "softmax", "two-stage", "binary-query-norm"])
def test_sparse_matches_masked_for_calibrated_routing(gate_mode, tiny_checkpoints):
    model = calibrated_like_model(tiny_checkpoints, gate_mode)
    input_ids, attention_mask, position_ids = padded_batch()
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    torch.testing.assert_close(logits(model, "sparse", **inputs), logits(model, "masked", **inputs), atol=1e-4, rtol=0)


def test_training_and_recording_statistics(tiny_checkpoints, converted_half_heads, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(converted_half_heads["llama"])
    input_ids, attention_mask, _ = padded_batch()
    counter = CountQueryRows(monkeypatch)

    # Training runs the masked path (every head, straight-through gradient) even with attention_path "sparse".
    model.train()
    model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()
    assert counter.rows == 0

    # Routing statistics are recorded on the sparse path too, and equal the masked path's.
    model.eval()
    recorded = {}
    for path in ("masked", "sparse"):
        for routing in model.head_routing:
            routing.record_routing = True
        logits(model, path, input_ids=input_ids, attention_mask=attention_mask)
        recorded[path] = [(r.last_router_probs, r.last_routed_mask) for r in model.head_routing]
    assert counter.rows > 0
    for (probs_masked, mask_masked), (probs_sparse, mask_sparse) in zip(recorded["masked"], recorded["sparse"]):
        torch.testing.assert_close(probs_sparse, probs_masked, atol=1e-5, rtol=0)
        assert torch.equal(mask_sparse, mask_masked)


def test_attention_path_switches(tiny_checkpoints, converted_half_heads, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(converted_half_heads["llama"], attn_implementation="eager")
    assert model.config.text_config._attn_implementation == "moh_sparse_eager"
    model.set_attn_implementation("sdpa")  # changing the base kernel keeps the sparse path on top of it
    assert model.config._attn_implementation == "sdpa"
    assert model.config.text_config._attn_implementation == "moh_sparse_sdpa"

    # The sparse path's attention function gates the heads itself; the masked path gates o_proj's input by a hook.
    o_proj = model.model.layers[0].self_attn.o_proj
    assert len(o_proj._forward_pre_hooks) == 0
    model.set_attention_path("masked")
    assert len(o_proj._forward_pre_hooks) == 1
    model.save_pretrained(tmp_path / "masked")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "masked")
    assert reloaded.config.attention_path == "masked"
    assert reloaded.config.text_config._attn_implementation == "sdpa"

    with pytest.raises(ValueError, match="attention_path must be one of sparse, masked, got 'fast'"):
        model.set_attention_path("fast")

    # All heads active with binary gates is the source model: nothing to skip, the source kernel stays.
    all_heads = moh_convert.convert(tiny_checkpoints["llama"], tmp_path / "all", active_heads=NUM_HEADS, shared_heads=1, no_calibration=True)
    assert AutoModelForCausalLM.from_pretrained(all_heads).config.text_config._attn_implementation == "sdpa"


def test_remote_code_copy_runs_its_own_sparse_kernel(converted_half_heads):
    # A downloaded model runs the modeling file copied into its folder, here loaded as remote code next to the
    # package's copy, which registers the same attention names (the registered function dispatches to each model's own
    # `moh` module, so the two copies can coexist in one process).
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    folder = converted_half_heads["gemma3_text"]
    remote_class = get_class_from_dynamic_module("modeling_moh.MoHForCausalLM", folder)
    assert remote_class.__module__.startswith("transformers_modules.")
    model = remote_class.from_pretrained(folder).eval().set_sparse_kernel("rows")  # the rows path even for 40 tokens
    assert model.config.text_config._attn_implementation == "moh_sparse_sdpa"
    input_ids, attention_mask, position_ids = padded_batch(seq=40)  # beyond the sliding window of 8
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    torch.testing.assert_close(logits(model, "sparse", **inputs), logits(model, "masked", **inputs), atol=1e-4, rtol=0)


def static_layer_model(tiny_checkpoints, head_fallback=False):
    """Layer 0 static (shared heads 0 and 2, one per GQA group, no routed selection: what calibration's speed
    objective writes), layer 1 routed (top-2 of 4), learned router."""
    return routed_model(
        tiny_checkpoints, 7, shared_heads=[[0, 2], []], routed_top_k=[0, 2], router="learned", head_fallback=head_fallback,
    )


@pytest.mark.parametrize("head_fallback", [False, True])
def test_static_layer_runs_its_shared_heads_only(tiny_checkpoints, monkeypatch, tmp_path, head_fallback):
    model = static_layer_model(tiny_checkpoints, head_fallback)
    static, routed = model.head_routing
    assert static.is_static and not routed.is_static
    input_ids, attention_mask, position_ids = padded_batch()
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    masked = logits(model, "masked", **inputs)
    if not head_fallback:
        # A static layer needs no router: neither at prefill nor when decoding (the masked path's gates).
        monkeypatch.setattr(static.router, "forward", lambda *args: pytest.fail("static layer ran its router"))
        monkeypatch.setattr(static.router.routed_proj, "forward", lambda *args: pytest.fail("static layer ran its router"))
    counter = CountQueryRows(monkeypatch)
    torch.testing.assert_close(logits(model, "sparse", **inputs), masked, atol=1e-4, rtol=0)
    # Layer 0 computes its 2 shared heads for every token, layer 1 its 2 routed selections.
    assert counter.rows == input_ids.numel() * (2 + 2)
    # The per-layer split survives save and load (config.json holds it).
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert reloaded.config.routed_top_k == [0, 2] and reloaded.config.shared_heads == [[0, 2], []]
    assert reloaded.head_routing[0].is_static
    torch.testing.assert_close(logits(reloaded, "sparse", **inputs), masked, atol=1e-4, rtol=0)


def test_static_layer_decodes_like_the_masked_path(tiny_checkpoints):
    model = static_layer_model(tiny_checkpoints)
    input_ids, attention_mask, _ = padded_batch()
    assert_same_greedy_tokens(model, input_ids[:, :12], attention_mask[:, :12], max_new_tokens=6)


def test_short_prefills_take_the_dense_kernel_then_gates(converted_half_heads, monkeypatch):
    """The rows path pays only when enough (token, head) pairs are skipped per routed head; below that a routed
    layer runs the dense kernel and gates, with the same logits."""
    monkeypatch.setattr(modeling_moh, "ROWS_PATH_CHUNK_TOKENS", 1600)
    model = AutoModelForCausalLM.from_pretrained(converted_half_heads["llama"]).eval()
    routing = model.head_routing[0]  # 1 shared + top-1 of 3 routed, of 4 heads: 1 + (1 + 1600 / q) < 3.8
    assert not routing.rows_path_pays(888) and routing.rows_path_pays(889)
    input_ids, attention_mask, position_ids = padded_batch()
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    counter = CountQueryRows(monkeypatch)
    torch.testing.assert_close(logits(model, "sparse", **inputs), logits(model, "masked", **inputs), atol=1e-4, rtol=0)
    assert counter.rows == 0
    # An explicit request for the rows path is obeyed at any length.
    model.set_sparse_kernel("rows")
    torch.testing.assert_close(logits(model, "sparse", **inputs), logits(model, "masked", **inputs), atol=1e-4, rtol=0)
    assert counter.rows > 0


@pytest.mark.parametrize("model_type", list(TINY_FAMILIES))
def test_routed_heads_most_tokens_chose_run_with_the_shared_heads(model_type, converted_half_heads, monkeypatch):
    """A routed head that most tokens selected costs less computed for every token (then zeroed where unselected)
    than as gathered rows: same logits as the masked path, padded or not, with a cache offset, and fewer rows than
    the routed heads' selections alone would be if every head went dense."""
    # 20 tokens: a routed row costs 1 + 30 / 20 = 2.5 dense rows, so heads chosen by at least 40% of the tokens go dense.
    monkeypatch.setattr(modeling_moh, "ROWS_PATH_CHUNK_TOKENS", 1.5 * SEQ)
    model = AutoModelForCausalLM.from_pretrained(converted_half_heads[model_type]).eval()
    choices = []
    original = modeling_moh.MoHHeadRouting.densely_computed_routed_heads

    def spy(self, routed_mask, q_len):
        chosen = original(self, routed_mask, q_len)
        choices.append((chosen, routed_mask.reshape(-1, routed_mask.shape[-1]).mean(0)))
        return chosen

    monkeypatch.setattr(modeling_moh.MoHHeadRouting, "densely_computed_routed_heads", spy)
    input_ids, attention_mask, position_ids = padded_batch()
    for inputs in (dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids),
                   dict(input_ids=input_ids)):
        masked = logits(model, "masked", **inputs)
        choices.clear()
        torch.testing.assert_close(logits(model, "sparse", **inputs), masked, atol=1e-4, rtol=0)
        assert len(choices) == model.config.num_layers
        for chosen, shares in choices:
            if chosen is not None:
                assert chosen == tuple(j for j, share in enumerate(shares.tolist()) if share >= 0.4)
        assert any(chosen for chosen, _ in choices), "no routed head was chosen by 40% of the tokens in any layer"
        assert not all(len(chosen) == len(shares) for chosen, shares in choices)

    # A 4-token chunk after a 16-token prefill (the cache offset: rows cut from the model's mask).
    from transformers import DynamicCache

    reference = logits(model, "masked", input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    model.set_attention_path("sparse")
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        for start, end in [(0, 16), (16, SEQ)]:
            step = model(input_ids=input_ids[:, start:end], attention_mask=attention_mask[:, :end],
                         position_ids=position_ids[:, start:end], use_cache=True, **{CACHE: cache}).logits
            real = attention_mask[:, start:end].bool()
            torch.testing.assert_close(step[real], reference[:, start:end][real], atol=1e-4, rtol=0)


class CountKeptHeadProjections:
    """Counts the o_proj products computed from the kept heads' columns only (`project_kept_heads`' embedding_bag)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = torch.nn.functional.embedding_bag

        def counting_embedding_bag(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "embedding_bag", counting_embedding_bag)


def decode_one_sequence(model, input_ids, prompt_length):
    """Sparse path: prefill prompt_length tokens, then one token at a time with the cache; the logits of each step."""
    from transformers import DynamicCache

    model.set_attention_path("sparse")
    cache = DynamicCache(config=model.config.text_config)
    steps = [(0, prompt_length)] + [(t, t + 1) for t in range(prompt_length, input_ids.shape[1])]
    with torch.no_grad():
        return torch.cat([
            model(input_ids=input_ids[:, start:end], use_cache=True, **{CACHE: cache}).logits for start, end in steps
        ], dim=1)


@pytest.mark.parametrize("model_type", list(TINY_FAMILIES))
def test_decoding_one_sequence_projects_only_the_kept_heads(model_type, converted_half_heads, monkeypatch):
    """Decoding one sequence on the CPU, o_proj reads only the columns of the heads each token keeps; the logits are
    the masked path's (every head, then gates) at every step."""
    model = AutoModelForCausalLM.from_pretrained(converted_half_heads[model_type]).eval()
    input_ids = padded_batch()[0][:1]
    reference = logits(model, "masked", input_ids=input_ids)
    counter = CountKeptHeadProjections(monkeypatch)
    decoded = decode_one_sequence(model, input_ids, prompt_length=12)
    torch.testing.assert_close(decoded, reference, atol=1e-4, rtol=0)
    # Every layer routes (1 shared + top-1 of 3): one kept-heads product per layer and decoded token.
    assert counter.calls == model.config.text_config.num_hidden_layers * (SEQ - 12)


def test_kept_head_projection_with_learned_router_static_layer_and_bias(tiny_checkpoints, monkeypatch):
    """A static layer (fixed shared heads) and a learned router, with a bias on o_proj; the projection follows the
    weight when it changes in place after the first decoded token."""
    model = static_layer_model(tiny_checkpoints)
    generator = torch.Generator().manual_seed(11)
    for layer in model.model.layers:
        o_proj = layer.self_attn.o_proj
        o_proj.bias = torch.nn.Parameter(torch.randn(o_proj.out_features, generator=generator))
    model.set_attention_path("sparse")  # o_proj's forward is installed for the module as it is now
    input_ids = padded_batch()[0][:1]
    counter = CountKeptHeadProjections(monkeypatch)
    torch.testing.assert_close(decode_one_sequence(model, input_ids, 12), logits(model, "masked", input_ids=input_ids),
                               atol=1e-4, rtol=0)
    assert counter.calls == 2 * (SEQ - 12)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.5)
    torch.testing.assert_close(decode_one_sequence(model, input_ids, 12), logits(model, "masked", input_ids=input_ids),
                               atol=1e-4, rtol=0)


def test_kept_head_projection_leaves_wrapped_or_trained_o_proj_alone(converted_half_heads, monkeypatch):
    """Only a plain nn.Linear o_proj on the sparse path computes from kept columns: not when training (gradients need
    every head), not after o_proj was replaced by another module (e.g. a LoRA wrapper), and not on the masked path;
    the state dict never changes."""
    model = AutoModelForCausalLM.from_pretrained(converted_half_heads["llama"]).eval()
    keys = set(model.state_dict())
    input_ids = padded_batch()[0][:1]
    counter = CountKeptHeadProjections(monkeypatch)
    reference = logits(model, "masked", input_ids=input_ids)
    assert counter.calls == 0 and all("forward" not in layer.self_attn.o_proj.__dict__ for layer in model.model.layers)

    model.set_attention_path("sparse")
    model.train()
    model(input_ids=input_ids[:, :1]).logits.sum().backward()  # one token, as decoding, but with gradients
    assert counter.calls == 0
    model.eval()
    model.model.layers[0].self_attn.o_proj = torch.nn.Sequential(model.model.layers[0].self_attn.o_proj)
    decoded = decode_one_sequence(model, input_ids, 12)
    torch.testing.assert_close(decoded, reference, atol=1e-4, rtol=0)
    # Layer 0's o_proj is a wrapper now: only the other layers took the kept-heads product.
    assert counter.calls == (model.config.text_config.num_hidden_layers - 1) * (SEQ - 12)
    assert set(model.state_dict()) == {key.replace("layers.0.self_attn.o_proj.", "layers.0.self_attn.o_proj.0.")
                                       for key in keys}
