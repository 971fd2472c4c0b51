"""Turning the user's head-count options into a per-layer split of shared and routed heads."""
import math

from .errors import MoHError

DEFAULT_ACTIVE_RATIO = 0.75  # the paper's MoH-LLaMA3 setting: 75% of heads active per token ...
DEFAULT_SHARED_RATIO = 0.5  # ... of which 50% (of all heads) are shared, always on


def resolve_head_counts(
    num_heads: int,
    active_heads: int | None = None,
    active_ratio: float | None = None,
    shared_heads: int | None = None,
    shared_ratio: float | None = None,
) -> tuple[int, int]:
    """Return (active heads per token, shared heads per layer), checked against `num_heads`."""
    if active_heads is not None and active_ratio is not None:
        raise MoHError("give either --active-heads or --active-ratio, not both")
    if shared_heads is not None and shared_ratio is not None:
        raise MoHError("give either --shared-heads or --shared-ratio, not both")
    for name, ratio in (("--active-ratio", active_ratio), ("--shared-ratio", shared_ratio)):
        if ratio is not None and not 0.0 <= ratio <= 1.0:
            raise MoHError(f"{name} must be between 0 and 1, got {ratio}")
    if active_heads is None:
        # Round half up: 75% of 9 heads is 6.75 -> 7 active.
        active_heads = max(1, math.floor((DEFAULT_ACTIVE_RATIO if active_ratio is None else active_ratio) * num_heads + 0.5))
    if shared_heads is None:
        ratio = DEFAULT_SHARED_RATIO if shared_ratio is None else shared_ratio
        shared_heads = min(math.floor(ratio * num_heads), active_heads)
    if active_heads < 1:
        raise MoHError(f"--active-heads must be at least 1, got {active_heads}")
    if active_heads > num_heads:
        raise MoHError(f"--active-heads {active_heads} is more than the model's {num_heads} attention heads; use 1..{num_heads}")
    if shared_heads < 0:
        raise MoHError(f"--shared-heads must be >= 0, got {shared_heads}")
    if shared_heads > active_heads:
        raise MoHError(
            f"--shared-heads {shared_heads} is more than --active-heads {active_heads} (shared heads are always active); "
            f"use at most {active_heads} shared heads"
        )
    return active_heads, shared_heads


def first_heads_shared(num_layers: int, shared_heads: int) -> list[list[int]]:
    """The paper's choice for converted models: the first `shared_heads` heads of every layer are shared."""
    return [list(range(shared_heads)) for _ in range(num_layers)]
