#!/usr/bin/env python
"""How much quality short training recovers on SmolLM2-135M-Instruct at 6 of 9 heads, on CPU: next-token loss
against distillation from the dense model, at the same budget of CPU minutes and tokens.

    python benchmarks/train_recovery.py --data-dir ../shared/data [--budget-minutes 12] \\
        [--runs calibrated:distill calibrated:lm paper:distill paper:lm] [--calibrated FOLDER] [--paper FOLDER]

Models (converted here unless given): paper = `moh convert --active-heads 6 --no-calibration` (first 4 heads
shared, query-norm router); calibrated = `moh convert --active-heads 6` (the default calibration). Every run trains
--trainable (default: every weight, as the shipped distillation recipe does) on the same text, the same steps and
tokens. Text (--data): mix (default) = four kinds interleaved, ~--generate-tokens each (benchmarks/training_mix.py: WikiText-2 valid articles, GSM8K train
solutions, modules of installed packages, and text the dense model writes itself); teacher = only the text the dense
model writes (`data: {generate: default}`: chat replies to the shipped prompts and free samples). Written once here
and given to every run as the same file; none of it is evaluation text. Objectives: lm = next-token loss; distill = KL(dense || MoH) of the
next-token distributions (temperature 1, `distill: {}` with the dense folder as teacher). The step count comes from
the budget and one timed distillation step (the dearer objective), so both objectives get the same tokens and lm
runs finish sooner. Quality: perplexity on the first --test-windows 512-token windows of WikiText-2 test, before and
after, as a ratio to the untouched dense model; after training also the four kinds of text of
benchmarks/domain_quality.py (prose, chat, math, code; 24 windows each). A held-out curve (the training runs'
held-out perplexity every few steps on 8 windows of WikiText-2 test) goes to a plot. Training tokens/s of the MoH
models and of the dense model (a short lm run) are medians over steps. Results: BENCHMARKS.md between the
train_recovery markers, results.json and train_recovery.png in --work-dir (the plot is copied next to
BENCHMARKS.md as benchmarks/train_recovery.png).
"""
import argparse
import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from benchmarks import common  # noqa: E402
from benchmarks.calibration_quality import run_child, smollm2_source, write_section  # noqa: E402
from benchmarks.training_mix import write_training_mix  # noqa: E402

MARKERS = ("<!-- train_recovery:start -->", "<!-- train_recovery:end -->")
PLOT = REPO_ROOT / "benchmarks" / "train_recovery.png"

PERPLEXITY_CHILD = """
import json, sys, torch, moh_convert
from transformers import AutoModelForCausalLM, AutoTokenizer
from moh_convert.perplexity import perplexity, wikitext_windows
model_path, data_dir, windows = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(model_path)
model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
test = wikitext_windows(tokenizer, data_dir, "test", 512, windows)
print("RESULT " + json.dumps({"perplexity": perplexity(model, test, progress=False), "windows": len(test)}))
"""

KINDS_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from benchmarks.domain_quality import evaluate_models
results, _ = evaluate_models([(name, folder) for name, folder in json.loads(sys.argv[3])], sys.argv[2],
                             max_windows=int(sys.argv[4]), wikitext_windows=int(sys.argv[4]))
print("RESULT " + json.dumps({result.name: result.perplexity for result in results}))
"""

GENERATE_CHILD = """
import json, sys, torch
from pathlib import Path
from transformers import AutoTokenizer
from moh_convert.train.generated_text import write_documents
from moh_convert.train.recipe import DataSource
teacher, out, tokens, seq_len = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(teacher)
documents = write_documents(DataSource(generate="default", generate_tokens=tokens), teacher, tokenizer, seq_len, 0,
                            out.parent, torch.device("cpu"))
out.write_text("".join(json.dumps({"text": d}) + "\\n" for d in documents))
print("RESULT " + json.dumps({"documents": len(documents)}))
"""


def recipe_for(model: Path, run_dir: Path, text: Path, data_dir: Path, args, steps: int, objective: str,
               teacher: Path) -> dict:
    recipe = {
        "model": str(model), "output_dir": str(run_dir), "data": {"path": str(text)},
        "eval_data": {"path": str(data_dir / "wikitext-2" / "test.txt")},
        "seq_len": args.seq_len, "max_steps": steps, "global_batch_tokens": args.global_batch_tokens,
        "micro_batch_size": args.micro_batch_size, "learning_rate": args.learning_rate,
        "final_learning_rate": args.final_learning_rate, "warmup_steps": 1 if steps > 2 else 0,
        "eval_windows": 8, "eval_every": max(1, steps // 6), "trainable": args.trainable,
        "load_balance_coef": args.load_balance_coef,
    }
    if objective == "distill":
        recipe["distill"] = {"teacher": str(teacher)}
    return recipe


def train_run(recipe: dict, work_dir: Path, name: str) -> tuple[list[dict], float]:
    run_dir = Path(recipe["output_dir"])
    if run_dir.exists():
        shutil.rmtree(run_dir)
    recipe_path = work_dir / f"recipe-{name}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "moh_convert.train", str(recipe_path)], capture_output=True,
                               text=True)
    if completed.returncode != 0:
        raise SystemExit(f"training {name} failed:\n{completed.stderr[-3000:]}")
    seconds = time.perf_counter() - started
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()], seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data", help="folder with wikitext-2/ and eval/")
    parser.add_argument("--budget-minutes", type=float, default=12.0, help="CPU minutes per distillation run")
    parser.add_argument("--runs", nargs="+", default=["calibrated:distill", "calibrated:lm", "paper:distill", "paper:lm"])
    parser.add_argument("--calibrated", help="an existing calibrated 6/9 folder (else converted here)")
    parser.add_argument("--paper", help="an existing paper-converted 6/9 folder (else converted here)")
    parser.add_argument("--generate-tokens", type=int, default=32768, help="tokens of teacher-written text")
    parser.add_argument("--kinds-for", nargs="*", default=["calibrated:distill", "calibrated:lm"],
                        help="runs also evaluated on the four kinds of text (each costs ~5 CPU minutes)")
    parser.add_argument("--kinds-windows", type=int, default=24, help="512-token windows per kind of text")
    parser.add_argument("--test-windows", type=int, default=48)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch-tokens", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--final-learning-rate", type=float, default=3e-5)
    parser.add_argument("--trainable", default="all", choices=["all", "attention", "routers", "lora"])
    parser.add_argument("--load-balance-coef", type=float, default=0.01)
    parser.add_argument("--data", default="mix", choices=["mix", "teacher"],
                        help="mix: four kinds of text (prose, math, code, teacher-written); teacher: teacher-written only")
    parser.add_argument("--steps", type=int, default=None, help="fix the step count instead of deriving it")
    parser.add_argument("--work-dir", default=str(REPO_ROOT / "bench-output" / "train_recovery"))
    parser.add_argument("--markdown", default=str(REPO_ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    args.machine = common.machine_description()
    import moh_convert

    work_dir = Path(args.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir).resolve()
    demo_source = REPO_ROOT / "demo-output" / "smollm2-135m-instruct"
    dense = demo_source if (demo_source / "config.json").exists() else smollm2_source(work_dir)
    models = {"paper": Path(args.paper) if args.paper else work_dir / "moh-6of9-paper",
              "calibrated": Path(args.calibrated) if args.calibrated else work_dir / "moh-6of9-calibrated"}
    needed = {run.split(":")[0] for run in args.runs}
    if "paper" in needed and not (models["paper"] / "config.json").exists():
        moh_convert.convert(dense, models["paper"], active_heads=6, no_calibration=True)
    if "calibrated" in needed and not (models["calibrated"] / "calibration_report.json").exists():
        moh_convert.convert(dense, models["calibrated"], active_heads=6)

    text = work_dir / "teacher-text.jsonl"
    if not text.exists():
        print(f"The dense model writes {args.generate_tokens} tokens of training text ...", flush=True)
        started = time.perf_counter()
        run_child(GENERATE_CHILD, str(dense), str(text), str(args.generate_tokens), str(args.seq_len))
        print(f"  {time.perf_counter() - started:.0f} s", flush=True)
    if args.data == "mix":
        from transformers import AutoTokenizer

        mix = work_dir / "training-mix.jsonl"
        counts = write_training_mix(AutoTokenizer.from_pretrained(dense), data_dir, text, mix, args.generate_tokens)
        print(f"Training mix: {counts} documents of prose, math, code and teacher text", flush=True)
        text = mix

    steps = args.steps
    if steps is None:  # one timed distillation run of 2 steps (teacher forward + student forward/backward)
        model = models[next(iter(needed))]
        metrics, _ = train_run({**recipe_for(model, work_dir / "probe", text, data_dir, args, 3, "distill", dense),
                                "eval_windows": 0, "eval_every": 0, "warmup_steps": 0}, work_dir, "probe")
        step_seconds = statistics.median(args.global_batch_tokens / m["tokens_per_s"] for m in metrics[1:])
        steps = max(2, math.floor(args.budget_minutes * 60 / step_seconds))
        print(f"Probe: {step_seconds:.1f} s per distillation step -> {steps} steps per run", flush=True)

    dense_ppl = run_child(PERPLEXITY_CHILD, str(dense), str(data_dir), str(args.test_windows))["perplexity"]
    before = {name: run_child(PERPLEXITY_CHILD, str(models[name]), str(data_dir), str(args.test_windows))["perplexity"]
              for name in needed}
    rows = []
    for run in args.runs:
        name, objective = run.split(":")
        run_dir = work_dir / f"run-{name}-{objective}"
        print(f"Training {name} with {objective} for {steps} steps ...", flush=True)
        metrics, seconds = train_run(recipe_for(models[name], run_dir, text, data_dir, args, steps, objective, dense),
                                     work_dir, f"{name}-{objective}")
        after = run_child(PERPLEXITY_CHILD, str(run_dir / "model"), str(data_dir), str(args.test_windows))["perplexity"]
        rows.append({"model": name, "objective": objective, "before": before[name], "after": after, "steps": steps,
                     "tokens": metrics[-1]["tokens"], "train_seconds": seconds,
                     "tokens_per_s": statistics.median(m["tokens_per_s"] for m in metrics[1:] or metrics),
                     "curve": [(m["tokens"], m["heldout_perplexity"]) for m in metrics if "heldout_perplexity" in m],
                     "folder": str(run_dir / "model")})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
        (work_dir / "results.json").write_text(json.dumps({"rows": rows, "dense": dense_ppl, "args": vars(args)}, indent=2))

    # Training throughput of the dense model on the same text (a short lm run).
    dense_metrics, _ = train_run({**recipe_for(dense, work_dir / "run-dense-speed", text, data_dir, args, 4, "lm", dense),
                                  "eval_windows": 0, "eval_every": 0, "trainable": "all"}, work_dir, "dense-speed")
    dense_tokens_per_s = statistics.median(m["tokens_per_s"] for m in dense_metrics[1:])
    kinds_rows = [row for row in rows if f"{row['model']}:{row['objective']}" in args.kinds_for]
    kinds = run_child(KINDS_CHILD, str(REPO_ROOT), str(data_dir), json.dumps(
        [["dense", str(dense)]] + [[f"{r['model']}:{r['objective']}", r["folder"]] for r in kinds_rows]),
        str(args.kinds_windows)) \
        if kinds_rows else {}
    for row in kinds_rows:
        row["kinds"] = {kind: value / kinds["dense"][kind] for kind, value in kinds[f"{row['model']}:{row['objective']}"].items()}
    (work_dir / "results.json").write_text(json.dumps({"rows": rows, "dense": dense_ppl, "kinds": kinds,
                                                      "dense_tokens_per_s": dense_tokens_per_s, "args": vars(args)}, indent=2))
    plot(rows, dense_ppl, work_dir / "train_recovery.png")
    write_section(Path(args.markdown), MARKERS, section_lines(rows, args, dense_ppl, dense_tokens_per_s, steps))


def plot(rows: list[dict], dense_ppl: float, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", flush=True)
        return
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for row in rows:
        tokens, perplexities = zip(*row["curve"]) if row["curve"] else ((), ())
        axis.plot(tokens, perplexities, marker="o", label=f"{row['model']}, {row['objective']}")
    axis.set_xlabel("training tokens seen")
    axis.set_ylabel("held-out perplexity (8 windows of WikiText-2 test)")
    axis.set_yscale("log")
    axis.set_title("SmolLM2-135M-Instruct at 6/9 heads: recovery on CPU")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    shutil.copyfile(path, PLOT)


def section_lines(rows: list[dict], args, dense_ppl: float, dense_tokens_per_s: float, steps: int) -> list[str]:
    command = "python benchmarks/train_recovery.py " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])
    labels = {"paper": "MoH 6/9, paper conversion (query-norm)", "calibrated": "MoH 6/9, calibrated"}
    kinds = ["prose", "chat", "math", "code"]
    lines = [
        "## Training recovery on CPU: next-token loss against distillation (SmolLM2-135M-Instruct, 6 of 9 heads)",
        "",
        f"- Command: `{command.strip()}`",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {args.machine}; float32",
        (f"- Budget: {args.budget_minutes:g} CPU minutes per distillation run, turned into {steps} optimizer steps of "
         if args.steps is None else f"- Budget: fixed at {steps} optimizer steps of ")
        + f"{args.global_batch_tokens} tokens ({rows[0]['tokens']:,} tokens; sequences of {args.seq_len}, micro-batch "
        f"{args.micro_batch_size}){' by timing distillation steps' if args.steps is None else ''}; every run gets the same steps and tokens of the same "
        + (f"text: four kinds interleaved, about {args.generate_tokens:,} tokens each (benchmarks/training_mix.py: "
           "WikiText-2 valid articles, GSM8K train solutions, modules of installed packages, text the dense model "
           "wrote itself; none of it is evaluation text)." if args.data == "mix" else
           f"text: {args.generate_tokens:,} tokens the dense model wrote itself (`data: {{generate: default}}`)."),
        f"- Recipe: `moh train`, trainable {args.trainable}, AdamW, LR {args.learning_rate:g} -> "
        f"{args.final_learning_rate:g} (1 warmup step, cosine), load-balance beta {args.load_balance_coef:g}. "
        "distill: `distill: {teacher: <dense folder>}` (KL at T=1, no next-token loss); lm: the plain next-token loss.",
        f"- Perplexity: WikiText-2 test, first {args.test_windows} 512-token windows; ratios to the untouched dense "
        f"model ({dense_ppl:.2f}). Kinds: {args.kinds_windows} windows each (benchmarks/domain_quality.py), ratio to the dense model.",
        "",
        "| model | objective | test ppl before | after | after / dense | prose | chat | math | code | worst kind | "
        "train wall [s] | tokens/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        ratios = [row["kinds"][kind] for kind in kinds] if "kinds" in row else []
        kind_cells = " | ".join(f"{value:.3f}" for value in ratios) + f" | {max(ratios):.3f}" if ratios \
            else " | ".join(["-"] * 5)
        lines.append(
            f"| {labels[row['model']]} | {row['objective']} | {row['before']:.2f} | {row['after']:.2f} | "
            f"{row['after'] / dense_ppl:.3f}x | {kind_cells} | {row['train_seconds']:.0f} | {row['tokens_per_s']:.1f} |")
    lines += ["", f"Dense model training throughput on the same text and settings (plain next-token loss): "
              f"{dense_tokens_per_s:.1f} tokens/s (all weights trained).", "",
              "![held-out perplexity against training tokens](benchmarks/train_recovery.png)"]
    return lines


if __name__ == "__main__":
    main()
