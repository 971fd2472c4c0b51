#!/usr/bin/env python
"""How much quality short continue-tuning (`moh train`) recovers on SmolLM2-135M-Instruct at 6 of 9 heads, on CPU.

    python benchmarks/train_recovery.py --data-dir ../shared/data [--budget-minutes 15] [--test-windows 48]

Three models are tuned the same way on WikiText-2 valid.txt (same recipe, same tokens, same order):
  * dense: the source model itself (the baseline);
  * paper: `moh convert --active-heads 6 --no-calibration` (the paper's defaults: first 4 heads shared, query-norm router, binary
    gates, load-balance beta 0.01);
  * calibrated: `moh convert --active-heads 6 --calibration-data valid.txt` (learned routers fitted on 16K tokens).
The number of optimizer steps is chosen once, from a timed forward+backward of the dense model, so that one run
fits the CPU budget (--budget-minutes); every model then gets that many steps, and the real wall time of each run
is reported. Held-out quality: perplexity over the first --test-windows non-overlapping 512-token windows of
WikiText-2 test.txt (moh_convert.perplexity), before and after tuning; tokens/s is the training throughput
(median over steps, from metrics.jsonl). Each measurement runs in its own process. Results go to BENCHMARKS.md
between the train_recovery markers, with this command.
"""
import argparse
import json
import math
import shlex
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

MARKERS = ("<!-- train_recovery:start -->", "<!-- train_recovery:end -->")

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

# Time forward+backward of one micro-batch of the dense model (the MoH models compute every head too: same cost).
STEP_PROBE_CHILD = """
import json, sys, time, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model.train()
batch = torch.randint(0, 1000, (int(sys.argv[2]), int(sys.argv[3])))
times = []
for _ in range(2):
    start = time.perf_counter()
    model(input_ids=batch, labels=batch).loss.backward()
    times.append(time.perf_counter() - start)
print("RESULT " + json.dumps({"micro_batch_seconds": times[-1]}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data", help="folder with wikitext-2/{valid,test}.txt")
    parser.add_argument("--budget-minutes", type=float, default=15.0, help="CPU time per model (default: 15)")
    parser.add_argument("--test-windows", type=int, default=48, help="512-token windows of test.txt (default: 48)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch-tokens", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--final-learning-rate", type=float, default=2e-5)
    parser.add_argument("--steps", type=int, default=None, help="fix the step count instead of deriving it")
    parser.add_argument("--work-dir", default=str(REPO_ROOT / "bench-output" / "train_recovery"))
    parser.add_argument("--reuse-conversions", action="store_true",
                        help="keep the converted models already in --work-dir (from an earlier run of this script)")
    parser.add_argument("--markdown", default=str(REPO_ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    args.machine = common.machine_description()

    import moh_convert

    work_dir = Path(args.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir).resolve()
    valid = data_dir / "wikitext-2" / "valid.txt"
    demo_source = REPO_ROOT / "demo-output" / "smollm2-135m-instruct"
    source = demo_source if (demo_source / "config.json").exists() else smollm2_source(work_dir)

    models = {"dense": source, "paper": work_dir / "moh-6of9-paper", "calibrated": work_dir / "moh-6of9-calibrated"}
    calibration_seconds = None
    if not (args.reuse_conversions and (models["paper"] / "config.json").exists()):
        print("Converting with the paper defaults at 6/9 ...", flush=True)
        moh_convert.convert(source, models["paper"], active_heads=6, overwrite=True, no_calibration=True)
    if not (args.reuse_conversions and (models["calibrated"] / "calibration_report.json").exists()):
        print("Converting at 6/9, calibrated on valid.txt ...", flush=True)
        start = time.perf_counter()
        moh_convert.convert(source, models["calibrated"], active_heads=6, calibration_data=str(valid), overwrite=True)
        calibration_seconds = time.perf_counter() - start

    steps = args.steps
    if steps is None:
        probe = run_child(STEP_PROBE_CHILD, str(source), str(args.micro_batch_size), str(args.seq_len))
        accumulation = args.global_batch_tokens // (args.micro_batch_size * args.seq_len)
        step_seconds = probe["micro_batch_seconds"] * accumulation
        steps = max(2, math.floor(args.budget_minutes * 60 / step_seconds))
        print(f"Probe: {probe['micro_batch_seconds']:.2f} s per micro-batch -> {steps} steps per model", flush=True)

    rows = []
    for name, folder in models.items():
        before = run_child(PERPLEXITY_CHILD, str(folder), str(data_dir), str(args.test_windows))["perplexity"]
        run_dir = work_dir / f"run-{name}"
        recipe = {
            "model": str(folder), "output_dir": str(run_dir), "data": {"path": str(valid)},
            "seq_len": args.seq_len, "max_steps": steps, "global_batch_tokens": args.global_batch_tokens,
            "micro_batch_size": args.micro_batch_size, "learning_rate": args.learning_rate,
            "final_learning_rate": args.final_learning_rate, "warmup_steps": 1 if steps > 2 else 0,
            "eval_windows": 0, "trainable": "all",
        }
        recipe_path = work_dir / f"recipe-{name}.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe))
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        print(f"Training {name} for {steps} steps ...", flush=True)
        start = time.perf_counter()
        completed = subprocess.run([sys.executable, "-m", "moh_convert.train", str(recipe_path)],
                                   capture_output=True, text=True)
        train_seconds = time.perf_counter() - start
        if completed.returncode != 0:
            raise SystemExit(f"training {name} failed:\n{completed.stderr[-3000:]}")
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        after = run_child(PERPLEXITY_CHILD, str(run_dir / "model"), str(data_dir), str(args.test_windows))["perplexity"]
        row = {
            "model": name, "before": before, "after": after, "steps": steps, "tokens": metrics[-1]["tokens"],
            "train_seconds": train_seconds,
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in metrics[1:] or metrics),
            "first_loss": metrics[0]["loss"], "last_loss": metrics[-1]["loss"],
            "load_spread": metrics[-1]["load_spread"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        (work_dir / "results.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))
    write_section(Path(args.markdown), MARKERS, section_lines(rows, args, calibration_seconds))


def section_lines(rows: list[dict], args, calibration_seconds: float | None) -> list[str]:
    dense = next(row for row in rows if row["model"] == "dense")
    labels = {"dense": "dense SmolLM2-135M-Instruct (baseline)", "paper": "MoH 6/9, paper defaults (query-norm)",
              "calibrated": "MoH 6/9, calibrated on valid.txt"}
    command = "python benchmarks/train_recovery.py " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])
    lines = [
        "## Continue-tuning recovery on CPU (SmolLM2-135M-Instruct, 6 of 9 heads)",
        "",
        f"- Command: `{command.strip()}`",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {args.machine}; float32",
        f"- Budget: {args.budget_minutes:g} CPU minutes per model, turned into {rows[0]['steps']} optimizer steps of "
        f"{args.global_batch_tokens} tokens ({rows[0]['tokens']:,} tokens of WikiText-2 valid.txt, sequences of "
        f"{args.seq_len}, micro-batch {args.micro_batch_size}) by timing one forward+backward of the dense model; "
        "every model gets the same steps and tokens.",
        f"- Recipe: `moh train`, trainable all, AdamW, LR {args.learning_rate:g} -> {args.final_learning_rate:g} "
        "(1 warmup step, cosine), MoH load-balance beta 0.01 (none for the dense model).",
        f"- Perplexity: WikiText-2 test.txt, first {args.test_windows} non-overlapping 512-token windows "
        "(moh_convert.perplexity). Ratios are against the dense model after the same tuning.",
        "- The calibrated conversion (16,384 tokens of valid.txt) took "
        + (f"{calibration_seconds:.0f} s." if calibration_seconds is not None else
           "place in an earlier run of this script (--reuse-conversions); its time is not part of this table."),
        "",
        "| model | test ppl before | test ppl after | after / dense after | train loss first -> last step | "
        "training wall time [s] | tokens/s (median step) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {labels[row['model']]} | {row['before']:.2f} | {row['after']:.2f} | "
            f"{row['after'] / dense['after']:.3f}x | {row['first_loss']:.3f} -> {row['last_loss']:.3f} | "
            f"{row['train_seconds']:.0f} | {row['tokens_per_s']:.1f} |"
        )
    return lines


if __name__ == "__main__":
    main()
