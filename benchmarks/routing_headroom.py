"""How much of a calibrated MoH model's gap to the dense model is its router's, and how much the head budget's.

    python benchmarks/routing_headroom.py --dense DENSE_DIR --model MOH_DIR --data-dir ../shared/data [--max-windows 12]

Evaluates the MoH model three ways on the four kinds of text of benchmarks/domain_quality.py (prose, chat, math,
code) and reports each as a perplexity ratio to the dense model:
- router: the model as saved (its router picks the routed heads of each token);
- oracle: the same shared heads and the same number of routed heads per token, but each token keeps the routed
  heads whose output changes the attention output the most (||(h_i - f_i) W_O^i||, read from the heads' actual
  outputs: no router can know this before computing every head, so it bounds what better routing could reach
  with this model's head split and output projection);
- all heads: every head on, with the model's (refitted) output projection: what calibration's weight changes
  cost or gain on their own.
If the oracle is far from dense too, a better router alone cannot close the gap at this head budget.
The analysis replaces each layer's `drop_unselected_heads` on the masked attention path (evaluation only)."""
import argparse
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from domain_quality import KINDS  # noqa: E402
from text_kinds import build_text_kinds  # noqa: E402

VARIANTS = ("router", "oracle", "all heads")


def oracle_drop(routing, per_head: torch.Tensor, hidden_states, queries) -> torch.Tensor:
    """Drop, per token, the routed heads whose output moves o_proj's product the least (shared heads always kept)."""
    weight = routing.attention_block.o_proj.weight
    fallback = routing.head_fallback if routing.head_fallback is not None else None
    deviation = per_head if fallback is None else per_head - fallback.to(per_head.dtype)
    per_head_weight = weight.view(weight.shape[0], routing.num_heads, -1)  # [hidden, heads, head_dim]
    importance = torch.einsum("bshd,ohd->bsho", deviation, per_head_weight).norm(dim=-1)  # [batch, seq, heads]
    protected = torch.zeros(routing.num_heads, dtype=importance.dtype, device=importance.device)
    protected[routing.shared_heads] = float("inf")
    num_dropped = len(routing.routed_heads) - routing.routed_top_k
    if num_dropped == 0:
        return per_head
    dropped = (importance + protected).topk(num_dropped, dim=-1, largest=False).indices  # [batch, seq, dropped]
    keep = per_head.new_ones(*dropped.shape[:2], routing.num_heads, 1).scatter_(2, dropped.unsqueeze(-1), 0.0)
    if fallback is None:
        return per_head * keep
    return per_head * keep + (1.0 - keep) * fallback.to(per_head.dtype)


def keep_every_head(routing, per_head: torch.Tensor, hidden_states, queries) -> torch.Tensor:
    return per_head


def use_variant(model, variant: str) -> None:
    model.set_attention_path("masked")
    for routing in model.head_routing:
        if variant == "router":
            routing.__dict__.pop("drop_unselected_heads", None)
        else:
            replacement = oracle_drop if variant == "oracle" else keep_every_head
            routing.drop_unselected_heads = types.MethodType(replacement, routing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", required=True, help="folder of the dense source model")
    parser.add_argument("--model", required=True, help="folder of the calibrated MoH model")
    parser.add_argument("--data-dir", required=True, help="folder with wikitext-2/ and eval/")
    parser.add_argument("--max-windows", type=int, default=12, help="512-token windows per kind of text")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moh_convert  # noqa: F401
    from moh_convert.perplexity import perplexity

    tokenizer = AutoTokenizer.from_pretrained(args.dense)
    built = build_text_kinds(tokenizer, args.data_dir, args.kinds, 512, args.max_windows)
    dense_model = AutoModelForCausalLM.from_pretrained(args.dense, dtype=torch.float32)
    dense = {kind: perplexity(dense_model, item.windows, progress=False) for kind, item in built.items()}
    del dense_model
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    rows = {}
    for variant in VARIANTS:
        use_variant(model, variant)
        rows[variant] = {kind: perplexity(model, item.windows, progress=False) / dense[kind] for kind, item in built.items()}
        print(f"  {variant}: " + ", ".join(f"{kind} {ratio:.3f}" for kind, ratio in rows[variant].items()), flush=True)

    print(f"\nPerplexity ratio to the dense model ({args.model}; first {args.max_windows} windows of 512 tokens per kind)\n")
    print("| routing | " + " | ".join(built) + " | mean | worst |")
    print("| --- |" + " ---: |" * (len(built) + 2))
    for variant, ratios in rows.items():
        values = list(ratios.values())
        print(f"| {variant} | " + " | ".join(f"{value:.3f}" for value in values)
              + f" | {sum(values) / len(values):.3f} | {max(values):.3f} |")
    print("| (dense perplexity) | " + " | ".join(f"{value:.3f}" for value in dense.values()) + " | | |")


if __name__ == "__main__":
    main()
