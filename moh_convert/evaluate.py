"""`moh eval`: lm-eval benchmark suites on a MoH model and its dense baseline, online or from local JSONL files.

Online, tasks are lm-eval's built-ins (lm-eval downloads their data sets). Offline (`data_dir`), every task runs as
a *local twin*: a generated task YAML that includes the built-in task's YAML unchanged and only points its data at
JSONL files (see eval/local_tasks.yaml), so prompts, choices and metrics are lm-eval's own.
"""
import functools
import json
import os
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import MoHError
from .options import validate_options

# Suites and twin specs are data, kept next to the package in the repository (eval/).
EVAL_DIR = Path(__file__).resolve().parent.parent / "eval"
SUITES_FILE = EVAL_DIR / "suites.yaml"
LOCAL_TASKS_FILE = EVAL_DIR / "local_tasks.yaml"
LAYOUTS_FILE = EVAL_DIR / "local_layouts.py"
# lm-eval's default of 100000 bootstrap resamples takes minutes for perplexity-type stderrs; 1000 is plenty for
# the standard errors it reports next to scores (the table itself does not use them).
BOOTSTRAP_ITERS = 1000
DTYPES = ("auto", "float32", "bfloat16", "float16")
SPLIT_ROLES = ("training_split", "validation_split", "test_split", "fewshot_split")


class TaskRunOptions(BaseModel):
    """Options every command that runs a model over lm-eval tasks' documents shares (`moh eval`, `moh heads`)."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] | None = Field(None, description="Comma-separated lm-eval task names.")
    data_dir: str | None = Field(
        None,
        description="Offline: folder of JSONL files in the field layout of the HF data sets (e.g. ../shared/data/eval); "
        "without it lm-eval downloads the data sets.",
    )
    device: str | None = Field(None, description="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto keeps the checkpoint's."
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def split_commas(cls, value):
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value


class EvalOptions(TaskRunOptions):
    """Options of `moh eval` / `moh_convert.evaluate.evaluate()`."""

    baseline: str | None = Field(
        None, description="Dense model to compare with, usually the source of the conversion (Hub id, folder or .gguf)."
    )
    suite: str | None = Field(
        None, description="Benchmark suite from eval/suites.yaml: paper, commonsense or quick (default: quick)."
    )
    tasks: list[str] | None = Field(None, description="Comma-separated lm-eval task names, instead of --suite.")
    num_fewshot: int | None = Field(
        None, description="Few-shot examples for every task (default: the suite's count, else the task's own)."
    )
    limit: int | None = Field(None, description="Evaluate only the first N documents of each task.")
    batch_size: int = Field(16, description="Sequences per forward pass.")
    output: str | None = Field(None, description="Folder for the results (default: ./eval-<model folder name>).")


@dataclass(frozen=True)
class TaskRequest:
    """One requested lm-eval task, group or tag and its few-shot count (None: the task's own default)."""

    name: str
    num_fewshot: int | None


# ---------------------------------------------------------------------------------------------------- suites


def read_eval_data(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise MoHError(f"{path} is missing; moh eval reads its suites and task specs from the repository's eval/ folder")
    return yaml.safe_load(path.read_text())


def load_suites() -> dict:
    return read_eval_data(SUITES_FILE)


def requested_tasks(opts: EvalOptions) -> list[TaskRequest]:
    """The tasks of --tasks or of the suite, with the few-shot count each one runs with."""
    if opts.suite and opts.tasks:
        raise MoHError("give either --suite or --tasks, not both")
    if opts.tasks is not None:
        if not opts.tasks:
            raise MoHError("--tasks is empty; give lm-eval task names separated by commas, e.g. arc_easy,piqa")
        return [TaskRequest(name, opts.num_fewshot) for name in opts.tasks]
    suites = load_suites()
    suite_name = opts.suite or suites["default_suite"]
    if suite_name not in suites["suites"]:
        raise MoHError(f"unknown suite {suite_name!r}; choose one of {', '.join(suites['suites'])} (see {SUITES_FILE})")
    suite_tasks = suites["suites"][suite_name]["tasks"]
    return [
        TaskRequest(name, opts.num_fewshot if opts.num_fewshot is not None else shots)
        for name, shots in suite_tasks.items()
    ]


def effective_shots(requested: int | None, task_default: int | None) -> int:
    """Few-shot count a task runs with, by lm-eval's own rule: a task whose config pins 0 shots stays 0-shot."""
    if task_default == 0:
        return 0
    if requested is not None:
        return requested
    return task_default or 0


# ---------------------------------------------------------------------------------------------------- local twins


@functools.lru_cache(maxsize=1)
def builtin_task_index() -> dict:
    """lm-eval's index of its built-in tasks, groups and tags: name -> Entry (kind, yaml_path, cfg)."""
    from lm_eval.tasks import TaskManager

    return TaskManager().task_index


def member_names(name: str, index: dict) -> list[str]:
    """`name` itself and every group, tag and task below it, parents first."""
    entry = index.get(name)
    if entry is None:
        raise MoHError(f"unknown lm-eval task {name!r}; list the available ones with `lm_eval ls tasks`")
    kind = entry.kind.name
    if kind == "TAG":
        return [name] + [member for task in sorted(entry.tags) for member in member_names(task, index)]
    if kind == "GROUP":
        members = [name]
        for child in entry.cfg["task"]:
            child_name = child if isinstance(child, str) else child.get("task", child.get("group"))
            if child_name not in index:
                raise MoHError(f"lm-eval group {name!r} defines task {child_name!r} inline; it has no local twin, run it online")
            members += member_names(child_name, index)
        return members
    if kind != "TASK":
        raise MoHError(f"lm-eval task {name!r} is defined in Python, not YAML; it has no local twin, run it online")
    return [name]


def split_file_candidates(task_name: str, split: str, config: dict, data_dir: Path, patterns: list[str]) -> list[Path]:
    fields = {
        "task": task_name,
        "split": split,
        "dataset": str(config.get("dataset_path") or "").rstrip("/").split("/")[-1],
        "subset": config.get("dataset_name") or "",
    }
    return [data_dir / pattern.format(**fields) for pattern in patterns]


def fewshot_source_split(config: dict) -> str | None:
    """The split lm-eval draws few-shot examples from (its fallback order: train, validation, test)."""
    fewshot_config = config.get("fewshot_config") or {}
    if fewshot_config.get("samples") is not None:
        return None  # examples are written into the task config itself
    return (
        fewshot_config.get("split")
        or config.get("fewshot_split")
        or config.get("training_split")
        or config.get("validation_split")
        or config.get("test_split")
    )


def twin_config(task_name: str, entry, data_dir: Path, num_fewshot: int | None, patterns: list[str]) -> dict:
    """The YAML mapping of one local twin: the built-in YAML included, data files from data_dir.

    Raises MoHError naming the file when the split the task is scored on, or (with few-shot prompts) the split
    its examples come from, has no file. Other splits without a file are switched off in the twin."""
    config = entry.cfg
    if config.get("custom_dataset") is not None:
        raise MoHError(f"lm-eval task {task_name!r} builds its own data set in Python; it has no local twin, run it online")
    eval_split = config.get("test_split") or config.get("validation_split")
    if eval_split is None:
        raise MoHError(f"lm-eval task {task_name!r} declares neither a test nor a validation split")
    shots = effective_shots(num_fewshot, config.get("num_fewshot"))
    needed = {eval_split: "documents it is scored on"}
    fewshot_split = fewshot_source_split(config) if shots > 0 else None
    if fewshot_split is not None:
        needed.setdefault(fewshot_split, f"its {shots}-shot examples")

    data_files, missing_splits = {}, set()
    declared = {config.get(role) for role in SPLIT_ROLES} | {(config.get("fewshot_config") or {}).get("split")}
    for split in sorted(split for split in declared if split):
        candidates = split_file_candidates(task_name, split, config, data_dir, patterns)
        found = next((path for path in candidates if path.is_file()), None)
        if found is not None:
            data_files[split] = str(found.resolve())
            continue
        if split in needed:
            expected = " or ".join(str(path) for path in candidates)
            raise MoHError(f"no local data for {task_name} ({needed[split]}, split {split!r}): expected {expected}")
        missing_splits.add(split)

    twin = {
        "include": str(entry.yaml_path),
        "task": task_name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": data_files},
    }
    # A declared split without a file would make lm-eval index a split the JSON data set does not have.
    for role in SPLIT_ROLES:
        if config.get(role) in missing_splits:
            twin[role] = None
    fewshot_config = config.get("fewshot_config")
    if fewshot_config and fewshot_config.get("split") in missing_splits:
        twin["fewshot_config"] = {**fewshot_config, "split": None}
    return twin


def twin_yaml_text(task_name: str, twin: dict, process_docs: str | None) -> str:
    import yaml

    header = (
        f"# Local twin of lm-eval's built-in task {task_name!r}, generated by moh_convert: the built-in YAML is\n"
        "# included unchanged (prompt, choices, metrics); only the data comes from local JSONL files.\n"
    )
    text = header + yaml.safe_dump(twin, sort_keys=False, allow_unicode=True)
    if process_docs:  # a !function tag cannot be written by safe_dump
        text += f"process_docs: !function {process_docs}\n"
    return text


def group_twin_text(group_name: str, entry) -> str:
    # The built-in group config unchanged; its members resolve by name to the twins in the same folder.
    return f"# Built-in lm-eval group {group_name!r}, over the local twins of its tasks.\ninclude: {entry.yaml_path}\n"


def write_local_tasks(
    requests: list[TaskRequest | str], data_dir: str | os.PathLike, folder: str | os.PathLike
) -> Path:
    """Write a local twin YAML for every task behind `requests` (and the built-in config of every group among
    them) into `folder`, plus local_layouts.py. Returns `folder`. A plain task name runs with its own few-shot
    count.

    The twins keep the built-in names. lm-eval can run them on their own (`TaskManager(include_path=folder,
    include_defaults=False)`) or in place of the built-ins (`lm_eval --include_path FOLDER`)."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise MoHError(f"--data-dir {data_dir} is not a folder")
    specs = read_eval_data(LOCAL_TASKS_FILE)
    index = builtin_task_index()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(LAYOUTS_FILE, folder / LAYOUTS_FILE.name)
    for request in requests:
        if isinstance(request, str):
            request = TaskRequest(request, None)
        for name in member_names(request.name, index):
            kind = index[name].kind.name
            if kind == "GROUP":
                (folder / f"{name}.yaml").write_text(group_twin_text(name, index[name]))
            elif kind == "TASK":
                task_spec = (specs.get("tasks") or {}).get(name, {})
                patterns = task_spec.get("file_patterns", specs["file_patterns"])
                twin = twin_config(name, index[name], data_dir, request.num_fewshot, patterns)
                (folder / f"{name}.yaml").write_text(twin_yaml_text(name, twin, task_spec.get("process_docs")))
    return folder


def task_manager_for(requests: list[TaskRequest], data_dir: str | None, twins_folder: Path | None):
    """A TaskManager that resolves the requested names to built-in tasks (online) or to local twins (data_dir)."""
    from lm_eval.tasks import TaskManager

    if data_dir is None:
        return TaskManager()
    write_local_tasks(requests, data_dir, twins_folder)
    # Only the twins: scanning lm-eval's thousands of built-in YAMLs again would take ~10 s.
    return TaskManager(include_path=str(twins_folder), include_defaults=False)


# ---------------------------------------------------------------------------------------------------- loading tasks


@dataclass
class LoadedTask:
    """A requested name as lm-eval built it: the object(s) to evaluate and the rows it gives the results table."""

    request: TaskRequest
    objects: list  # lm-eval Task / Group objects
    rows: list[str]  # result names: the task or group itself, or each task of a tag
    num_fewshot: int


def load_tasks(task_manager, requests: list[TaskRequest]) -> list[LoadedTask]:
    """Build every requested task (this loads its documents) and set its few-shot count."""
    loaded = []
    for request in requests:
        if request.name not in task_manager.task_index:
            raise MoHError(f"unknown lm-eval task {request.name!r}; list the available ones with `lm_eval ls tasks`")
        built = build_task(task_manager, request.name)
        shots = 0
        for task in built["tasks"].values():
            task_shots = effective_shots(request.num_fewshot, task.get_config("num_fewshot"))
            task.set_config(key="num_fewshot", value=task_shots)
            shots = max(shots, task_shots)
        if request.name in built["groups"]:
            objects, rows = [built["groups"][request.name]], [request.name]
        elif request.name in built["tasks"]:
            objects, rows = [built["tasks"][request.name]], [request.name]
        else:  # a tag: just several tasks
            objects, rows = list(built["tasks"].values()), sorted(built["tasks"])
        loaded.append(LoadedTask(request, objects, rows, shots))
    return loaded


def build_task(task_manager, name: str) -> dict:
    """lm-eval's TaskManager.load for one name, with data problems turned into one-line MoHErrors."""
    from jinja2.exceptions import UndefinedError

    try:
        return task_manager.load([name])
    except UndefinedError as error:  # a prompt template reads a field the documents lack
        raise MoHError(
            f"the documents of {name} lack a field its lm-eval prompt reads ({error}); "
            "local files must have the field layout of the Hugging Face data set the built-in task reads"
        ) from None
    except (ConnectionError, OSError, ValueError, KeyError) as error:
        raise MoHError(
            f"could not load the documents of {name}: {type(error).__name__}: {error}. "
            "Offline? Pass --data-dir with the task's JSONL files."
        ) from None


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


def evaluate(model: str | os.PathLike, **options) -> dict:
    """Evaluate MODEL (and `baseline`, if given) with lm-eval and write the results to `output`.

    Keyword options are those of `EvalOptions` (the same as the CLI flags). Writes results_moh.json and
    results_baseline.json (lm-eval's results), comparison.json and results_table.md; returns the comparison.
    """
    opts = validate_options(EvalOptions, options)
    model = str(model)
    requests = requested_tasks(opts)
    output = Path(opts.output) if opts.output else default_output(model)
    output.mkdir(parents=True, exist_ok=True)
    twins_folder = output / "local_tasks"
    shutil.rmtree(twins_folder, ignore_errors=True)  # ours: rewritten on every run
    task_manager = task_manager_for(requests, opts.data_dir, twins_folder)
    loaded = load_tasks(task_manager, requests)

    with tempfile.TemporaryDirectory(prefix="moh-eval-") as work_dir:
        moh_results, fraction = evaluate_one_model(model, "moh", loaded, task_manager, opts, Path(work_dir))
        write_results_json(moh_results, output / "results_moh.json")
        baseline_results = None
        if opts.baseline:
            baseline_results, _ = evaluate_one_model(opts.baseline, "baseline", loaded, task_manager, opts, Path(work_dir))
            write_results_json(baseline_results, output / "results_baseline.json")

    comparison = build_comparison(model, opts.baseline, fraction, loaded, moh_results, baseline_results)
    (output / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    (output / "results_table.md").write_text(table_document(comparison, opts))
    return comparison


def suites_help() -> str:
    try:
        suites = load_suites()["suites"]
    except MoHError:
        return ""
    lines = [f"  {name}: {', '.join(f'{task}({shots})' for task, shots in suite['tasks'].items())}"
             for name, suite in suites.items()]
    return "suites (task(few-shot count)), from eval/suites.yaml:\n" + "\n".join(lines) + "\n\n"


def register_cli(commands) -> None:
    """`moh eval MODEL [options]`: flags generated from EvalOptions."""
    import argparse

    from .options import add_options_to_parser, options_from_args

    parser = commands.add_parser(
        "eval",
        help="run lm-eval benchmark suites on a MoH model and its dense baseline",
        description="Evaluate MODEL (a MoH folder, or any causal LM) with lm-eval, and BASELINE on the same tasks, and "
        "write lm-eval's results JSON for each, comparison.json and a Markdown table like the MoH paper's "
        "(one row per task: baseline, MoH, delta; average; fraction of heads active). Online, tasks are lm-eval's "
        "built-ins; with --data-dir they run offline as twins of the built-ins reading local JSONL files.",
        epilog=suites_help()
        + "examples:\n"
        "  moh eval smollm2-moh --baseline HuggingFaceTB/SmolLM2-135M --suite commonsense\n"
        "  moh eval smollm2-moh --baseline ./smollm2 --data-dir ../shared/data/eval \\\n"
        "      --tasks arc_easy,piqa,winogrande,hellaswag,lambada_openai --limit 200\n"
        "outputs (in --output): results_moh.json, results_baseline.json, comparison.json, results_table.md,\n"
        "  local_tasks/ (the twins; reuse them with `lm_eval --include_path OUTPUT/local_tasks`)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="model to evaluate: MoH folder, checkpoint folder, Hub id or .gguf")
    add_options_to_parser(parser, EvalOptions)

    def run(args):
        options = options_from_args(args, EvalOptions)
        comparison = evaluate(args.model, **options)
        output = Path(options.get("output") or default_output(args.model))
        print(render_table(comparison))
        print(f"results written to {output}/ (comparison.json, results_table.md, results_*.json)")

    parser.set_defaults(handler=run)
