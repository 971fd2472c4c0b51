"""`moh eval`: lm-eval benchmark suites on a MoH model and its dense baseline, online or from local JSONL files.

This module loads the models, runs lm-eval on them and writes the results, the comparison and the table; which
tasks run, and the local twins that run them offline, are eval_tasks.py's job (its names used elsewhere are
re-exported here).
"""
import json
import os
import statistics
from pathlib import Path

from .errors import MoHError
from .eval_tasks import (  # noqa: F401 (re-exported: moh_convert.analysis and callers import them from here)
    SUITES_FILE,
    EvalOptions,
    LoadedTask,
    TaskRequest,
    TaskRunOptions,
    load_suites,
    load_tasks,
    requested_tasks,
    task_manager_for,
    write_local_tasks,
)
from .model_folder import StagedFolder
from .options import validate_options
from .sources import check_source

# lm-eval's default of 100000 bootstrap resamples takes minutes for perplexity-type stderrs; 1000 is plenty for
# the standard errors it reports next to scores (the table itself does not use them).
BOOTSTRAP_ITERS = 1000
DTYPES = ("auto", "float32", "bfloat16", "float16")


# ---------------------------------------------------------------------------------------------------- running models


def load_model(source: str, work_dir: Path, dtype: str, device: str | None):
    """(model, tokenizer) from a Hub id, folder or .gguf; MoH folders load natively (moh_convert is imported)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .sources import resolve_source

    checkpoint = resolve_source(source, work_dir)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(checkpoint.folder, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def active_heads_fraction(config) -> float:
    """Mean over layers of active heads per token / all heads (1.0 for a dense model)."""
    if getattr(config, "model_type", None) != "moh":
        return 1.0
    per_layer = [config.active_heads(layer_idx) / config.num_heads for layer_idx in range(config.num_layers)]
    return statistics.fmean(per_layer)


def run_lm_eval(model, tokenizer, loaded: list[LoadedTask], task_manager, opts: EvalOptions) -> dict:
    """lm-eval's results dict for one model on the loaded tasks."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    # backend="causal": MoH's model_type is not in transformers' causal-LM list, which lm-eval would warn about.
    # softmax_dtype: log-likelihoods in float32 even when the weights are bfloat16/float16.
    lm = HFLM(
        pretrained=model, tokenizer=tokenizer, batch_size=opts.batch_size, backend="causal", softmax_dtype="float32"
    )
    objects = [obj for item in loaded for obj in item.objects]
    return simple_evaluate(
        model=lm,
        tasks=objects,
        task_manager=task_manager,
        num_fewshot=None,  # set per task by load_tasks
        limit=opts.limit,
        bootstrap_iters=BOOTSTRAP_ITERS,
        log_samples=False,
    )


def evaluate_one_model(source: str, label: str, loaded, task_manager, opts: EvalOptions, work_dir: Path):
    """Load, evaluate and free one model: (lm-eval results, fraction of heads active)."""
    import gc

    print(f"[moh eval] {label}: {source}", flush=True)
    model, tokenizer = load_model(source, work_dir / label, opts.dtype, opts.device)
    fraction = active_heads_fraction(model.config)
    results = run_lm_eval(model, tokenizer, loaded, task_manager, opts)
    del model
    gc.collect()
    return results, fraction


def write_results_json(results: dict, path: Path) -> None:
    from lm_eval.utils import handle_non_serializable

    path.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------- report


def table_metric(task_scores: dict, task_name: str, suites: dict) -> str:
    """The lm-eval result key ("metric,filter") the table reports for a task."""
    preferred = [suites["task_metrics"][task_name]] if task_name in (suites.get("task_metrics") or {}) else []
    for key in preferred + suites["metric_preference"]:
        if key in task_scores:
            return key
    raise MoHError(f"{task_name} reported none of the metrics the table knows ({', '.join(sorted(task_scores))}); "
                   f"add it to task_metrics in {SUITES_FILE}")


def metric_label(key: str) -> str:
    metric, _, filter_name = key.partition(",")
    return metric if filter_name in ("", "none") else key


def score_percent(results: dict, task_name: str, key: str) -> float:
    return 100.0 * float(results["results"][task_name][key])


def build_comparison(
    model: str, baseline: str | None, fraction: float, loaded: list[LoadedTask], moh_results: dict,
    baseline_results: dict | None,
) -> dict:
    """The comparison.json document (scores in percent)."""
    suites = load_suites()
    rows = []
    for item in loaded:
        for task_name in item.rows:
            key = table_metric(moh_results["results"][task_name], task_name, suites)
            rows.append({
                "task": task_name,
                "metric": metric_label(key),
                "num_fewshot": item.num_fewshot,
                "moh": score_percent(moh_results, task_name, key),
                "baseline": score_percent(baseline_results, task_name, key) if baseline_results else None,
            })
    average = {
        "moh": statistics.fmean(row["moh"] for row in rows),
        "baseline": statistics.fmean(row["baseline"] for row in rows) if baseline_results else None,
    }
    return {"model": model, "baseline": baseline, "active_heads_fraction": fraction, "tasks": rows, "average": average}


def render_table(comparison: dict) -> str:
    """A Markdown table like the paper's: one row per task, baseline vs MoH, delta, average."""
    has_baseline = comparison["baseline"] is not None
    moh_column = f"MoH ({comparison['active_heads_fraction']:.0%} heads)"
    header = ["task", "metric", "shots"] + (["baseline (100% heads)", moh_column, "Δ"] if has_baseline else [moh_column])
    lines = ["| " + " | ".join(header) + " |", "| --- | --- | ---: |" + " ---: |" * (len(header) - 3)]

    def score_cells(moh: float, baseline: float | None) -> list[str]:
        if not has_baseline:
            return [f"{moh:.1f}"]
        return [f"{baseline:.1f}", f"{moh:.1f}", f"{moh - baseline:+.1f}"]

    for row in comparison["tasks"]:
        cells = [row["task"], row["metric"], str(row["num_fewshot"])] + score_cells(row["moh"], row["baseline"])
        lines.append("| " + " | ".join(cells) + " |")
    average = comparison["average"]
    cells = ["**average**", "", ""] + score_cells(average["moh"], average["baseline"])
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_document(comparison: dict, opts: EvalOptions) -> str:
    """results_table.md: what was compared, on which data, then the table."""
    compared = f"`{comparison['model']}`" + (f" vs baseline `{comparison['baseline']}`" if comparison["baseline"] else "")
    data = f"local JSONL files in `{opts.data_dir}` (twin tasks in `local_tasks/`)" if opts.data_dir else "lm-eval's data sets"
    limit = f"first {opts.limit} documents of each task" if opts.limit else "all documents"
    return (
        f"# moh eval: {compared}\n\n"
        f"Scores in percent (lm-eval); {limit}; data: {data}.\n\n" + render_table(comparison)
    )


def default_output(model: str) -> Path:
    """./eval-<name>: the folder or .gguf file's name, or the name part of a Hub id."""
    path = Path(model).expanduser()
    name = path.resolve().name if path.exists() else str(model).rstrip("/").split("/")[-1]
    return Path(f"eval-{name.removesuffix('.gguf')}")


# ---------------------------------------------------------------------------------------------------- API and CLI


def is_eval_output(path: Path) -> bool:
    """A folder an earlier `moh eval` wrote (which a new run may replace)."""
    return any((path / name).exists() for name in ("comparison.json", "results_moh.json", "results_table.md"))


def evaluate(model: str | os.PathLike, **options) -> dict:
    """Evaluate MODEL (and `baseline`, if given) with lm-eval and write the results to `output`.

    Keyword options are those of `EvalOptions` (the same as the CLI flags). Writes results_moh.json and
    results_baseline.json (lm-eval's results), comparison.json and results_table.md; returns the comparison. The
    output folder is assembled out of sight and renamed into place when complete; it replaces an earlier `moh eval`
    output (or an empty folder), never another folder.
    """
    opts = validate_options(EvalOptions, options)
    model = str(model)
    requests = requested_tasks(opts)
    # Both models are checked before the first one runs: a missing baseline must not cost a whole evaluation.
    check_source(model, "model")
    if opts.baseline:
        check_source(opts.baseline, "--baseline")
    output = Path(opts.output) if opts.output else default_output(model)
    local_models = [Path(name).expanduser() for name in (model, opts.baseline) if name]
    with StagedFolder(output, sources=[path for path in local_models if path.exists()], overwrite=True,
                      replaceable=is_eval_output, what="a `moh eval` output folder") as staged:
        folder = staged.path
        folder.mkdir()
        scratch = staged.work_dir / ".models"  # dequantized GGUF sources; not part of the output
        task_manager = task_manager_for(requests, opts.data_dir, folder / "local_tasks")
        loaded = load_tasks(task_manager, requests)
        moh_results, fraction = evaluate_one_model(model, "moh", loaded, task_manager, opts, scratch)
        write_results_json(moh_results, folder / "results_moh.json")
        baseline_results = None
        if opts.baseline:
            baseline_results, _ = evaluate_one_model(opts.baseline, "baseline", loaded, task_manager, opts, scratch)
            write_results_json(baseline_results, folder / "results_baseline.json")
        comparison = build_comparison(model, opts.baseline, fraction, loaded, moh_results, baseline_results)
        (folder / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
        (folder / "results_table.md").write_text(table_document(comparison, opts))
        staged.move_into_place()
    return comparison


def suites_help() -> str:
    try:
        suites = load_suites()["suites"]
    except MoHError:
        return ""
    lines = [f"  {name}: {', '.join(f'{task}({shots})' for task, shots in suite['tasks'].items())}"
             for name, suite in suites.items()]
    return "suites (task(few-shot count)), from moh_convert/eval_suites/suites.yaml:\n" + "\n".join(lines) + "\n\n"
