"""The fits of one layer, as functions of its recorded tensors (no model, no files): head importance, the choice
of shared heads, the ridge router, the skipped heads' fallback outputs and the refitted output projection.

Shapes: inputs X [tokens, hidden] (the attention input), outputs [tokens, heads*head_dim] (o_proj's input, each
head's output h_i side by side), o_proj weight W_O [hidden, heads*head_dim].

Device and precision: every fit runs on the device of its inputs (the calibration device) and works in float32
(normal matrices in float64), whatever dtype the layers ran in: inputs are cast to float32 on the way in."""
import math
from dataclasses import dataclass
from typing import Literal

import torch

CHECK_TOKENS = 4096  # calibration tokens set aside (per layer) to choose how many heads to share
RIDGE = 1e-2  # ridge strength, relative to the mean diagonal of X^T X
# Pull of the refitted o_proj towards the original, relative to the mean diagonal of X^T X (`--output-ridge`). 0.1
# rather than 0.01: SmolLM2 calibrated on WikiText-2 measured better on every kind of held-out text (prose, chat, math,
# code) at 6/9 and 7/9 and the same on average at 5/9; 1.0 was worse (BENCHMARKS.md, "Output projection ridge").
OUTPUT_RIDGE = 1e-1
# The cost model of the speed-aware split (see `attention_cost`): on the CPU sparse path a routed (token, head) pair
# costs more than a shared head's (chunks of gathered rows, two kernel calls and a merge each). Measured on
# SmolLM2-135M's attention shape (9 heads, 3 key/value heads, 2 threads) at 4096 tokens: 6 shared heads 0.665x of
# dense attention; 5 shared + top-1 of 4 routed ~0.81-0.85x; top-6 of 9 routed ~0.89-0.93x (runs move by 5-10%).
ROUTED_HEAD_COST = 1.2
# Lost-output shares below this count as equal when splits are scored on log(error): a layer that loses nothing
# either way (e.g. heads that are never skipped) is decided by cost alone.
SPLIT_ERROR_FLOOR = 1e-6


@dataclass
class SplitCandidate:
    """One candidate number of shared heads of a layer, as the choice saw it."""

    shared: int
    error: float  # attention output lost on the held-back tokens, as a share of the layer's attention output there
    cost: float  # attention cost relative to the dense layer's (`attention_cost`)


@dataclass
class HeadSplit:
    """A layer's shared and routed heads with the router that picks `top_k` of the routed heads per token."""

    shared: list[int]
    routed: list[int]
    top_k: int
    weight: torch.Tensor  # router weight [routed heads, hidden]
    bias: torch.Tensor  # router bias [routed heads]
    error: float  # attention output lost on the held-back tokens (0.0 when the number of shared heads was fixed)
    frequency: torch.Tensor  # [heads]: share of tokens for which the oracle keeps each head
    candidates: list[SplitCandidate] | None = None  # every count tried (None when it was fixed)


@dataclass
class LayerRouting:
    """A layer's calibrated routing as measured on the calibration tokens."""

    split: HeadSplit
    router_pick: torch.Tensor  # [tokens, routed heads]: 1 where the router keeps the head
    fallback: torch.Tensor  # [heads, head_dim]: what each head outputs when skipped
    agreement: float  # share of the oracle's top-K routed heads that the router keeps too


def fit_routing(
    inputs: torch.Tensor, outputs: torch.Tensor, o_proj_weight: torch.Tensor, num_heads: int, active: int,
    head_fallback: Literal["zero", "mean"], fixed_shared: int | None, speed_weight: float = 0.0,
) -> LayerRouting:
    """Steps 2 to 5 of the method (see the package docstring): importance, shared heads, router, fallbacks."""
    inputs, outputs, o_proj_weight = inputs.float(), outputs.float(), o_proj_weight.float()
    head_means = outputs.view(outputs.shape[0], num_heads, -1).mean(0)
    if head_fallback == "zero":  # importance is then the plain output norm ||h_i W_O^i||
        head_means = torch.zeros_like(head_means)
    importance = head_importance(outputs, head_means, o_proj_weight)
    # The last fifth of the tokens (at most CHECK_TOKENS) judges candidate splits.
    num_check = min(CHECK_TOKENS, importance.shape[0] // 5)
    deviation_check = outputs[-num_check:].view(num_check, num_heads, -1) - head_means
    split = choose_head_split(inputs, importance, deviation_check, o_proj_weight, active, fixed_shared, speed_weight)
    del deviation_check
    router_pick = top_k_mask(inputs @ split.weight.T + split.bias, split.top_k)
    oracle_pick = top_k_mask(importance[:, split.routed], split.top_k)
    agreement = (router_pick * oracle_pick).sum(1).mean().item() / split.top_k if split.top_k else 1.0
    per_head = outputs.view(outputs.shape[0], num_heads, -1)
    fallback = skipped_head_fallback(per_head, head_means, router_pick, split.routed, head_fallback)
    return LayerRouting(split=split, router_pick=router_pick, fallback=fallback, agreement=agreement)


def projected_deviation(head_outputs: torch.Tensor, head_means: torch.Tensor, o_proj_weight: torch.Tensor) -> torch.Tensor:
    """(h_i - m_i) W_O^i per token and head: [tokens, heads, hidden], what each head adds beyond its average."""
    num_heads, head_dim = head_means.shape
    weight = o_proj_weight.float().view(-1, num_heads, head_dim)
    deviation = head_outputs.view(-1, num_heads, head_dim) - head_means
    return torch.einsum("nhd,ohd->nho", deviation, weight)


def head_importance(head_outputs: torch.Tensor, head_means: torch.Tensor, o_proj_weight: torch.Tensor) -> torch.Tensor:
    """||(h_i - m_i) W_O^i|| per token and head: [tokens, heads]. Chunked to bound memory."""
    # A chunk's projected deviations are [chunk, heads, hidden]: 128 tokens keep that small for large models.
    return torch.cat([projected_deviation(chunk, head_means, o_proj_weight).norm(dim=-1) for chunk in head_outputs.split(128)])


def keep_frequency(importance: torch.Tensor, active: int) -> torch.Tensor:
    """Share of tokens for which each head is among the token's top-`active` heads by importance (the oracle)."""
    kept = torch.zeros_like(importance).scatter_(1, importance.topk(active, dim=1).indices, 1.0)
    return kept.mean(0)


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(scores).scatter_(1, scores.topk(k, dim=1).indices, 1.0)


def reconstruction_error(deviation: torch.Tensor, skipped: torch.Tensor, o_proj_weight: torch.Tensor) -> float:
    """Mean squared norm of what the skipped heads would have added to the output, sum_i skipped_i (h_i - m_i) W_O^i.
    deviation: [tokens, heads, head_dim] = h - m; skipped: [tokens, heads], 1 where the token skips the head."""
    total = 0.0
    for deviation_chunk, skipped_chunk in zip(deviation.split(512), skipped.split(512)):
        lost = (deviation_chunk * skipped_chunk.unsqueeze(-1)).flatten(1) @ o_proj_weight.float().T
        total += lost.pow(2).sum().item()
    return total / deviation.shape[0]


def candidate_shared_counts(active: int) -> list[int]:
    """0..active, thinned to at most 9 values for models with many heads (each candidate costs a router fit)."""
    return sorted({round(active * step / 8) for step in range(9)}) if active > 8 else list(range(active + 1))


def attention_cost(num_heads: int, shared: int, top_k: int) -> float:
    """A layer's attention cost on the sparse path relative to the dense layer's: the mean of a long prefill (a
    shared head costs 1/num_heads, a routed selection ROUTED_HEAD_COST/num_heads, never more than dense: the path
    falls back to it) and short inputs (up to ~2000 tokens a layer with routed selections runs the dense kernel and
    then gates, see modeling_moh.ROWS_PATH_CHUNK_TOKENS). A static layer (no routed selection) is just its
    shared heads at every length, and needs no router when decoding."""
    if top_k == 0:
        return shared / num_heads
    return 0.5 * min(1.0, (shared + ROUTED_HEAD_COST * top_k) / num_heads) + 0.5


def split_score(candidate: SplitCandidate, speed_weight: float) -> float:
    """What a layer's split choice minimises: log(lost output share) + speed_weight x attention cost. Relative in the
    error (see `choose_head_split`): scaling every candidate's error by one factor never changes the choice."""
    return math.log(max(candidate.error, SPLIT_ERROR_FLOOR)) + speed_weight * candidate.cost


def choose_head_split(inputs, importance, deviation_check, o_proj_weight, active: int, fixed_shared: int | None,
                      speed_weight: float = 0.0) -> HeadSplit:
    """Pick the shared heads and fit the router of one layer.

    Shared heads are the heads the oracle keeps most often. How many: `fixed_shared` if the user set it, otherwise
    every count from 0 to `active` is tried (router fitted on the first part of the tokens) and scored on the last
    part (`deviation_check`: h - m there) by the share of the layer's attention output its routing loses (comparable
    across layers, unlike the residual stream's energy, which a few huge activations dominate in middle layers).
    Score: log(error) + `speed_weight` x attention cost (`attention_cost`; weight 0 for the quality objective); the
    lowest wins. The log makes the trade relative: a cheaper split may lose a fixed FACTOR more output, whatever the
    layer's or the data's scale. (An additive error + weight x cost, used before, let layers whose errors are small
    in absolute terms go static at twice their best error; on chat-like calibration text that took SmolLM2 6/9 from
    1.18x to 2.1x dense held-out perplexity, the late layers 24 and 29 costing ~6% each on prose.)
    (Judging splits after refitting o_proj for each, which a fixed set of heads gains more from, measured worse on
    held-out text and took 2-3x longer.) A router that cannot see the context of a token is only worth its routing
    decisions where it is reliable, and only where they pay for what they cost."""
    num_tokens, num_heads = importance.shape
    num_fit = num_tokens - deviation_check.shape[0]
    frequency = keep_frequency(importance, active)
    order = frequency.argsort(descending=True).tolist()
    counts = [min(fixed_shared, active)] if fixed_shared is not None else candidate_shared_counts(active)
    fit_part = RidgeRouterFit(inputs[:num_fit]) if fixed_shared is None else RidgeRouterFit(inputs)
    best, best_score, candidates = None, math.inf, []
    # Everything skipped: the layer's whole attention output (beyond the fallbacks), what errors are shares of.
    output_energy = reconstruction_error(deviation_check, torch.ones_like(importance[-deviation_check.shape[0]:]),
                                         o_proj_weight) if len(counts) > 1 else 1.0
    for count in counts:
        shared = sorted(order[:count])
        routed = [head for head in range(num_heads) if head not in shared]
        top_k = active - count
        if top_k == 0 or not routed:
            weight = torch.zeros(len(routed), inputs.shape[1], device=inputs.device)
            bias = torch.zeros(len(routed), device=inputs.device)
        else:
            targets = importance[:, routed].clamp_min(1e-6).log()
            weight, bias = fit_part.fit(targets[: fit_part.inputs.shape[0]])
        skipped = torch.ones(deviation_check.shape[0], num_heads, device=inputs.device)
        skipped[:, shared] = 0.0
        if top_k:
            picks = top_k_mask(inputs[num_fit:] @ weight.T + bias, top_k)
            skipped[:, routed] = 1.0 - picks
        error = reconstruction_error(deviation_check, skipped, o_proj_weight) if len(counts) > 1 else 0.0
        candidate = SplitCandidate(count, error / max(output_energy, 1e-30), attention_cost(num_heads, count, top_k))
        candidates.append(candidate)
        score = split_score(candidate, speed_weight)
        if best is None or score < best_score:
            best_score = score
            best = HeadSplit(shared=shared, routed=routed, top_k=top_k, weight=weight, bias=bias, error=error,
                             frequency=frequency)
    best.candidates = candidates if len(counts) > 1 else None
    del fit_part
    if fixed_shared is None and best.top_k > 0:
        # Refit the chosen router on every calibration token.
        targets = importance[:, best.routed].clamp_min(1e-6).log()
        best.weight, best.bias = RidgeRouterFit(inputs).fit(targets)
    return best


class RidgeRouterFit:
    """Ridge regression targets ≈ inputs @ W.T + b for several sets of targets on the same inputs (one per candidate
    split of a layer): the normal matrix is accumulated in float64 chunk by chunk and factored once."""

    def __init__(self, inputs: torch.Tensor):
        self.inputs = inputs
        gram = torch.zeros(inputs.shape[1] + 1, inputs.shape[1] + 1, dtype=torch.float64, device=inputs.device)
        for features in self._feature_chunks():
            gram.addmm_(features.T, features)
        ridge = RIDGE * gram.diagonal()[:-1].mean()
        gram.diagonal()[:-1].add_(ridge)  # not on the bias
        self.factor = torch.linalg.cholesky(gram)

    def _feature_chunks(self):
        for chunk in self.inputs.split(1024):
            yield torch.cat([chunk.float(), chunk.new_ones(chunk.shape[0], 1, dtype=torch.float32)], dim=1).double()

    def fit(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (W [outputs, hidden], b [outputs])."""
        right_side = torch.zeros(self.factor.shape[0], targets.shape[1], dtype=torch.float64, device=self.factor.device)
        for features, target_chunk in zip(self._feature_chunks(), targets.split(1024)):
            right_side.addmm_(features.T, target_chunk.double())
        solution = torch.cholesky_solve(right_side, self.factor)  # [hidden + 1, outputs]
        return solution[:-1].T.float().contiguous(), solution[-1].float().contiguous()


def skipped_head_fallback(per_head, head_means, router_pick, routed: list[int], head_fallback: str) -> torch.Tensor:
    """[heads, head_dim]: what a skipped head outputs. Zero for the zero fallback (`head_means` is zero then); for
    the mean fallback, a routed head's mean output over the tokens that skip it (its overall mean if none does)."""
    fallback = head_means.clone()
    skipped = 1.0 - router_pick
    skipped_count = skipped.sum(0)
    for position, head in enumerate(routed):
        if skipped_count[position] > 0 and head_fallback == "mean":
            fallback[head] = (per_head[:, head] * skipped[:, position : position + 1]).sum(0) / skipped_count[position]
    return fallback


def refit_router_to_projection(inputs: torch.Tensor, outputs: torch.Tensor, o_proj_weight: torch.Tensor,
                               num_heads: int, routing: LayerRouting) -> LayerRouting:
    """The same split with its router refitted to the routed heads' importance under `o_proj_weight` (the refitted
    output projection) and measured from the fallbacks the layer actually uses: ||(h_i - f_i) W'_O^i||.

    The first router is fitted before o_proj is refitted, to what each head moves through the source's projection.
    The refit changes what a skipped head costs (the kept heads' columns now make up for the usual losers), so the
    heads worth keeping per token change too. Refitting the router to them measured better on held-out chat, math
    and code (BENCHMARKS.md, "Router fitted to the refitted output projection")."""
    split = routing.split
    if split.top_k == 0 or split.top_k == len(split.routed):
        return routing  # nothing to route: every routed head is always skipped, or always kept
    inputs, outputs, o_proj_weight = inputs.float(), outputs.float(), o_proj_weight.float()
    importance = head_importance(outputs, routing.fallback.float(), o_proj_weight)[:, split.routed]
    weight, bias = RidgeRouterFit(inputs).fit(importance.clamp_min(1e-6).log())
    router_pick = top_k_mask(inputs @ weight.T + bias, split.top_k)
    oracle_pick = top_k_mask(importance, split.top_k)
    agreement = (router_pick * oracle_pick).sum(1).mean().item() / split.top_k
    refitted_split = HeadSplit(shared=split.shared, routed=split.routed, top_k=split.top_k, weight=weight, bias=bias,
                               error=split.error, frequency=split.frequency, candidates=split.candidates)
    return LayerRouting(split=refitted_split, router_pick=router_pick, fallback=routing.fallback, agreement=agreement)


def routed_head_outputs(outputs: torch.Tensor, num_heads: int, routing: LayerRouting) -> torch.Tensor:
    """o_proj's input [tokens, heads*head_dim] as the calibrated layer sees it: kept heads' outputs, fallbacks for
    skipped ones."""
    per_head = outputs.view(outputs.shape[0], num_heads, -1)
    gates = torch.ones(per_head.shape[0], num_heads, device=outputs.device)
    gates[:, routing.split.routed] = routing.router_pick
    return (per_head * gates.unsqueeze(-1) + (1.0 - gates).unsqueeze(-1) * routing.fallback).flatten(1)


def refit_output_projection(seen: torch.Tensor, dense: torch.Tensor, weight: torch.Tensor, ridge: float) -> torch.Tensor:
    """W' minimising ||dense W^T - seen W'^T||^2 + r ||W' - W||^2: the output projection refitted so that the heads a
    token keeps make up for the ones it skips. seen/dense: o_proj inputs [tokens, heads*head_dim].

    Normal equations (S^T S + r I) W'^T = S^T (D W^T) + r W^T in float64, solved through a Cholesky factor (the
    ridge makes the system positive definite). The right side is accumulated from the dense outputs D W^T chunk by
    chunk and the system is solved in place, so two width x width float64 matrices exist at a time. Runs on the
    device of `seen`; the result is in `weight`'s dtype."""
    gram = torch.zeros(seen.shape[1], seen.shape[1], dtype=torch.float64, device=seen.device)
    right_side = torch.zeros(seen.shape[1], weight.shape[0], dtype=torch.float64, device=seen.device)
    for seen_chunk, dense_chunk in zip(seen.split(512), dense.split(512)):
        seen_chunk = seen_chunk.double()
        gram.addmm_(seen_chunk.T, seen_chunk)
        # D W^T is the dense layer's own o_proj output: computed in the weight's precision, as the model does.
        right_side.addmm_(seen_chunk.T, (dense_chunk.float() @ weight.float().T).double())
    strength = (ridge * gram.diagonal().mean()).item()
    right_side.add_(weight.T, alpha=strength)
    gram.diagonal().add_(strength)
    # In place: gram becomes its Cholesky factor L (lower triangle), right_side the solution of L L^T X = right_side.
    torch.linalg.cholesky(gram, out=gram)
    torch.linalg.solve_triangular(gram, right_side, upper=False, out=right_side)
    torch.linalg.solve_triangular(gram.T, right_side, upper=True, out=right_side)
    del gram
    return right_side.T.to(weight.dtype).contiguous()
