#!/usr/bin/env python
"""Benchmark `moh convert` on a ~1.1B-parameter multi-shard LLaMA checkpoint: wall time and peak memory vs `cp -r`.

    python benchmarks/convert_speed.py [--work-dir DIR] [--repeats N] [--keep] [--markdown PATH] [--cast-dtype D]

The random-weight source checkpoint is built once and cached in the work dir. Every measurement runs in its own
child process (this script with the hidden `--child` flag), so each peak RSS is that process's own. The parent
only uses the standard library: it never imports torch, so it cannot skew what the children measure.
"""
import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from benchmarks.common import PeakAnonymousRss, anonymous_rss_bytes, machine_description, write_markdown_section  # noqa: E402

MARKERS = ("<!-- convert_speed:start -->", "<!-- convert_speed:end -->")
RESULT_PREFIX = "RESULT "
MB = 1_000_000  # decimal megabytes, the unit of transformers' max_shard_size="500MB"

# A TinyLlama-1.1B-shaped model: 22 layers, 32 query heads sharing 4 KV heads (GQA), untied embeddings.
SOURCE_CONFIG = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
)
# bfloat16 keeps the source at 2.2 GB (float32 would be 4.4 GB, and `cp -r` doubles it on disk).
SOURCE_DTYPE = "bfloat16"
MAX_SHARD_SIZE = "500MB"
SOURCE_DIR_NAME = "source-llama-1.1b"
SAFETENSORS_DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# Children write no progress bars: their stderr is captured and only shown if they fail.
CHILD_ENV = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Case:
    """One timed operation: `cp -r` (kind "cp") or `moh_convert.convert(SRC, DST, **options)` (kind "convert")."""

    name: str
    label: str
    kind: str
    options: dict = field(default_factory=dict)


@dataclass
class SourceInfo:
    folder: Path
    parameters: int
    shard_sizes: dict[str, int]  # file name -> bytes
    tensor_names: list[str]

    @property
    def largest_shard(self) -> int:
        return max(self.shard_sizes.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.shard_sizes.values())


def benchmark_cases(cast_dtype: str) -> list[Case]:
    return [
        Case("cp", "`cp -r` (baseline)", "cp"),
        Case("query-norm", "convert, query-norm router, dtype auto (byte copy)", "convert", {"router": "query-norm"}),
        Case("learned", "convert, learned router, dtype auto (byte copy + router shard)", "convert",
             {"router": "learned"}),
        Case("cast", f"convert, query-norm router, {SOURCE_DTYPE} → {cast_dtype} (read/cast/write one tensor at a time)",
             "convert", {"router": "query-norm", "dtype": cast_dtype}),
    ]


# ----------------------------------------------------------------------------------------------------------------
# Child processes. Each prints one `RESULT {json}` line; the parent reads nothing else from them.
# ----------------------------------------------------------------------------------------------------------------

def own_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kilobytes


def report(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def child_build_source(folder: str) -> None:
    """Save a random LLaMA in bfloat16 shards. Weights are created directly in bfloat16 (half the RAM of float32)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**SOURCE_CONFIG)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, SOURCE_DTYPE))
    model.save_pretrained(folder, max_shard_size=MAX_SHARD_SIZE)
    report({"parameters": sum(parameter.numel() for parameter in model.parameters())})


def child_import_only() -> None:
    """The baseline every convert child pays before doing any work: Python + torch + transformers + moh_convert."""
    start = time.perf_counter()
    import moh_convert  # noqa: F401

    seconds = time.perf_counter() - start
    report({"seconds": seconds, "peak_rss": own_peak_rss_bytes(), "peak_anon": anonymous_rss_bytes()})


def child_copy(source: str, output: str) -> None:
    """Time `cp -r`; its peak RSS is the only waited-for child of this process, so RUSAGE_CHILDREN is cp's own."""
    start = time.perf_counter()
    subprocess.run(["cp", "-r", source, output], check=True)
    seconds = time.perf_counter() - start
    report({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024})


def child_convert(source: str, output: str, options_json: str) -> None:
    """Time the convert() call alone; the import cost is measured separately by child_import_only."""
    import moh_convert

    with PeakAnonymousRss() as anonymous:
        start = time.perf_counter()
        moh_convert.convert(source, output, overwrite=True, no_calibration=True, **json.loads(options_json))
        seconds = time.perf_counter() - start
    report({"seconds": seconds, "peak_rss": own_peak_rss_bytes(), "peak_anon": anonymous.peak})


def child_load(output: str) -> None:
    """Untimed sanity check: the converted folder loads natively once moh_convert is imported, and runs."""
    import torch
    from transformers import AutoModelForCausalLM

    import moh_convert  # noqa: F401  (registers the MoH classes with the Auto* factories)

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(output)
    load_seconds = time.perf_counter() - start
    with torch.no_grad():
        logits = model(torch.arange(1, 9).unsqueeze(0)).logits
    report({
        "class": type(model).__name__,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "dtype": str(model.dtype).removeprefix("torch."),
        "load_seconds": load_seconds,
        "logits_finite": bool(torch.isfinite(logits).all()),
    })


CHILD_MODES = {
    "build": child_build_source,
    "import": child_import_only,
    "cp": child_copy,
    "convert": child_convert,
    "load": child_load,
}


def run_child(mode: str, *args: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", mode, *args]
    completed = subprocess.run(command, capture_output=True, text=True, env=CHILD_ENV)
    if completed.returncode != 0:
        raise RuntimeError(f"child {mode!r} failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    results = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    return json.loads(results[-1].removeprefix(RESULT_PREFIX))


# ----------------------------------------------------------------------------------------------------------------
# Source checkpoint (cached)
# ----------------------------------------------------------------------------------------------------------------

def read_weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


def ensure_source_checkpoint(work_dir: Path) -> SourceInfo:
    """Build the source once; a spec file next to it says what it is, so a changed spec triggers a rebuild."""
    folder = work_dir / SOURCE_DIR_NAME
    spec_path = work_dir / f"{SOURCE_DIR_NAME}.json"
    spec = {"config": SOURCE_CONFIG, "dtype": SOURCE_DTYPE, "max_shard_size": MAX_SHARD_SIZE, "seed": 0}
    cached = json.loads(spec_path.read_text()) if spec_path.is_file() else {}
    if cached.get("spec") != spec or not folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
        partial = work_dir / f".{SOURCE_DIR_NAME}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        work_dir.mkdir(parents=True, exist_ok=True)
        print(f"Building the source checkpoint in {folder} (once; cached for re-runs) ...", flush=True)
        start = time.perf_counter()
        built = run_child("build", str(partial))
        partial.rename(folder)  # only a complete checkpoint ever gets the cached name
        cached = {"spec": spec, "parameters": built["parameters"]}
        spec_path.write_text(json.dumps(cached, indent=2) + "\n")
        print(f"  built in {time.perf_counter() - start:.0f} s", flush=True)
    weight_map = read_weight_map(folder)
    shard_sizes = {name: (folder / name).stat().st_size for name in sorted(set(weight_map.values()))}
    return SourceInfo(folder, cached["parameters"], shard_sizes, sorted(weight_map))


# ----------------------------------------------------------------------------------------------------------------
# Verifying outputs (headers and JSON only: the 1B model is never loaded by a timed process)
# ----------------------------------------------------------------------------------------------------------------

def safetensors_header(path: Path) -> dict:
    # Not moh_convert.safetensors_stream's reader: this parent process stays free of torch (importing the package
    # loads it) so that its memory and start-up time are not counted against the timed children.
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
    header.pop("__metadata__", None)
    return header


def verify_copy(source: SourceInfo, output: Path) -> None:
    for name, size in source.shard_sizes.items():
        if (output / name).stat().st_size != size:
            raise AssertionError(f"cp output {output / name} has the wrong size")


def verify_conversion(case: Case, source: SourceInfo, output: Path) -> None:
    config = json.loads((output / "config.json").read_text())
    if config.get("model_type") != "moh" or "AutoModelForCausalLM" not in config.get("auto_map", {}):
        raise AssertionError(f"{output}/config.json is not a MoH config with an auto_map")
    weight_map = read_weight_map(output)
    missing = sorted(set(source.tensor_names) - set(weight_map))
    if missing:
        raise AssertionError(f"{output} index lacks {len(missing)} source tensor(s), e.g. {missing[0]}")
    headers = {name: safetensors_header(output / name) for name in sorted(set(weight_map.values()))}
    for tensor_name, file_name in weight_map.items():
        if tensor_name not in headers[file_name]:
            raise AssertionError(f"{file_name} does not hold {tensor_name}, which the index says it does")
    routers = [name for name in weight_map if ".self_attn.moh." in name]
    if case.options.get("router") == "learned" and not routers:
        raise AssertionError(f"{output} has no router tensors although the router is learned")
    expected_dtype = SAFETENSORS_DTYPE_NAMES[case.options.get("dtype", SOURCE_DTYPE)]
    dtypes = {info["dtype"] for header in headers.values() for info in header.values()}
    if dtypes != {expected_dtype}:
        raise AssertionError(f"{output} holds {sorted(dtypes)} tensors, expected only {expected_dtype}")


# ----------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------

def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def measure_once(case: Case, source: SourceInfo, output: Path) -> dict:
    remove(output)
    # Flush the previous run's dirty pages (untimed) so one run's writeback does not slow the next one down.
    os.sync()
    if case.kind == "cp":
        result = run_child("cp", str(source.folder), str(output))
        verify_copy(source, output)
    else:
        result = run_child("convert", str(source.folder), str(output), json.dumps(case.options))
        verify_conversion(case, source, output)
    return result


def check_query_norm_output_loads(output: Path, source: SourceInfo) -> dict:
    loaded = run_child("load", str(output))
    print(
        f"Load check: {output.name} loads as {loaded['class']} ({loaded['parameters']:,} parameters, "
        f"{loaded['dtype']}) in {loaded['load_seconds']:.1f} s; forward pass logits finite: {loaded['logits_finite']}",
        flush=True,
    )
    if loaded["parameters"] != source.parameters or not loaded["logits_finite"]:
        raise AssertionError(f"load check failed: {loaded}")
    return loaded


def run_benchmark(cases: list[Case], source: SourceInfo, work_dir: Path, repeats: int, keep: bool):
    outputs = {case.name: work_dir / f"out-{case.name}" for case in cases}
    try:
        return measure_all(cases, source, outputs, repeats, keep)
    finally:
        if not keep:  # also after a failure or Ctrl-C: outputs are 2.2 GB each
            for output in outputs.values():
                remove(output)


def measure_all(cases: list[Case], source: SourceInfo, outputs: dict[str, Path], repeats: int, keep: bool):
    # One untimed run of every case first: it puts the source in the page cache, brings the write path of the disk
    # up to speed (the first big writes of a session are often the slowest), and checks that every case works
    # before any time is spent on repeats.
    print("Warm-up: one untimed run of every case ...", flush=True)
    for case in cases:
        measure_once(case, source, outputs[case.name])
        remove(outputs[case.name])

    import_runs = [run_child("import") for _ in range(repeats)]
    runs: dict[str, list[dict]] = {case.name: [] for case in cases}
    load_check = None
    # Repeats are interleaved (all cases, then all cases again) so slow drift hits every case alike, and the order
    # is rotated each time so that no case always runs right after the same other case: deleting and flushing the
    # previous output still affects the next write a little, so a fixed order would bias one case.
    for repeat in range(1, repeats + 1):
        shift = (repeat - 1) % len(cases)
        for case in cases[shift:] + cases[:shift]:
            result = measure_once(case, source, outputs[case.name])
            runs[case.name].append(result)
            print(f"  [{repeat}/{repeats}] {case.name:<10} {result['seconds']:6.2f} s  "
                  f"peak RSS {result['peak_rss'] / MB:7.0f} MB  (output verified)", flush=True)
            if case.name == "query-norm" and repeat == repeats:
                # Checked here, not at the end, so its 2.2 GB output need not sit on disk beside the others.
                load_check = check_query_norm_output_loads(outputs[case.name], source)
            if not keep:
                remove(outputs[case.name])
    return import_runs, runs, load_check


# ----------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------

def seconds_cell(results: list[dict]) -> str:
    times = [result["seconds"] for result in results]
    return f"{statistics.median(times):.2f} ({min(times):.2f})"


def ratio_cell(results: list[dict], baseline: list[dict]) -> str:
    times, baseline_times = [r["seconds"] for r in results], [r["seconds"] for r in baseline]
    median_ratio = statistics.median(times) / statistics.median(baseline_times)
    return f"{median_ratio:.2f} ({min(times) / min(baseline_times):.2f})"


def results_table(cases: list[Case], import_runs: list[dict], runs: dict, source: SourceInfo) -> str:
    import_rss = statistics.median(result["peak_rss"] for result in import_runs)
    import_anon = statistics.median(result["peak_anon"] for result in import_runs)
    lines = [
        "| Case | Wall time, median (min) [s] | × `cp -r`, median (min) | Peak RSS [MB] "
        "| Peak RSS − import-only [MB] | (Peak RSS − import-only) ÷ largest shard "
        "| Peak anonymous RSS − import-only [MB] (÷ largest shard) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| import moh_convert only (child baseline) | {seconds_cell(import_runs)} | – | {import_rss / MB:.0f} "
        f"| 0 | – | 0 (baseline itself: {import_anon / MB:.0f} MB anonymous) |",
    ]
    for case in cases:
        results = runs[case.name]
        peak_rss = max(result["peak_rss"] for result in results)  # the worse of the repeats
        if case.kind == "cp":
            above_import, shard_ratio, anon_above_import = "– (not Python)", "–", "–"
        else:
            above_import = f"{(peak_rss - import_rss) / MB:.0f}"
            shard_ratio = f"{(peak_rss - import_rss) / source.largest_shard:.2f}"
            anon = max(result["peak_anon"] for result in results) - import_anon
            anon_above_import = f"{anon / MB:.0f} ({anon / source.largest_shard:.2f})"
        lines.append(
            f"| {case.label} | {seconds_cell(results)} | {ratio_cell(results, runs['cp'])} | {peak_rss / MB:.0f} "
            f"| {above_import} | {shard_ratio} | {anon_above_import} |"
        )
    return "\n".join(lines)


def markdown_section(command: str, source: SourceInfo, repeats: int, table: str, load_check: dict | None) -> str:
    shards = len(source.shard_sizes)
    load_line = (
        f"- Load check (untimed): the query-norm output loads with `AutoModelForCausalLM.from_pretrained` after "
        f"`import moh_convert` as `{load_check['class']}` ({load_check['load_seconds']:.1f} s) and gives finite logits."
        if load_check else None
    )
    return "\n".join(line for line in [
        "## `moh convert` speed and peak memory",
        "",
        f"- Command: `{command}` (from the repository root)",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine_description()}",
        f"- Checkpoint: random-weight `LlamaForCausalLM` ({SOURCE_CONFIG['num_hidden_layers']} layers, hidden "
        f"{SOURCE_CONFIG['hidden_size']}, {SOURCE_CONFIG['num_attention_heads']} heads / "
        f"{SOURCE_CONFIG['num_key_value_heads']} KV heads), {source.parameters:,} parameters, {SOURCE_DTYPE}, "
        f"{shards} safetensors shards (`max_shard_size=\"{MAX_SHARD_SIZE}\"`), largest shard "
        f"{source.largest_shard / MB:.0f} MB, {source.total_bytes / MB:.0f} MB in all",
        f"- Method: every run is its own child process; one untimed warm-up run of every case first (puts the "
        f"source in the page cache); then {repeats} timed repeats, interleaved across cases in rotated order, with "
        "the previous output deleted and `sync` run (untimed) before every run. Wall time covers the `cp -r` or "
        "`convert()` call only (the Python import is the first row); writes may still be in the page cache when it "
        "ends, as with any `cp`. Peak RSS is the child's `ru_maxrss` (max over repeats; for `cp -r`, cp's own); it "
        "counts file pages the process has mmapped (safetensors loads shards by mmap) but not the page cache that "
        "writes go through. Peak anonymous RSS is `RssAnon` sampled every 5 ms: the memory the process really "
        "allocated. MB = 10⁶ bytes. Every output was checked (config `auto_map`, index lists every source tensor, "
        "tensor dtypes) without loading the model.",
        load_line,
        "",
        table,
    ] if line is not None)


# ----------------------------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark `moh convert` (wall time and peak RSS against `cp -r`) on a ~1.1B-parameter random "
        f"LLaMA checkpoint in {SOURCE_DTYPE} safetensors shards, and write the results table into BENCHMARKS.md.",
    )
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "bench-output" / "convert",
                        help="where the source checkpoint is cached and outputs are written: 2.2 GB for the source "
                        "plus one output at a time, 2.2 GB (4.4 GB for --cast-dtype float32) "
                        "(default: bench-output/convert in the repo)")
    # 3, not 2: on a VM one run in a few can be several times slower (the write path), and a median of 2 runs is
    # just their mean, so one slow run would move it; with 3 the median ignores it.
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (default: 3)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the last copied/converted output of each case (2.2 GB each) instead of deleting "
                        "it")
    parser.add_argument("--markdown", type=Path, default=REPO_ROOT / "BENCHMARKS.md",
                        help="Markdown file whose convert_speed section is written or replaced (default: BENCHMARKS.md "
                        "in the repo)")
    parser.add_argument("--cast-dtype", choices=["float16", "float32"], default="float16",
                        help="target dtype of the dtype-conversion case (default: float16, the same size as the "
                        "bfloat16 source; float32 doubles that output to 4.4 GB)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # internal: run one measurement
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        mode, *child_args = args.child
        CHILD_MODES[mode](*child_args)
        return
    if args.repeats < 1:
        sys.exit("--repeats must be at least 1")
    command = shlex.join(["python", *sys.argv])
    work_dir = args.work_dir.expanduser().resolve()
    source = ensure_source_checkpoint(work_dir)
    print(f"Source: {source.parameters:,} parameters, {len(source.shard_sizes)} shards, largest "
          f"{source.largest_shard / MB:.0f} MB, {source.total_bytes / MB:.0f} MB in all", flush=True)
    cases = benchmark_cases(args.cast_dtype)
    import_runs, runs, load_check = run_benchmark(cases, source, work_dir, args.repeats, args.keep)
    table = results_table(cases, import_runs, runs, source)
    print()
    print(table)
    write_markdown_section(args.markdown, MARKERS, markdown_section(command, source, args.repeats, table, load_check))
    print(f"\nWrote the convert_speed section of {args.markdown}")


if __name__ == "__main__":
    main()
