#!/usr/bin/env python
"""Does where the weights live move the MoH / dense time ratios?

    python benchmarks/weight_placement.py --dense FOLDER --model FOLDER [--processes 2] [--rounds 6]

`from_pretrained` leaves float32 safetensors weights memory-mapped from the file (file-backed 4 KiB pages; tensors
start wherever the file's header puts them, not on a cache-line boundary). This loads the dense model and the MoH
model twice each, once as loaded ("mmap") and once with every parameter copied into fresh memory ("copied"), and
times all four interleaved, order rotated every round: a prefill of 2048 tokens, a batch of 8 x 512 and greedy
decoding (4 tokens per turn, KV cache after a 512-token prompt). Prints per process the medians over rounds of the
ratios copied/mmap for each model and MoH/dense for each placement. Children run with the environment of
`quality_vs_speed.py` (OMP_WAIT_POLICY=PASSIVE, glibc malloc keeping freed memory). Writes nothing else.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import common  # noqa: E402
from benchmarks.quality_vs_speed import CHILD_ENV  # noqa: E402

DECODE_TOKENS = 4


def child(dense: str, model: str, rounds: int) -> None:
    import inspect

    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    import moh_convert  # noqa: F401  (registers the moh architecture)

    cache_name = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"

    def load(folder: str, copy: bool):
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        if copy:
            with torch.no_grad():
                for parameter in loaded.parameters():
                    parameter.data = parameter.data.clone()
        return loaded

    models = {"dense mmap": load(dense, False), "dense copied": load(dense, True),
              "MoH mmap": load(model, False), "MoH copied": load(model, True)}
    generator = torch.Generator().manual_seed(1)
    vocab = models["dense mmap"].config.get_text_config().vocab_size
    inputs = {"prefill 2048": torch.randint(3, vocab, (1, 2048), generator=generator),
              "batch 8x512": torch.randint(3, vocab, (8, 512), generator=generator)}
    prompt = torch.randint(3, vocab, (1, 512), generator=generator)
    seconds = {name: {measure: [] for measure in [*inputs, "decode"]} for name in models}
    state = {}
    with torch.no_grad():
        for name, loaded in models.items():
            loaded(input_ids=inputs["prefill 2048"][:, :256], logits_to_keep=1, use_cache=False)
            output = loaded(input_ids=prompt, use_cache=True)
            state[name] = (getattr(output, cache_name), output.logits[:, -1:].argmax(-1))
        names = list(models)
        for round_index in range(rounds):
            order = common.rotated(names, round_index)
            common.time_prefill_round(models, order, inputs, seconds)
            for name in order:
                clock, state[name] = common.decode_turn(models[name], state[name], DECODE_TOKENS, cache_name)
                seconds[name]["decode"].append((clock.wall, clock.cpu))
    print(json.dumps(seconds))


def median_ratio(seconds: dict, a: str, b: str, measure: str) -> float:
    """Median over rounds of the wall-time ratio a / b."""
    return statistics.median(x[0] / y[0] for x, y in zip(seconds[a][measure], seconds[b][measure]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", required=True, help="Dense source model folder (safetensors).")
    parser.add_argument("--model", required=True, help="MoH model folder.")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.dense, args.model, args.rounds)
        return
    print(common.machine_description())
    pairs = [("dense copied", "dense mmap"), ("MoH copied", "MoH mmap"), ("MoH mmap", "dense mmap"),
             ("MoH copied", "dense copied")]
    print("| process | measure | " + " | ".join(f"{a} / {b}" for a, b in pairs) + " |")
    print("|---|---|" + "---:|" * len(pairs))
    for process in range(args.processes):
        command = [sys.executable, __file__, "--dense", args.dense, "--model", args.model, "--rounds",
                   str(args.rounds), "--child"]
        result = subprocess.run(command, env={**os.environ, **CHILD_ENV}, capture_output=True, text=True, check=True)
        seconds = json.loads(result.stdout.strip().splitlines()[-1])
        for measure in seconds["dense mmap"]:
            cells = " | ".join(f"{median_ratio(seconds, a, b, measure):.3f}" for a, b in pairs)
            print(f"| {process + 1} | {measure} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
