#!/usr/bin/env python
"""Benchmark the head-sparse attention path against the dense source model, in one run:

    python benchmarks/sparse_attention.py [--model FOLDER] [--lengths 512 2048 4096] [--repeats 3] [--skip-1b]

For SmolLM2-135M-Instruct (default: demo-output/smollm2-135m-instruct) converted at 6/9 heads (the default
`moh_convert.convert(source, out, active_heads=6)`: query-norm router) and 9/9 heads, the calibrated 6/9 model of the
demo when present (learned router), and a random LLaMA-architecture model of about 1B parameters at 24/32 heads:
prefill latency, decode tokens/s with the KV cache, one training step (the masked path), and the extra memory of a
prefill. Dense and MoH runs are interleaved and medians taken (the machine is shared). The ideal MoH time is the dense
time with only the attention kernel's share scaled by active/all heads; that share is measured in the same run by
timing the dense model's attention kernel calls. Writes the `sparse_attention` section of BENCHMARKS.md.
"""
import argparse
import gc
import inspect
import os

# The machine this runs on is usually shared. With OpenMP's default spinning wait policy, an oversubscribed machine
# turns every parallel op into a wait for a descheduled thread (measured here: a 1024-token SmolLM2 prefill took 17 s
# instead of 5 s), which measures the scheduler rather than the kernels. PASSIVE (threads sleep) is applied to
# dense and MoH runs alike; set OMP_WAIT_POLICY yourself to override. Must be set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import shlex
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import moh_convert  # noqa: E402
from benchmarks import common  # noqa: E402
from transformers import (  # noqa: E402
    AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import sdpa_mask  # noqa: E402

MARKERS = ("<!-- sparse_attention:start -->", "<!-- sparse_attention:end -->")
MB = 1_000_000
# About 1B parameters with the brief's shape: 16 layers, hidden 2048, 32 query heads sharing 8 KV heads.
BIG_CONFIG = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=32000, max_position_embeddings=8192,
)
BIG_ACTIVE_HEADS = 24  # 75%


# ----------------------------------------------------------------------------------------------------------------
# Measuring tools
# ----------------------------------------------------------------------------------------------------------------

# The dense model's attention kernel, timed: registered as its own implementation (sdpa's function and masks).
ATTENTION_SECONDS = [0.0]


def timed_sdpa(*args, **kwargs):
    start = time.process_time()
    result = sdpa_attention_forward(*args, **kwargs)
    ATTENTION_SECONDS[0] += time.process_time() - start
    return result


AttentionInterface.register("timed_sdpa", timed_sdpa)
AttentionMaskInterface.register("timed_sdpa", sdpa_mask)


def random_ids(length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def prefill_seconds(model, input_ids) -> tuple[common.Clock, int]:
    """Wall and CPU time of one prefill, and the extra memory it allocated."""
    gc.collect()
    with torch.no_grad(), common.PeakAnonymousRss() as memory, common.Clock() as clock:
        model(input_ids=input_ids, logits_to_keep=1, use_cache=False)
    return clock, memory.extra


def attention_share(model, input_ids) -> float:
    """Share of the dense model's prefill CPU time spent in the attention kernel (QK^T, softmax, PV)."""
    text_config = model.config
    base = text_config._attn_implementation
    text_config._attn_implementation_internal = "timed_sdpa"
    try:
        ATTENTION_SECONDS[0] = 0.0
        total, _ = prefill_seconds(model, input_ids)
        return ATTENTION_SECONDS[0] / total.cpu
    finally:
        text_config._attn_implementation_internal = base


# The KV cache's name in forward() and its outputs: `cache` from transformers 5.25 (`past_key_values` before, which
# newer versions still accept with a deprecation warning).
CACHE = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def interleaved_decode(models: dict, prompt, turns: int, tokens_per_turn: int) -> dict:
    """Greedy decoding with the KV cache after a prompt (the prefill is not timed), every model in turns of a few
    tokens, in an order rotated every turn; returns per-token Clocks, one per turn and model. A turn lasts a fraction
    of a second, so the models of one turn run under the same machine conditions: comparing them turn by turn
    (paired ratios) cancels the drift of a shared machine, which is larger than a decode step's differences."""
    state, clocks = {}, {key: [] for key in models}
    keys = list(models)
    with torch.no_grad():
        for key, model in models.items():
            output = model(input_ids=prompt, use_cache=True)
            state[key] = (getattr(output, CACHE), output.logits[:, -1:].argmax(-1))
        for turn in range(turns):
            for key in keys[turn % len(keys):] + keys[: turn % len(keys)]:
                clock, state[key] = common.decode_turn(models[key], state[key], tokens_per_turn, CACHE)
                clocks[key].append(clock)
    return clocks


def train_step_seconds(model, input_ids) -> common.Clock:
    """Forward + backward with labels in training mode (MoH: the masked path), no optimizer."""
    model.train()
    try:
        with common.Clock() as clock:
            model(input_ids=input_ids, labels=input_ids).loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    return clock


# ----------------------------------------------------------------------------------------------------------------
# One dense model and its MoH conversions
# ----------------------------------------------------------------------------------------------------------------

def measure_models(group, dense, variants, num_heads, lengths, repeats, decode_prompt, decode_turns,
                   decode_tokens_per_turn, train_length, vocab):
    """variants: [(name, active heads, MoH model)]. Every repeat runs the dense model and every variant once per
    measurement, in an order rotated each repeat (the dense runs serve all variants). Returns one result per variant
    with medians."""
    models = {"dense": dense, **{name: model for name, _, model in variants}}
    for name, active, model in variants:
        print(f"== {group} / {name}: {active}/{num_heads} heads, attention kernel "
              f"{model.config.text_config._attn_implementation}", flush=True)
    inputs = {length: random_ids(length, vocab, seed=length) for length in lengths}
    prompt = random_ids(decode_prompt, vocab, seed=1)
    train_ids = random_ids(train_length, vocab, seed=2)
    runs = {key: {"prefill": {length: [] for length in lengths}, "memory": [], "decode": [], "train": []}
            for key in models}

    for model in models.values():  # warm-up of every code path, untimed
        prefill_seconds(model, inputs[lengths[0]][:, :256])
        interleaved_decode({"warm-up": model}, prompt[:, :64], 1, 2)
        train_step_seconds(model, train_ids[:, :64])
    shares = {}
    for length in lengths:  # the dense model's attention-kernel share, one timed dense prefill per length
        shares[length] = attention_share(dense, inputs[length])
        print(f"  attention kernel share of the dense prefill at {length} tokens: {shares[length]:.1%}", flush=True)

    keys = list(models)
    for repeat in range(repeats):
        order = keys[repeat % len(keys):] + keys[: repeat % len(keys)]
        for length in lengths:
            for key in order:
                clock, extra = prefill_seconds(models[key], inputs[length])
                runs[key]["prefill"][length].append(clock)
                if length == max(lengths):
                    runs[key]["memory"].append(extra)
            print(f"  [{repeat + 1}/{repeats}] prefill {length} wall/CPU s: " + ", ".join(
                f"{key} {runs[key]['prefill'][length][-1].wall:.2f}/{runs[key]['prefill'][length][-1].cpu:.2f}"
                for key in keys), flush=True)
        for key, clocks in interleaved_decode(models, prompt, decode_turns, decode_tokens_per_turn).items():
            runs[key]["decode"] += clocks
        for key in order:
            runs[key]["train"].append(train_step_seconds(models[key], train_ids))
        print(f"  [{repeat + 1}/{repeats}] decode ms/token wall/CPU: "
              + ", ".join(f"{key} {runs[key]['decode'][-1].wall * 1e3:.0f}/{runs[key]['decode'][-1].cpu * 1e3:.0f}"
                          for key in keys)
              + "; train step wall s: " + ", ".join(f"{key} {runs[key]['train'][-1].wall:.2f}" for key in keys),
              flush=True)

    def medians(clocks):
        return {"wall": statistics.median(c.wall for c in clocks), "cpu": statistics.median(c.cpu for c in clocks)}

    def paired_ratios(clocks, dense_clocks):  # median over decode turns of MoH ÷ dense in the same turn
        return {measure: statistics.median(getattr(c, measure) / getattr(d, measure) for c, d in zip(clocks, dense_clocks))
                for measure in ("wall", "cpu")}

    results = []
    for name, active, _ in variants:
        results.append({
            "name": f"{group}, {name}", "active": active, "num_heads": num_heads, "shares": shares,
            "prefill": {length: {"dense": medians(runs["dense"]["prefill"][length]),
                                 "moh": medians(runs[name]["prefill"][length])} for length in lengths},
            "decode": {"dense": medians(runs["dense"]["decode"]), "moh": medians(runs[name]["decode"]),
                       "ratio": paired_ratios(runs[name]["decode"], runs["dense"]["decode"])},
            "train": {"dense": medians(runs["dense"]["train"]), "moh": medians(runs[name]["train"])},
            "memory": {"dense": max(runs["dense"]["memory"]), "moh": max(runs[name]["memory"])},
            "memory_length": max(lengths),
        })
    return results


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------

def load(folder, **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


def build_big_source(folder: Path) -> int:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**BIG_CONFIG), dtype=torch.bfloat16)
    model.save_pretrained(folder)  # bfloat16 on disk (2 GB), loaded as float32
    return sum(parameter.numel() for parameter in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------

def tables(results) -> str:
    lines = [
        "Prefill (one sequence, `logits_to_keep=1`, no cache): medians; ratios are MoH ÷ dense, for wall time and for "
        "the process's CPU time:",
        "",
        "| model | heads | tokens | dense wall [s] | MoH wall [s] | wall ratio | CPU-time ratio "
        "| attention share of dense (CPU) | ideal ratio | wall ÷ ideal | CPU ÷ ideal |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        fraction = result["active"] / result["num_heads"]
        for length, times in result["prefill"].items():
            share = result["shares"][length]
            ideal = 1 - share + share * fraction
            wall = times["moh"]["wall"] / times["dense"]["wall"]
            cpu = times["moh"]["cpu"] / times["dense"]["cpu"]
            lines.append(
                f"| {result['name']} | {result['active']}/{result['num_heads']} | {length} "
                f"| {times['dense']['wall']:.2f} | {times['moh']['wall']:.2f} | {wall:.3f} | {cpu:.3f} | {share:.1%} "
                f"| {ideal:.3f} | {wall / ideal:.3f} | {cpu / ideal:.3f} |"
            )
    lines += [
        "",
        "Decode with the KV cache (ms per token, medians; ratios are medians over decode turns of MoH ÷ dense in the "
        "same turn), one training step (forward + backward, masked path) and prefill memory:",
        "",
        "| model | heads | decode dense wall [ms] | decode MoH wall [ms] | decode wall ratio | decode CPU-time ratio "
        "| train step dense [s] | train step MoH [s] | train wall ratio | prefill extra memory dense / MoH [MB] |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for result in results:
        decode, train, memory = result["decode"], result["train"], result["memory"]
        lines.append(
            f"| {result['name']} | {result['active']}/{result['num_heads']} | {decode['dense']['wall'] * 1e3:.1f} "
            f"| {decode['moh']['wall'] * 1e3:.1f} | {decode['ratio']['wall']:.3f} "
            f"| {decode['ratio']['cpu']:.3f} | {train['dense']['wall']:.2f} "
            f"| {train['moh']['wall']:.2f} | {train['moh']['wall'] / train['dense']['wall']:.3f} "
            f"| {memory['dense'] / MB:.0f} / {memory['moh'] / MB:.0f} (at {result['memory_length']} tokens) |"
        )
    return "\n".join(lines)


def machine_description() -> str:
    return (f"{common.machine_description()}; torch with {torch.get_num_threads()} threads "
            f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})")


def markdown_section(command, machine, started, settings, table) -> str:
    return "\n".join([
        "## Head-sparse attention: speed against the dense model",
        "",
        f"- Command: `{command}` (from the repository root)",
        f"- Date: {started}",
        f"- Machine: {machine}",
        f"- Settings: {settings}",
        "- Method: dense and MoH models run alternately (order swapped every repeat) and the median of the repeats is "
        "reported; the dense runs of one repeat serve every MoH model of the same source; everything is fp32, batch 1. MoH runs its default `attention_path=\"sparse\"` at inference (the "
        "training step runs the masked path, as training always does). Prefill is one forward over random token ids "
        "with `logits_to_keep=1`; decode is greedy one-token steps with the KV cache after a prompt (prompt not "
        "timed), all models of a source taking turns of a few tokens each (order rotated every turn), compared turn "
        "by turn; prefill extra memory is the peak of RssAnon above its value before the call (sampled every 5 ms, max over the repeats at the longest length).",
        "- Ideal: the time the MoH model would take if only the attention kernel (QK^T, softmax, PV) shrank in "
        "proportion to the active heads and nothing else changed: `ideal = dense × (1 − a + a × active/heads)`, where "
        "`a` is the share of the dense prefill spent inside the attention kernel, measured in the same run by timing "
        "every attention-kernel call of one dense prefill per length (CPU time). `÷ ideal` above 1 is the overhead of the "
        "sparse path (routing, gathering rows, per-chunk kernel calls, causal waste in each chunk's own span); below 1 is "
        "measurement noise or a saving outside attention. CPU time is the process's own (both threads): the steadier "
        "measure on a shared machine, since it leaves out the time other jobs held the cores; wall time is what a "
        "user waits.",
        "",
        table,
    ])


# ----------------------------------------------------------------------------------------------------------------

def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO_ROOT / "demo-output" / "smollm2-135m-instruct",
                        help="dense SmolLM2-135M folder (default: demo-output/smollm2-135m-instruct)")
    parser.add_argument("--calibrated", type=Path,
                        default=REPO_ROOT / "demo-output" / "smollm2-135m-moh-6of9-calibrated",
                        help="a calibrated (learned-router) MoH model of --model to include when the folder exists")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096], help="prefill lengths")
    parser.add_argument("--big-lengths", type=int, nargs="+", default=None,
                        help="prefill lengths for the ~1B model (default: --lengths)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per measurement (default 3)")
    parser.add_argument("--big-repeats", type=int, default=None, help="repeats for the ~1B model (default --repeats)")
    parser.add_argument("--decode-prompt", type=int, default=512, help="prompt tokens before timed decoding")
    parser.add_argument("--decode-turns", type=int, default=16,
                        help="decode turns per repeat: every model decodes a few tokens per turn (default 16)")
    parser.add_argument("--decode-tokens-per-turn", type=int, default=4, help="timed decode steps per turn (default 4)")
    parser.add_argument("--train-length", type=int, default=512, help="tokens of the training step")
    parser.add_argument("--skip-1b", action="store_true", help="leave out the ~1B random LLaMA model")
    parser.add_argument("--work-dir", type=Path, default=None, help="where converted models go (default: a temp dir)")
    parser.add_argument("--markdown", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    return parser.parse_args()


def main():
    args = parse_args()
    command = shlex.join(["python", *sys.argv])
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = machine_description()
    print(machine, flush=True)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="moh-sparse-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    common = dict(decode_prompt=args.decode_prompt, decode_turns=args.decode_turns,
                  decode_tokens_per_turn=args.decode_tokens_per_turn, train_length=args.train_length)
    results = []

    dense = load(args.model, attn_implementation="sdpa")
    num_heads, vocab = dense.config.num_attention_heads, dense.config.vocab_size
    variants = []
    for active in (6, 9):
        out = work / f"smollm2-{active}of{num_heads}"
        if not out.exists():
            moh_convert.convert(args.model, out, active_heads=active, no_calibration=True)
        variants.append((f"query-norm (`convert(source, out, active_heads={active})`)", active, load(out)))
    if args.calibrated.is_dir():
        calibrated = load(args.calibrated)
        variants.append(("calibrated (learned router)", calibrated.config.active_heads(0), calibrated))
    results += measure_models("SmolLM2-135M", dense, variants, num_heads, args.lengths, args.repeats, vocab=vocab,
                              **common)
    write_report(args, command, machine, started, results, "")  # kept if the ~1B part is interrupted
    del dense, variants
    gc.collect()

    big_note = ""
    if not args.skip_1b:
        source = work / "llama-1b-source"
        if not source.exists():
            parameters = build_big_source(source)
        else:
            parameters = sum(p.numel() for p in load(source).parameters())
        out = work / f"llama-1b-{BIG_ACTIVE_HEADS}of32"
        if not out.exists():
            moh_convert.convert(source, out, active_heads=BIG_ACTIVE_HEADS, no_calibration=True)
        dense, moh = load(source, attn_implementation="sdpa"), load(out)
        big_note = (f"; ~1B model: random `LlamaForCausalLM` {BIG_CONFIG}, {parameters:,} parameters (saved in "
                    f"bfloat16, run in float32), converted with `convert(source, out, active_heads={BIG_ACTIVE_HEADS})` "
                    "(query-norm router, 16 shared heads + top-8 of 16)")
        results += measure_models(f"random LLaMA {parameters / 1e9:.2f}B", dense,
                                  [("query-norm", BIG_ACTIVE_HEADS, moh)], 32, args.big_lengths or args.lengths,
                                  args.big_repeats or args.repeats, vocab=BIG_CONFIG["vocab_size"], **common)

    write_report(args, command, machine, started, results, big_note)


def write_report(args, command, machine, started, results, big_note):
    table = tables(results)
    print("\n" + table)
    settings = (f"{args.repeats} repeats (1B: {args.big_repeats or args.repeats}); decode after a "
                f"{args.decode_prompt}-token prompt, {args.decode_turns} turns of {args.decode_tokens_per_turn} tokens "
                f"per model and repeat; training step on {args.train_length} tokens"
                + big_note)
    common.write_markdown_section(args.markdown, MARKERS, markdown_section(command, machine, started, settings, table))
    print(f"\nWrote the sparse_attention section of {args.markdown}", flush=True)


if __name__ == "__main__":
    main()
