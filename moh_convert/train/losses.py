"""Routing losses, computed from what each MoH routing module records during a training forward
(`last_router_logits`, `last_router_probs`, `last_routed_mask`), so the shipped modeling files stay inference code."""
from dataclasses import dataclass

import torch


@dataclass
class RoutingLosses:
    """Averages over the routed layers of the last forward (zero for a dense model)."""

    load_balance_loss: torch.Tensor
    z_loss: torch.Tensor
    load_spread: torch.Tensor  # detached: a statistic, not a loss

    def values(self) -> list[float]:
        return [self.load_balance_loss.item(), self.z_loss.item(), self.load_spread.item()]


def routing_losses(routings: list, aux_loss: str, with_z_loss: bool) -> RoutingLosses:
    """From the routing of the last forward: load-balance loss, z-loss (only `with_z_loss`, else 0) and head-load
    spread, averaged over layers.

    moh: L_b = sum_i P_i f_i over routed heads (paper eq. 7): P_i = mean router probability of head i, f_i = share
    of tokens that selected it. moa: the switch-style form, num_routed / top_k * sum_i P_i f_i (1 when balanced).
    z-loss: mean over tokens of logsumexp(router logits)^2. Spread: max_i f_i - min_i f_i (0 = balanced).
    """
    balance, z_loss, spread = [], [], []
    for routing in routings:
        probs, mask = routing.last_router_probs, routing.last_routed_mask
        if probs is None or routing.is_dense:
            continue
        router_prob = probs.float().mean(dim=(0, 1))
        token_share = mask.float().mean(dim=(0, 1))
        layer_balance = (router_prob * token_share).sum()
        if aux_loss == "moa":
            layer_balance = layer_balance * probs.shape[-1] / max(1, routing.routed_top_k)
        balance.append(layer_balance)
        spread.append((token_share.max() - token_share.min()).detach())
        if with_z_loss and routing.last_router_logits is not None:
            z_loss.append(routing.last_router_logits.logsumexp(-1).square().mean())
    zero = torch.zeros(())
    mean = lambda values: torch.stack(values).mean() if values else zero  # noqa: E731
    return RoutingLosses(mean(balance), mean(z_loss), mean(spread))
