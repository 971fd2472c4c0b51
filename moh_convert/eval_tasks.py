"""Which lm-eval tasks `moh eval` and `moh heads` run, and how lm-eval builds them.

Suites and the specs of local twins are package data (moh_convert/eval_suites/, read through importlib.resources,
so an installed wheel has them too). Online, tasks are lm-eval's built-ins (lm-eval downloads their data sets).
Offline (`data_dir`), every task runs as a *local twin*: a generated task YAML that includes the built-in task's
YAML unchanged and only points its data at JSONL files (see eval_suites/local_tasks.yaml), so prompts, choices and
metrics are lm-eval's own.
"""
import functools
import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import MoHError

# Suites and twin specs are data shipped inside the package (moh_convert/eval_suites/), found wherever it is installed.
EVAL_DATA = files("moh_convert") / "eval_suites"
SUITES_FILE = EVAL_DATA / "suites.yaml"
LOCAL_TASKS_FILE = EVAL_DATA / "local_tasks.yaml"
LAYOUTS_FILE = EVAL_DATA / "local_layouts.py"
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
        None, description="Benchmark suite (moh_convert/eval_suites/suites.yaml): paper, commonsense or quick "
        "(default: quick)."
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


def read_eval_data(path) -> dict:
    """One YAML file of the package's eval_suites/ data (a path or an importlib.resources Traversable)."""
    import yaml

    if not path.is_file():
        raise MoHError(f"{path} is missing; moh eval reads its suites and task specs from the package data in "
                       "moh_convert/eval_suites/ (reinstall moh_convert)")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


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
    (folder / LAYOUTS_FILE.name).write_bytes(LAYOUTS_FILE.read_bytes())  # a real file, wherever the package is
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
