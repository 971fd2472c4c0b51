"""The per-layer fits of calibration (moh_convert.calibrate.fits) as tensor functions, against direct solutions."""
import pytest
import torch

from moh_convert.calibrate.fits import (
    OUTPUT_RIDGE, RIDGE, HeadSplit, RidgeRouterFit, SplitCandidate, attention_cost, candidate_shared_counts,
    choose_head_split, fit_routing, head_importance, refit_output_projection, refit_router_to_projection, split_score,
    top_k_mask,
)
from moh_convert.calibrate.settings import SPEED_WEIGHTS


def ridge_lstsq(design: torch.Tensor, targets: torch.Tensor, strength: float, penalised: int) -> torch.Tensor:
    """argmin ||design @ B - targets||^2 + strength ||B[:penalised]||^2 via lstsq on the augmented system."""
    penalty = torch.zeros(penalised, design.shape[1], dtype=torch.float64)
    penalty[:, :penalised] = torch.eye(penalised, dtype=torch.float64) * strength**0.5
    augmented = torch.cat([design.double(), penalty])
    right = torch.cat([targets.double(), torch.zeros(penalised, targets.shape[1], dtype=torch.float64)])
    return torch.linalg.lstsq(augmented, right).solution


def test_ridge_router_fit_is_the_ridge_least_squares_solution_with_an_unpenalised_bias():
    torch.manual_seed(0)
    inputs = 3.0 * torch.randn(2500, 12) + 0.5  # more than one 1024-row chunk
    targets = inputs @ torch.randn(12, 5) + torch.randn(5) + 0.1 * torch.randn(2500, 5)
    weight, bias = RidgeRouterFit(inputs).fit(targets)
    assert weight.shape == (5, 12) and bias.shape == (5,) and weight.dtype == bias.dtype == torch.float32
    strength = RIDGE * inputs.double().pow(2).sum(0).mean().item()
    design = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1)
    expected = ridge_lstsq(design, targets, strength, penalised=12)  # [13, 5]
    torch.testing.assert_close(weight, expected[:-1].T.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bias, expected[-1].float(), atol=1e-5, rtol=1e-4)
    # One factorisation serves several target sets: each fit equals a fresh one.
    fit = RidgeRouterFit(inputs)
    first, second = fit.fit(targets[:, :2]), fit.fit(targets[:, 2:])
    torch.testing.assert_close(torch.cat([first[0], second[0]]), weight)


def test_refit_output_projection_is_the_ridge_least_squares_solution():
    torch.manual_seed(1)
    dense = torch.randn(1100, 16)  # more than two 512-row chunks
    seen = dense.clone()
    seen[:, 4:8] = 0.0
    weight = torch.randn(6, 16)
    refitted = refit_output_projection(seen, dense, weight, OUTPUT_RIDGE)
    strength = OUTPUT_RIDGE * seen.double().pow(2).sum(0).mean().item()
    # min ||D W^T - S W'^T||^2 + r ||W' - W||^2: stacked, [S; sqrt(r) I] W'^T = [D W^T; sqrt(r) W^T].
    augmented = torch.cat([seen.double(), strength**0.5 * torch.eye(16, dtype=torch.float64)])
    right = torch.cat([(dense @ weight.T).double(), strength**0.5 * weight.T.double()])
    expected = torch.linalg.lstsq(augmented, right).solution.T
    assert refitted.shape == weight.shape and refitted.dtype == weight.dtype
    torch.testing.assert_close(refitted, expected.float(), atol=1e-5, rtol=1e-4)


def test_output_projection_refit_lowers_the_error_and_keeps_the_original_without_loss():
    torch.manual_seed(0)
    dense = torch.randn(512, 32)
    # Heads are correlated in real models: the skipped head (columns 8..15) is partly predictable from the others.
    dense[:, 8:16] = dense[:, 0:8] @ torch.randn(8, 8) + 0.3 * torch.randn(512, 8)
    weight = torch.randn(16, 32)
    seen = dense.clone()
    seen[:, 8:16] = 0.0  # the second of four 8-wide heads skipped
    refitted = refit_output_projection(seen, dense, weight, OUTPUT_RIDGE)
    assert refitted.shape == weight.shape and refitted.dtype == weight.dtype
    error_before = (dense @ weight.T - seen @ weight.T).pow(2).sum()
    error_after = (dense @ weight.T - seen @ refitted.T).pow(2).sum()
    assert error_after < 0.9 * error_before
    # Nothing skipped: the original projection is already the least-squares solution.
    assert torch.allclose(refit_output_projection(dense, dense, weight, OUTPUT_RIDGE), weight, atol=1e-4)


def test_router_refitted_to_a_new_output_projection_follows_the_heads_that_matter_through_it():
    """After o_proj changes, the heads worth keeping per token change: the refitted router is the ridge fit of the
    log importance through the new projection, agrees with that oracle better than the first router, and a layer
    with nothing to route keeps its routing."""
    torch.manual_seed(3)
    num_tokens, hidden, num_heads, head_dim = 3000, 12, 4, 4
    inputs = torch.randn(num_tokens, hidden)
    # Each head's output size is a (log-)linear function of the input: a linear router can learn who matters.
    scale = (inputs @ torch.randn(hidden, num_heads) * 0.7).exp()
    outputs = (torch.randn(num_tokens, num_heads, head_dim) * scale.unsqueeze(-1)).flatten(1)
    weight = torch.randn(hidden, num_heads * head_dim)
    routing = fit_routing(inputs, outputs, weight, num_heads, active=2, head_fallback="zero", fixed_shared=1)
    assert routing.split.top_k == 1 and len(routing.split.routed) == 3
    new_weight = weight.clone()
    routed = routing.split.routed
    new_weight[:, routed[0] * head_dim:(routed[0] + 1) * head_dim] *= 4.0  # one routed head now moves 4x more
    new_weight[:, routed[1] * head_dim:(routed[1] + 1) * head_dim] *= 0.25

    refitted = refit_router_to_projection(inputs, outputs, new_weight, num_heads, routing)
    importance = head_importance(outputs, routing.fallback, new_weight)[:, routed]
    expected_weight, expected_bias = RidgeRouterFit(inputs).fit(importance.log())
    torch.testing.assert_close(refitted.split.weight, expected_weight)
    torch.testing.assert_close(refitted.split.bias, expected_bias)
    assert refitted.split.shared == routing.split.shared and refitted.split.top_k == 1
    oracle = top_k_mask(importance, 1)
    old_pick = top_k_mask(inputs @ routing.split.weight.T + routing.split.bias, 1)
    old_agreement = (old_pick * oracle).sum(1).mean().item()
    assert refitted.agreement == pytest.approx((refitted.router_pick * oracle).sum(1).mean().item())
    assert refitted.agreement > old_agreement + 0.05

    static = fit_routing(inputs, outputs, weight, num_heads, active=2, head_fallback="zero", fixed_shared=2)
    assert static.split.top_k == 0 and refit_router_to_projection(inputs, outputs, new_weight, num_heads, static) is static


@pytest.mark.parametrize("fixed_shared", [None, 1])
def test_choose_head_split(fixed_shared):
    torch.manual_seed(2)
    num_tokens, hidden, num_heads, head_dim, active = 600, 8, 4, 2, 3
    inputs = torch.randn(num_tokens, hidden)
    outputs = torch.randn(num_tokens, num_heads * head_dim)
    outputs[:, :head_dim] *= 5.0  # head 0 dominates: the oracle keeps it for (nearly) every token
    o_proj_weight = torch.randn(hidden, num_heads * head_dim)
    importance = head_importance(outputs, torch.zeros(num_heads, head_dim), o_proj_weight)
    deviation_check = outputs[-120:].view(120, num_heads, head_dim)
    split = choose_head_split(inputs, importance, deviation_check, o_proj_weight, active, fixed_shared)
    assert isinstance(split, HeadSplit)
    assert sorted(split.shared + split.routed) == list(range(num_heads))
    assert len(split.shared) + split.top_k == active
    assert split.weight.shape == (len(split.routed), hidden) and split.bias.shape == (len(split.routed),)
    assert split.frequency.shape == (num_heads,) and split.frequency[0] == split.frequency.max()
    if fixed_shared is not None:
        assert split.shared == [0] and split.error == 0.0


def test_candidate_shared_counts():
    assert candidate_shared_counts(3) == [0, 1, 2, 3]
    counts = candidate_shared_counts(24)
    assert counts[0] == 0 and counts[-1] == 24 and len(counts) == 9


def test_attention_cost_model():
    # A static layer (no routed selection) costs its shared heads at every length; a layer with routed selections
    # runs dense attention on short inputs, so it costs at least half of dense on average, never more than dense.
    assert attention_cost(9, 6, 0) == pytest.approx(6 / 9)
    assert attention_cost(9, 0, 6) == pytest.approx(0.5 * min(1.0, 1.2 * 6 / 9) + 0.5)
    assert attention_cost(9, 6, 0) < attention_cost(9, 4, 2) < attention_cost(9, 0, 6) <= 1.0
    assert attention_cost(9, 0, 9) == 1.0


def test_balanced_objective_is_relative_in_the_lost_output():
    """The balanced objective takes a static layer (cost 6/9) over a routed one (top-6 of 9) when it loses a few
    percent more output, never when it loses twice as much, and decides the same whether the layer's errors are small
    or large shares of its output (additive scores let small-error layers go static at any ratio: a 2x regression)."""
    weight = SPEED_WEIGHTS["balanced"]
    routed_cost, static_cost = attention_cost(9, 0, 6), attention_cost(9, 6, 0)
    for scale in (0.01, 0.1, 1.0):
        routed = SplitCandidate(0, 0.5 * scale, routed_cost)
        assert split_score(SplitCandidate(6, 0.5 * scale * 1.05, static_cost), weight) < split_score(routed, weight)
        assert split_score(SplitCandidate(6, 0.5 * scale * 1.2, static_cost), weight) > split_score(routed, weight)
        assert split_score(SplitCandidate(6, 0.5 * scale * 2.0, static_cost), weight) > split_score(routed, weight)
    # quality: the least lost output, whatever it costs; speed: more lost output for the static layer than balanced.
    assert split_score(SplitCandidate(6, 0.501, static_cost), 0.0) > split_score(SplitCandidate(0, 0.5, routed_cost), 0.0)
    assert split_score(SplitCandidate(6, 0.75, static_cost), SPEED_WEIGHTS["speed"]) < split_score(
        SplitCandidate(0, 0.5, routed_cost), SPEED_WEIGHTS["speed"])


def test_speed_weight_trades_lost_output_for_static_layers():
    """Heads whose importance the input predicts: routing loses less output than a fixed set of heads, so the quality
    objective routes, and a large enough speed weight makes the layer static (every active head shared, no router)."""
    torch.manual_seed(4)
    num_tokens, hidden, num_heads, head_dim, active = 800, 8, 4, 2, 3
    inputs = torch.randn(num_tokens, hidden)
    outputs = torch.randn(num_tokens, num_heads * head_dim)
    # Each head's size follows one input feature (log-linearly, what the ridge router fits): routing can predict
    # which head matters least for each token.
    outputs = (outputs.view(num_tokens, num_heads, head_dim) * inputs[:, :num_heads, None].mul(1.5).exp()).flatten(1)
    o_proj_weight = torch.randn(hidden, num_heads * head_dim)
    importance = head_importance(outputs, torch.zeros(num_heads, head_dim), o_proj_weight)
    deviation_check = outputs[-160:].view(160, num_heads, head_dim)
    arguments = (inputs, importance, deviation_check, o_proj_weight, active, None)
    quality = choose_head_split(*arguments)
    assert quality.top_k > 0
    # Every count was scored; errors are shares of the layer's attention output (0..1); the static one is cheapest.
    assert [c.shared for c in quality.candidates] == [0, 1, 2, 3]
    assert all(0.0 <= c.error <= 1.0 for c in quality.candidates)
    assert min(quality.candidates, key=lambda c: c.cost).shared == active
    assert quality.candidates[[c.shared for c in quality.candidates].index(len(quality.shared))].error == min(
        c.error for c in quality.candidates)
    speed = choose_head_split(*arguments, speed_weight=100.0)  # routing loses ~25x less here: a large weight
    assert speed.top_k == 0 and len(speed.shared) == active
    # Fixed by the user: no candidates, no objective.
    assert choose_head_split(*arguments[:-1], 1, speed_weight=10.0).shared.__len__() == 1
