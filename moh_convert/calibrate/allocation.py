"""How many heads each layer keeps active (`--head-allocation per-layer`): layers whose skipped heads would change
the residual stream more get more active heads, layers that barely use some heads fewer, and the model's total stays
what the conversion asked for (its average active heads).

Measured before the layer-by-layer calibration, in one dense pass over the first calibration windows: at each layer
the per-token head importances ||h_i W_O^i|| (the same as the fits') give the oracle's loss curve

    loss_l(k) = mean over tokens of sum_{heads outside the token's top-k} ||h_i W_O^i||^2 / mean ||x||^2,

the share of the residual stream x (the layer's input) that keeping k heads per token would drop. The curve is
convex in k (each extra head recovers the next largest importance, which only shrinks), so giving the budget one head
at a time to the layer where it recovers the most is the optimum of sum_l loss_l(k_l) under sum_l k_l = budget.
"""
import math

import torch
from tqdm.auto import tqdm

from .fits import head_importance
from .layers import head_outputs_and_inputs, run_layer

ALLOCATION_TOKENS = 4096  # calibration tokens of the dense pass that measures the curves


def oracle_loss_curves(source, hidden_batches, kwargs_per_layer, num_heads: int) -> torch.Tensor:
    """[layers, num_heads + 1] float64: loss_l(k) for k = 0..num_heads (see the module docstring), from the dense
    model on `hidden_batches` (the first layer's inputs; not modified). Loads each layer from the source's shards and
    frees it again."""
    curves = []
    num_layers = len(kwargs_per_layer)
    for layer_idx in tqdm(range(num_layers), desc="Measuring layers for head allocation"):
        kwargs_batches = kwargs_per_layer[layer_idx][: len(hidden_batches)]
        layer = source.load_layer(layer_idx)
        attention = layer.self_attn
        _, outputs = head_outputs_and_inputs(layer, attention, hidden_batches, kwargs_batches)
        zero_means = torch.zeros(num_heads, outputs.shape[1] // num_heads, device=outputs.device)
        squared = head_importance(outputs, zero_means, attention.o_proj.weight.float()).double().pow(2)
        del outputs
        residual = torch.cat([hidden.reshape(-1, hidden.shape[-1]) for hidden in hidden_batches]).double()
        scale = residual.pow(2).sum(-1).mean()
        # Dropping the (num_heads - k) smallest importances of each token: cumulative sums of the ascending order.
        ascending = squared.sort(dim=1).values
        dropped = torch.cat([torch.zeros_like(ascending[:, :1]), ascending.cumsum(1)], dim=1)  # [tokens, heads + 1]
        curves.append((dropped.mean(0) / scale).flip(0).cpu())  # index k: the num_heads - k smallest dropped
        hidden_batches = run_layer(layer, hidden_batches, kwargs_batches)
        layer.to("meta")
    return torch.stack(curves)


def allocate_active_heads(curves: torch.Tensor, budget: int, minimum: int, maximum: int) -> list[int]:
    """Active heads per layer with sum == budget and minimum <= k_l <= maximum that minimise sum_l curves[l, k_l]
    (greedy on the marginal gains of convex curves). Ties go to the lower layer."""
    num_layers = curves.shape[0]
    if not num_layers * minimum <= budget <= num_layers * maximum:
        raise ValueError(f"cannot spread {budget} active heads over {num_layers} layers with {minimum}..{maximum} each")
    active = [minimum] * num_layers
    for _ in range(budget - minimum * num_layers):
        gains = [curves[l, active[l]] - curves[l, active[l] + 1] if active[l] < maximum else -math.inf
                 for l in range(num_layers)]
        best = max(range(num_layers), key=lambda l: (gains[l], -l))
        active[best] += 1
    return active


def minimum_active_heads(average_active: float) -> int:
    """The fewest heads a layer may keep: half the average (rounded up), at least one."""
    return max(1, math.ceil(average_active / 2))
