"""The MoH model definition on every supported family: exact at all heads, per-token head selection otherwise."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import moh_convert
from moh_convert.modeling.modeling_moh import MoHForCausalLM

from .conftest import TINY_FAMILIES

NUM_HEADS = 4


def load_pair(source, converted, attn_implementation):
    """Dense source and MoH model with the same attention implementation. Where transformers refuses that
    implementation for the source family (gemma2 has no sdpa: it needs logit soft-capping), the MoH model must
    refuse it the same way rather than silently run something else; then (None, None) is returned."""
    try:
        dense = AutoModelForCausalLM.from_pretrained(source, attn_implementation=attn_implementation).eval()
    except ValueError as source_error:
        with pytest.raises(ValueError) as moh_error:
            AutoModelForCausalLM.from_pretrained(converted, attn_implementation=attn_implementation)
        assert str(moh_error.value) == str(source_error)
        return None, None
    moh = AutoModelForCausalLM.from_pretrained(converted, attn_implementation=attn_implementation).eval()
    return dense, moh


def sample_batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 128, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding on the second row
    return input_ids, attention_mask


@pytest.fixture(scope="module")
def converted_all_heads(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("all-heads")
    return {
        model_type: moh_convert.convert(folder, root / model_type, active_heads=NUM_HEADS, shared_heads=1, no_calibration=True)
        for model_type, folder in tiny_checkpoints.items()
    }


@pytest.fixture(scope="module")
def converted_half_heads(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("half-heads")
    return {
        model_type: moh_convert.convert(folder, root / model_type, active_heads=2, shared_heads=1, no_calibration=True)
        for model_type, folder in tiny_checkpoints.items()
    }


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", list(TINY_FAMILIES))
def test_all_heads_active_matches_source(model_type, attn_implementation, tiny_checkpoints, converted_all_heads):
    dense, moh = load_pair(tiny_checkpoints[model_type], converted_all_heads[model_type], attn_implementation)
    if dense is None:
        return
    assert isinstance(moh, MoHForCausalLM)
    assert moh.model.layers[0].self_attn.config._attn_implementation == attn_implementation
    input_ids, attention_mask = sample_batch()
    with torch.no_grad():
        expected = dense(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = moh(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", list(TINY_FAMILIES))
def test_fewer_heads_only_selected_heads_contribute(
    model_type, attn_implementation, tiny_checkpoints, converted_half_heads
):
    dense, moh = load_pair(tiny_checkpoints[model_type], converted_half_heads[model_type], attn_implementation)
    if dense is None:
        return
    input_ids, attention_mask = sample_batch()
    ungated, gated, queries = {}, {}, {}
    for layer_idx, layer in enumerate(moh.model.layers):
        attention = layer.self_attn
        attention.moh.record_routing = True
        # prepend=True runs before MoH's own gate hook, so it sees o_proj's input as the source model computes it.
        attention.o_proj.register_forward_pre_hook(
            lambda module, args, i=layer_idx: ungated.__setitem__(i, args[0].clone()), prepend=True
        )
        attention.o_proj.register_forward_pre_hook(lambda module, args, i=layer_idx: gated.__setitem__(i, args[0]))
        query_projection = attention.q_proj if hasattr(attention, "q_proj") else attention.qkv_proj
        query_projection.register_forward_hook(lambda module, args, out, i=layer_idx: queries.__setitem__(i, out))
    with torch.no_grad():
        expected = dense(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = moh(input_ids=input_ids, attention_mask=attention_mask).logits
    assert (actual - expected).abs().max() > 1e-3, "routing away heads must change the output"

    for layer_idx, layer in enumerate(moh.model.layers):
        routing = layer.self_attn.moh
        batch, seq = input_ids.shape
        before = ungated[layer_idx].view(batch, seq, NUM_HEADS, -1)
        after = gated[layer_idx].view(batch, seq, NUM_HEADS, -1)
        # The query-norm router's choice, recomputed here from the raw queries: top-1 of the 3 routed heads by norm.
        head_queries = queries[layer_idx][..., : NUM_HEADS * before.shape[-1]].view(batch, seq, NUM_HEADS, -1)
        routed_norms = head_queries[:, :, routing.routed_heads].norm(dim=-1)
        chosen = torch.tensor(routing.routed_heads)[routed_norms.argmax(-1)]  # [batch, seq]
        for b in range(batch):
            for t in range(seq):
                active = {0, int(chosen[b, t])}
                for head in range(NUM_HEADS):
                    if head in active:
                        torch.testing.assert_close(after[b, t, head], before[b, t, head], atol=0, rtol=0)
                    else:
                        assert torch.all(after[b, t, head] == 0), (layer_idx, b, t, head)


def test_generate_with_kv_cache_matches_full_forward(tiny_checkpoints, converted_half_heads):
    moh = AutoModelForCausalLM.from_pretrained(converted_half_heads["llama"]).eval()
    input_ids, _ = sample_batch()
    with torch.no_grad():
        generated = moh.generate(input_ids[:1], max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = moh.generate(input_ids[:1], max_new_tokens=6, do_sample=False, use_cache=False)
    assert generated.shape[1] == input_ids.shape[1] + 6
    assert torch.equal(generated, uncached)


def test_learned_two_stage_router_starts_at_dense_scale(tiny_checkpoints, tmp_path):
    # Zero-initialised routers route uniformly; the paper's rescaling then gives every selected head a gate of 1.
    out = moh_convert.convert(
        tiny_checkpoints["llama"], tmp_path / "two-stage", active_heads=NUM_HEADS, shared_heads=2,
        router="learned", gate_mode="two-stage",
     no_calibration=True,)
    dense, moh = load_pair(tiny_checkpoints["llama"], out, "sdpa")
    input_ids, attention_mask = sample_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            moh(input_ids=input_ids, attention_mask=attention_mask).logits,
            dense(input_ids=input_ids, attention_mask=attention_mask).logits,
            atol=1e-5, rtol=0,
        )
    names = [name for name, _ in moh.named_parameters() if ".moh." in name]
    assert "model.layers.0.self_attn.moh.router.routed_proj.weight" in names
    assert "model.layers.0.self_attn.moh.router.stage_proj.weight" in names


def test_binary_gates_pass_router_gradient_straight_through(tiny_checkpoints, tmp_path):
    out = moh_convert.convert(
        tiny_checkpoints["llama"], tmp_path / "learned", active_heads=2, shared_heads=1, router="learned"
    , no_calibration=True)
    moh = AutoModelForCausalLM.from_pretrained(out).train()
    input_ids, _ = sample_batch()
    loss = moh(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    router_weight = moh.model.layers[0].self_attn.moh.router.routed_proj.weight
    assert router_weight.grad is not None and router_weight.grad.abs().sum() > 0


def test_any_subset_of_heads_can_be_shared_per_layer(tiny_checkpoints):
    # Calibration picks different shared heads per layer; the model must honour any subset, not only "the first h_s".
    from transformers import AutoConfig

    from moh_convert import MoHConfig

    source_config = AutoConfig.from_pretrained(tiny_checkpoints["llama"])
    config = MoHConfig(text_config=source_config.to_dict(), shared_heads=[[3, 1], [2]], routed_top_k=1)
    dense = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"]).eval()
    moh = MoHForCausalLM(config).eval()
    moh.load_state_dict(dense.state_dict(), strict=True)
    gated = {}
    for layer_idx, layer in enumerate(moh.model.layers):
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args, i=layer_idx: gated.__setitem__(i, args[0]))
    input_ids, attention_mask = sample_batch()
    with torch.no_grad():
        moh(input_ids=input_ids, attention_mask=attention_mask)
    for layer_idx, shared in enumerate(config.shared_heads):
        per_head = gated[layer_idx].view(*input_ids.shape, NUM_HEADS, -1)
        # Padded positions attend to nothing, so every head there is zero already: judge real tokens only.
        active = (per_head.abs().sum(-1) > 0)[attention_mask.bool()]  # [real tokens, heads]
        assert active[..., shared].all(), f"layer {layer_idx}: shared heads {shared} must always be on"
        assert (active.sum(-1) == len(shared) + 1).all(), f"layer {layer_idx}: exactly shared + top-1 heads per token"


@pytest.mark.parametrize("router", ["query-norm", "learned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_gates_select_the_router_probabilities_top_k(router, dtype):
    # At inference, binary gates are built from the router's raw scores (fewer ops per decoded token); they must
    # select exactly the heads the probabilities' top-K selects (recording statistics and training use those).
    from moh_convert import MoHConfig
    from moh_convert.modeling.modeling_moh import MoHHeadRouting

    num_heads, head_dim, hidden = 9, 8, 72
    config = MoHConfig(
        text_config={"model_type": "llama", "hidden_size": hidden, "num_attention_heads": num_heads,
                     "num_key_value_heads": 3, "num_hidden_layers": 1, "intermediate_size": 16, "vocab_size": 64},
        shared_heads=[[7, 2, 4]], routed_top_k=3, router=router,
    )
    routing = MoHHeadRouting(config, 0, hidden, head_dim).eval().to(dtype)
    generator = torch.Generator().manual_seed(0)
    if router == "learned":
        routing.router.routed_proj.weight.data.normal_(generator=generator)
    hidden_states = torch.randn(3, 50, hidden, generator=generator).to(dtype)
    queries = (torch.randn(3, 50, num_heads, head_dim, generator=generator) * torch.rand(num_heads, 1) * 3).to(dtype)

    fast_gates, no_mask = routing.head_gates(hidden_states, queries)
    routing.record_routing = True
    probability_gates, routed_mask = routing.head_gates(hidden_states, queries)

    assert no_mask is None and fast_gates.dtype == dtype and fast_gates.shape == (3, 50, num_heads, 1)
    assert torch.equal(fast_gates.float(), probability_gates)
    assert torch.equal(routing.routed_part(fast_gates, None).float(), routed_mask)
    assert (fast_gates[:, :, [7, 2, 4]] == 1).all() and (fast_gates.sum((2, 3)) == 6).all()


@pytest.mark.parametrize("router", ["query-norm", "learned"])
def test_dropping_unselected_heads_equals_gating_them(router):
    # Inference over every head's output (decoding, the masked path) overwrites the heads a token did not select
    # with their fallback instead of multiplying by gates: it must give what the gates give, fallback included.
    from moh_convert import MoHConfig
    from moh_convert.modeling.modeling_moh import MoHHeadRouting

    num_heads, head_dim, hidden = 9, 8, 72
    config = MoHConfig(
        text_config={"model_type": "llama", "hidden_size": hidden, "num_attention_heads": num_heads,
                     "num_key_value_heads": 3, "num_hidden_layers": 1, "intermediate_size": 16, "vocab_size": 64},
        shared_heads=[[7, 2, 4]], routed_top_k=2, router=router, head_fallback=True,
    )
    routing = MoHHeadRouting(config, 0, hidden, head_dim).eval()
    generator = torch.Generator().manual_seed(1)
    if router == "learned":
        routing.router.routed_proj.weight.data.normal_(generator=generator)
    hidden_states = torch.randn(2, 30, hidden, generator=generator)
    queries = torch.randn(2, 30, num_heads, head_dim, generator=generator) * torch.rand(num_heads, 1) * 3
    per_head = torch.randn(2, 30, num_heads, head_dim, generator=generator)
    routing.record_routing = True
    gates, routed_mask = routing.head_gates(hidden_states, queries)
    routing.record_routing = False

    # A zero fallback (calibration's default) is recognised once and skipped; changing it in place is noticed.
    assert not routing.fallback_in_use()
    with torch.no_grad():
        expected = routing.gate_head_outputs(per_head, gates, routed_mask)
        torch.testing.assert_close(
            routing.drop_unselected_heads(per_head.clone(), hidden_states, queries), expected, atol=0, rtol=0,
        )
        # One token of one sequence (decoding) takes its own in-place path: the same heads are dropped.
        for batch_row, token in ((0, 0), (1, 17), (1, 29)):
            one = (slice(batch_row, batch_row + 1), slice(token, token + 1))
            torch.testing.assert_close(
                routing.drop_unselected_heads(per_head[one].clone(), hidden_states[one], queries[one]),
                expected[one], atol=0, rtol=0,
            )
    if router == "learned":
        # The router changed in place (an optimizer step): the next inference call routes with the new weights.
        with torch.no_grad():
            routing.router.routed_proj.weight.mul_(-1.0)
        routing.record_routing = True
        gates, routed_mask = routing.head_gates(hidden_states, queries)
        routing.record_routing = False
        with torch.no_grad():
            torch.testing.assert_close(
                routing.drop_unselected_heads(per_head.clone(), hidden_states, queries),
                routing.gate_head_outputs(per_head, gates, routed_mask), atol=0, rtol=0,
            )
    with torch.no_grad():
        routing.head_fallback.normal_(generator=generator)
    assert routing.fallback_in_use()
    with torch.no_grad():
        dropped = routing.drop_unselected_heads(per_head.clone(), hidden_states, queries)
    torch.testing.assert_close(dropped, routing.gate_head_outputs(per_head, gates, routed_mask), atol=1e-6, rtol=0)
    assert torch.equal(dropped[:, :, [7, 2, 4]], per_head[:, :, [7, 2, 4]])
    # With autograd recording, the output is a new tensor (the kernel may have saved its own for backward).
    kernel_output = per_head.clone().requires_grad_()
    routing.drop_unselected_heads(kernel_output, hidden_states, queries).sum().backward()
    assert torch.equal(kernel_output.grad.squeeze(-1).sum(-1) != 0, gates.squeeze(-1) != 0)


def test_config_rejects_impossible_splits(tiny_checkpoints):
    from transformers import AutoConfig

    from moh_convert import MoHConfig

    text_config = AutoConfig.from_pretrained(tiny_checkpoints["llama"]).to_dict()
    with pytest.raises(ValueError, match=r"layer 0: routed_top_k=3 but only 2 heads are routed"):
        MoHConfig(text_config=text_config, shared_heads=[[0, 1], [0]], routed_top_k=3)
    with pytest.raises(ValueError, match=r"layer 1: shared heads \[0, 4\] must be distinct indices in 0..3"):
        MoHConfig(text_config=text_config, shared_heads=[[0], [0, 4]], routed_top_k=1)
    with pytest.raises(ValueError, match=r"shared_heads lists 1 layers but the model has 2"):
        MoHConfig(text_config=text_config, shared_heads=[[0]], routed_top_k=1)
