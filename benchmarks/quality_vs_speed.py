#!/usr/bin/env python
"""Quality and speed of the same MoH models against their dense source, in one table and one plot:

    python benchmarks/quality_vs_speed.py --dense FOLDER --models NAME=FOLDER [NAME=FOLDER ...]
        [--processes 3] [--rounds 5] [--lengths 512 2048 4096] [--batch 8x512] [--decode-tokens 16]

For each model: WikiText-2 test perplexity over the first 48 windows of 512 tokens (ratio to the dense model's), the
time of one prefill at each length (`logits_to_keep=1`, no cache), of a batch of 8 x 512 tokens (the shape of
perplexity and lm-eval runs), and of greedy decoding with the KV cache after a 512-token prompt, each as a ratio to
the dense model timed in the same round. Timing runs in `--processes` fresh processes (one after another, nothing
else running); each loads every model, warms every path up, then runs `--rounds` rounds in which every measurement
runs the dense model and each MoH model once, in an order rotated every round. A process's ratio is the median over
its rounds of (MoH / dense of the same round); the table gives the median over processes and their spread (min-max).

The dense baseline must be a safetensors folder (a GGUF source runs dequantized weights, slower). Children run with
OpenMP's wait policy as a user's process has it (unset: libgomp spins a while between parallel regions, then
sleeps). `--omp-wait-policy PASSIVE` reproduces this benchmark's tables up to the run of 2026-12-07 18:48 UTC,
whose threads slept between every two regions: each region then wakes a thread, which costs the sparse path (more
and smaller kernel calls than the dense model) and slows decoding itself. Children also run with glibc's malloc
told to keep freed memory (MALLOC_MMAP_THRESHOLD_ 32 MiB, MALLOC_TRIM_THRESHOLD_ 1 GiB): otherwise every activation
over 128 KiB is a fresh mmap whose pages fault in again on each forward, and how often that happens depended on
the process (a source of the run-to-run spread). Both apply to dense and MoH alike.

Writes the `quality_vs_speed` section of BENCHMARKS.md and benchmarks/quality_vs_speed.png (perplexity ratio
against prefill time ratio, one point per model, the dense model at (1, 1)).
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import common  # noqa: E402

MARKERS = ("<!-- quality_vs_speed:start -->", "<!-- quality_vs_speed:end -->")
CHILD_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(2**30),
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}
DECODE_PROMPT = 512
DECODE_TURNS_PER_ROUND = 8


# ----------------------------------------------------------------------------------------------------------------
# One timing process (--child): every model, several rounds
# ----------------------------------------------------------------------------------------------------------------

def child(folders: dict[str, str], lengths: list[int], batch: tuple[int, int], rounds: int, decode_tokens: int,
          times_file: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import inspect

    from transformers import LlamaForCausalLM

    import moh_convert  # noqa: F401  (registers the moh architecture)

    # The KV cache's keyword: `cache` from transformers 5.25, `past_key_values` before.
    CACHE = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"

    torch.manual_seed(0)
    models = {name: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
              for name, folder in folders.items()}
    vocab = models["dense"].config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(1)
    inputs = {f"prefill {length}": torch.randint(3, vocab, (1, length), generator=generator) for length in lengths}
    inputs[f"batch {batch[0]}x{batch[1]}"] = torch.randint(3, vocab, batch, generator=generator)
    prompt = torch.randint(3, vocab, (1, DECODE_PROMPT), generator=generator)
    names = list(models)
    # [model][measure] -> [(wall, cpu) per round]; decode: per turn
    seconds = {name: {measure: [] for measure in [*inputs, "decode"]} for name in names}
    decode_state = {}
    with torch.no_grad():
        for name, model in models.items():  # warm-up of every path, untimed; the decode prompt's cache
            model(input_ids=inputs[f"prefill {lengths[0]}"][:, :256], logits_to_keep=1, use_cache=False)
            output = model(input_ids=prompt, use_cache=True)
            decode_state[name] = (getattr(output, CACHE), output.logits[:, -1:].argmax(-1))
        turn = 0
        for round_index in range(rounds):
            common.time_prefill_round(models, common.rotated(names, round_index), inputs, seconds)
            # Decoding in short turns (a fraction of a second per model), order rotated every turn: the models of
            # one turn run under the same machine conditions, and ratios are taken turn by turn.
            for _ in range(DECODE_TURNS_PER_ROUND):
                for name in common.rotated(names, turn):
                    clock, decode_state[name] = common.decode_turn(models[name], decode_state[name], decode_tokens, CACHE)
                    seconds[name]["decode"].append((clock.wall, clock.cpu))
                turn += 1
            print(f"  round {round_index + 1}/{rounds} done", flush=True)
    times_file.write_text(json.dumps(seconds))


# ----------------------------------------------------------------------------------------------------------------
# The parent: perplexity, the timing processes, the table and the plot
# ----------------------------------------------------------------------------------------------------------------

def wikitext_perplexities(folders: dict[str, str], data_dir: str, windows: int, cache_file: Path) -> dict[str, float]:
    """WikiText-2 test perplexity of every model (kept in `cache_file` by folder and weights' mtime: reruns that
    only retime skip it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moh_convert  # noqa: F401
    from moh_convert.perplexity import perplexity, wikitext_windows

    cached = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    result = {}
    token_windows = wikitext_windows(AutoTokenizer.from_pretrained(folders["dense"]), data_dir, "test", 512, windows)
    for name, folder in folders.items():
        key = f"{Path(folder).resolve()}|{weights_mtime(folder)}|{windows}"
        if key not in cached:
            print(f"perplexity of {name} ({folder}) on {len(token_windows)} windows of 512", flush=True)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            cached[key] = perplexity(model, token_windows)
            cache_file.write_text(json.dumps(cached, indent=1))
            del model
        result[name] = cached[key]
    return result


def weights_mtime(folder: str) -> float:
    return max((path.stat().st_mtime for path in Path(folder).glob("*.safetensors")), default=0.0)


def head_layout(folder: str) -> str:
    """'6.0/9 (12 static, 18 routed layers)' from the model's config.json ('dense' for a source model)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    if config.get("model_type") != "moh":
        return "dense"
    layers = len(config["shared_heads"])
    top_k = config["routed_top_k"] if isinstance(config["routed_top_k"], list) else [config["routed_top_k"]] * layers
    num_heads = config["text_config"]["num_attention_heads"]
    active = [len(shared) + k for shared, k in zip(config["shared_heads"], top_k)]
    static = sum(1 for shared, k in zip(config["shared_heads"], top_k) if k == 0 and len(shared) < num_heads)
    return (f"{sum(active) / layers:.1f}/{num_heads} ({static} static, {sum(1 for k in top_k if k) } routed layers; "
            f"{config['router']} router)")


def ratios(runs: list[dict], name: str, measure: str, clock: int = 0) -> list[float]:
    """Per process: the median over rounds (decode: turns) of MoH / dense of the same round; clock 0 = wall time,
    1 = CPU time."""
    return [statistics.median(m[clock] / d[clock] for m, d in zip(run[name][measure], run["dense"][measure]))
            for run in runs]


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.median(values):.3f} ({min(values):.2f}-{max(values):.2f})"


def table(folders, perplexities, runs, measures, clock: int = 0) -> list[str]:
    header = ["model", "active heads", "WikiText-2 ppl", "ppl ratio", *(f"{m} ratio" for m in measures)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    dense_times = {m: statistics.median(t[clock] for run in runs for t in run["dense"][m]) for m in measures}
    lines.append("| dense (" + ", ".join(f"{m}: {dense_times[m] * (1000 if m == 'decode' else 1):.2f} "
                                         f"{'ms/token' if m == 'decode' else 's'}" for m in measures)
                 + f") | {head_layout(folders['dense'])} | {perplexities['dense']:.3f} | 1.000 |"
                 + " 1.000 |" * len(measures))
    for name, folder in folders.items():
        if name == "dense":
            continue
        row = [name, head_layout(folder), f"{perplexities[name]:.3f}", f"{perplexities[name] / perplexities['dense']:.3f}"]
        row += [cell(ratios(runs, name, m, clock)) for m in measures]
        lines.append("| " + " | ".join(row) + " |")
    return lines


# Models further from dense than this (the paper's untrained conversion, ~9x) are drawn on the top edge with their
# ratio in the legend: on a shared axis they would squeeze the calibrated models, 1.0-1.2x, into one row.
PLOT_MAX_PERPLEXITY_RATIO = 1.5


def plot(folders, perplexities, runs, measures, path: Path) -> None:
    """One panel per speed measure (the longest prefill, the batch, decode): x = time ratio to dense (median over
    processes, bar = min-max over processes), y = WikiText-2 test perplexity ratio; colours and the legend name
    the models (labels next to points overlap where models sit close)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed_measures = [m for m in measures if m.startswith("prefill")][-1:] + [m for m in measures if not m.startswith("prefill")]
    names = [name for name in folders if name != "dense"]
    quality = {name: perplexities[name] / perplexities["dense"] for name in names}
    shown = [quality[name] for name in names if quality[name] <= PLOT_MAX_PERPLEXITY_RATIO]
    top = max([1.0, *shown]) + 0.03
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    figure, axes = plt.subplots(1, len(speed_measures), figsize=(5 * len(speed_measures), 5.2), squeeze=False)
    for axis, measure in zip(axes[0], speed_measures):
        axis.scatter([1.0], [1.0], marker="*", s=160, color="black", label="dense", zorder=3)
        for index, name in enumerate(names):
            per_process = ratios(runs, name, measure)
            x = statistics.median(per_process)
            off_scale = quality[name] > PLOT_MAX_PERPLEXITY_RATIO
            y = top if off_scale else quality[name]
            label = f"{name} ({quality[name]:.1f}x, off scale)" if off_scale else name
            axis.errorbar([x], [y], xerr=[[x - min(per_process)], [max(per_process) - x]], fmt="^" if off_scale else "o",
                          color=colours[index % len(colours)], capsize=3, label=label, zorder=2)
        axis.axvline(1.0, color="grey", linewidth=0.6)
        axis.axhline(1.0, color="grey", linewidth=0.6)
        axis.set_ylim(0.98, top + 0.03)
        axis.set_xlabel(f"{measure}: time / dense (wall; bar: spread over processes)")
        axis.set_ylabel("WikiText-2 test perplexity / dense")
        axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=9, frameon=False)
    figure.suptitle("Quality against speed (lower left is better; dense at (1, 1))")
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    figure.savefig(path, dpi=110)


def child_environment(omp_wait_policy: str) -> dict[str, str]:
    """The timing processes' environment: CHILD_ENV with the chosen OpenMP wait policy ('default': unset)."""
    environment = {**os.environ, **CHILD_ENV}
    environment.pop("OMP_WAIT_POLICY", None)
    if omp_wait_policy != "default":
        environment["OMP_WAIT_POLICY"] = omp_wait_policy
    return environment


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", required=True, help="The dense source model, a safetensors folder.")
    parser.add_argument("--models", nargs="+", required=True, metavar="NAME=FOLDER", help="MoH model folders.")
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--batch", default="8x512", help="BATCHxLENGTH of the batched prefill.")
    parser.add_argument("--decode-tokens", type=int, default=2, help="Decoded tokens per model and decode turn.")
    parser.add_argument("--perplexity-windows", type=int, default=48)
    parser.add_argument("--data-dir", default=str(REPO_ROOT.parent / "shared" / "data"))
    parser.add_argument("--work-dir", default="/tmp/moh-quality-vs-speed")
    parser.add_argument("--no-write", action="store_true", help="Print the table; leave BENCHMARKS.md and the plot.")
    parser.add_argument("--plot-only", action="store_true",
                        help="Redraw benchmarks/quality_vs_speed.png from the perplexities and timings an earlier run "
                             "left in --work-dir (same --models); time nothing, leave BENCHMARKS.md.")
    parser.add_argument("--omp-wait-policy", choices=["PASSIVE", "ACTIVE", "default"], default="default",
                        help="OMP_WAIT_POLICY of the timing processes: default (unset, as on a user's machine: "
                             "libgomp spins a while, then sleeps), PASSIVE (threads sleep between parallel regions; "
                             "the tables up to 2026-12-07 18:48 UTC), or ACTIVE.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folders = {"dense": args.dense, **dict(entry.split("=", 1) for entry in args.models)}
    batch = tuple(int(part) for part in args.batch.lower().split("x"))
    if args.child:
        child(folders, args.lengths, batch, args.rounds, args.decode_tokens, Path(args.child))
        return
    for name, folder in folders.items():
        if not (Path(folder) / "config.json").is_file():
            sys.exit(f"{name}: {folder} is not a model folder (no config.json); convert it first")
    if json.loads((Path(args.dense) / "config.json").read_text()).get("model_type") == "moh":
        sys.exit(f"--dense {args.dense} is a MoH model; give its dense source folder")
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    machine = common.machine_description()
    perplexities = wikitext_perplexities(folders, args.data_dir, args.perplexity_windows, work_dir / "perplexity.json")
    measures = [f"prefill {length}" for length in args.lengths] + [f"batch {args.batch}", "decode"]
    plot_path = REPO_ROOT / "benchmarks" / "quality_vs_speed.png"
    if args.plot_only:
        runs = [json.loads((work_dir / f"times-{process}.json").read_text()) for process in range(args.processes)]
        plot(folders, perplexities, runs, measures, plot_path)
        print(f"redrew {plot_path} from {work_dir}")
        return

    runs = []
    for process in range(args.processes):
        print(f"timing process {process + 1}/{args.processes}", flush=True)
        output = work_dir / f"times-{process}.json"
        command = [sys.executable, __file__, "--child", str(output), *sys.argv[1:]]
        subprocess.run(command, check=True, env=child_environment(args.omp_wait_policy))
        runs.append(json.loads(output.read_text()))
    lines = table(folders, perplexities, runs, measures)
    cpu_lines = table(folders, perplexities, runs, measures, clock=1)
    print("\n".join(["Wall time:", *lines, "", "CPU time:", *cpu_lines]))
    if args.no_write:
        return
    plot(folders, perplexities, runs, measures, plot_path)
    command = "python benchmarks/quality_vs_speed.py " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])
    body = "\n".join([
        "## Quality and speed of the same models (SmolLM2-135M-Instruct, float32, CPU)",
        "",
        f"- Command: `{command}` (from the repository root)",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC; machine: {machine}",
        f"- Method: {args.processes} timing processes x {args.rounds} rounds, each measurement running the dense "
        "model and every MoH model once per round (order rotated); ratio = MoH / dense of the same round, median over "
        "rounds per process, then median over processes (min-max over processes in brackets). Prefill: one "
        "forward, `logits_to_keep=1`, no cache; decode: greedy with the KV cache after a 512-token prompt, "
        f"{DECODE_TURNS_PER_ROUND} turns of {args.decode_tokens} tokens per model and round (ratios turn by turn). "
        "Perplexity: WikiText-2 test, first "
        f"{args.perplexity_windows} windows of 512 tokens. Children: OMP_WAIT_POLICY="
        f"{'unset' if args.omp_wait_policy == 'default' else args.omp_wait_policy}, "
        "MALLOC_MMAP_THRESHOLD_=32 MiB, MALLOC_TRIM_THRESHOLD_=1 GiB.",
        "",
        "Wall time (what a user waits):",
        "",
        *lines,
        "",
        "CPU time of the process (both threads; steadier on a shared VM: it leaves out time other jobs held the "
        "cores):",
        "",
        *cpu_lines,
        "",
        "![quality against speed](benchmarks/quality_vs_speed.png)",
    ])
    common.write_markdown_section(REPO_ROOT / "BENCHMARKS.md", MARKERS, body)
    print(f"wrote the quality_vs_speed section of BENCHMARKS.md and {plot_path}")


if __name__ == "__main__":
    main()
