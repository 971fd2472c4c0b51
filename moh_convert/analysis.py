"""`moh heads`: how often each routed head is selected, per task (the MoH paper's head-load figure, Fig. 3).

The documents of each task (lm-eval's zero-shot prompt followed by the reference answer) run through the MoH model
with routing recorded. A routed head's *density* in a layer is the share of real (non-padding) tokens that
selected it; since every token selects exactly top-K routed heads, a layer's densities sum to K.
"""
import json
import os
import tempfile
from pathlib import Path

from pydantic import Field

from .errors import MoHError
from .evaluate import TaskRunOptions
from .options import validate_options

# Task documents are short; the cap only guards memory against an unusually long one.
MAX_TOKENS = 1024


class HeadsOptions(TaskRunOptions):
    """Options of `moh heads` / `moh_convert.analysis.head_load()`."""

    tasks: list[str] | None = Field(
        None, description="Comma-separated lm-eval tasks, one panel each (default: the quick suite's tasks)."
    )
    layer: int | None = Field(None, description="Layer to plot; negative counts from the end (default: the last).")
    limit: int = Field(200, description="Documents per task.")
    batch_size: int = Field(8, description="Documents per forward pass.")
    output: str = Field("heads.png", description="PNG to write; the per-layer data goes next to it as .json.")


# ---------------------------------------------------------------------------------------------------- documents


def reference_answer(task, doc) -> str:
    """The continuation lm-eval scores as correct for `doc` (with the task's delimiter where lm-eval adds one)."""
    target = task.doc_to_target(doc)
    if isinstance(target, list):  # several correct targets: any one will do
        target = target[0]
    delimiter = task.config.target_delimiter
    if task.OUTPUT_TYPE == "loglikelihood":
        return str(target)
    if task.OUTPUT_TYPE == "multiple_choice" and not task.multiple_input:
        choices = task.doc_to_choice(doc)
        return delimiter + (choices[target] if isinstance(target, int) else str(target))
    return delimiter + str(target)


def document_text(task, doc) -> str:
    """lm-eval's zero-shot prompt for `doc` followed by its reference answer."""
    context = task.fewshot_context(doc, num_fewshot=0)
    if isinstance(context, list):  # several contexts, one per choice (winogrande): doc_to_text picks the gold one
        context = context[task.doc_to_text(doc)]
    return context + reference_answer(task, doc)


def task_documents(loaded_task, limit: int) -> list[str]:
    """Up to `limit` document texts of one requested task (a group's tasks are read in order)."""
    from lm_eval.api.group import Group

    tasks = []
    for obj in loaded_task.objects:
        tasks += obj.get_all_tasks() if isinstance(obj, Group) else [obj]
    texts = []
    for task in tasks:
        for doc in task.eval_docs:
            if len(texts) == limit:
                return texts
            texts.append(document_text(task, doc))
    return texts


# ---------------------------------------------------------------------------------------------------- counting


def moh_routing_modules(model) -> list:
    """The MoHHeadRouting module of every layer; MoHError for a model that is not MoH."""
    from .modeling.modeling_moh import routing_modules

    routings = routing_modules(model)
    if not routings:
        raise MoHError("the model has no routed heads (not a MoH model); convert it first with `moh convert`")
    return routings


def count_head_selections(model, tokenizer, texts: list[str], batch_size: int) -> tuple[list[list[float]], int]:
    """Per layer, how many real tokens selected each routed head; and the number of real tokens."""
    import torch

    routings = moh_routing_modules(model)
    counts = [torch.zeros(len(routing.routed_heads), dtype=torch.float64) for routing in routings]
    num_tokens = 0
    device = next(model.parameters()).device
    # Similar lengths in a batch waste less compute on padding.
    ordered = sorted(texts, key=len)
    for routing in routings:
        routing.record_routing = True
    try:
        for start in range(0, len(ordered), batch_size):
            batch = tokenizer(
                ordered[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                max_length=MAX_TOKENS,
            ).to(device)
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            real = batch["attention_mask"].unsqueeze(-1).to(torch.float64)  # [batch, seq, 1]
            for layer_counts, routing in zip(counts, routings):
                layer_counts += (routing.last_routed_mask.to(torch.float64) * real).sum(dim=(0, 1)).cpu()
            num_tokens += int(batch["attention_mask"].sum())
    finally:
        for routing in routings:
            routing.record_routing = False
            routing.last_routed_mask = routing.last_router_probs = None
    return [layer_counts.tolist() for layer_counts in counts], num_tokens


def layer_densities(counts: list[list[float]], num_tokens: int, routings) -> list[dict]:
    return [
        {
            "layer": routing.layer_idx,
            "routed_heads": list(routing.routed_heads),
            "routed_top_k": routing.routed_top_k,  # calibrated models choose K per layer
            "density": [count / num_tokens for count in layer_counts],
        }
        for layer_counts, routing in zip(counts, routings)
    ]


# ---------------------------------------------------------------------------------------------------- figure


def head_load_figure(data: dict, layer: int):
    """One bar chart per task: density of each routed head in `layer`, with the uniform share for reference."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    tasks = list(data["tasks"])
    columns = min(len(tasks), 3)
    rows = -(-len(tasks) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False, sharey=True)
    for axis in axes.flat[len(tasks):]:
        axis.set_visible(False)
    for axis, task_name in zip(axes.flat, tasks):
        task_data = data["tasks"][task_name]
        layer_data = task_data["layers"][layer]
        heads = layer_data["routed_heads"]
        axis.bar(range(len(heads)), layer_data["density"], color="tab:blue")
        axis.axhline(layer_data["routed_top_k"] / len(heads), color="gray", linestyle="--", linewidth=1, label="uniform")
        axis.set_xticks(range(len(heads)), [str(head) for head in heads])
        axis.set_title(f"{task_name} ({task_data['tokens']} tokens)", fontsize=10)
        axis.set_xlabel("routed head")
        axis.set_ylim(0, 1)
    for axis in axes[:, 0]:
        axis.set_ylabel("share of tokens selecting it")
    axes.flat[0].legend(loc="upper right", fontsize=8)
    top_k = data["tasks"][tasks[0]]["layers"][layer]["routed_top_k"]
    figure.suptitle(
        f"{data['model_name']}: routed-head load in layer {layer} "
        f"(top-{top_k} of {len(heads)} routed heads per token)",
        fontsize=11,
    )
    figure.tight_layout()
    return figure


def save_figure(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------- API and CLI


def resolve_layer(layer: int | None, num_layers: int) -> int:
    index = num_layers - 1 if layer is None else layer
    if index < 0:
        index += num_layers
    if not 0 <= index < num_layers:
        raise MoHError(f"--layer {layer} is out of range: the model has {num_layers} layers (0..{num_layers - 1})")
    return index


def head_load(model: str | os.PathLike, **options) -> dict:
    """Count routed-head selections of MODEL on each task's documents; write the figure and its JSON data.

    Keyword options are those of `HeadsOptions`. Returns the JSON document: per task, the number of documents and
    tokens and, per layer, each routed head's density (share of tokens that selected it; a layer sums to top-K)."""
    from .evaluate import TaskRequest, load_model, load_suites, load_tasks, task_manager_for

    opts = validate_options(HeadsOptions, options)
    names = opts.tasks if opts.tasks is not None else list(load_suites()["suites"]["quick"]["tasks"])
    if not names:
        raise MoHError("--tasks is empty; give lm-eval task names separated by commas, e.g. arc_easy,piqa")
    requests = [TaskRequest(name, 0) for name in names]
    output = Path(opts.output)
    if output.suffix.lower() != ".png":
        raise MoHError(f"--output {output} must be a .png file")

    with tempfile.TemporaryDirectory(prefix="moh-heads-") as work_dir:
        task_manager = task_manager_for(requests, opts.data_dir, Path(work_dir) / "local_tasks")
        loaded = load_tasks(task_manager, requests)
        documents = {item.request.name: task_documents(item, opts.limit) for item in loaded}
        model_obj, tokenizer = load_model(str(model), Path(work_dir) / "model", opts.dtype, opts.device)
    routings = moh_routing_modules(model_obj)
    layer = resolve_layer(opts.layer, len(routings))
    prepare_padding(tokenizer)

    data = {
        "model": str(model),
        "model_name": Path(str(model).rstrip("/")).name,
        "routed_top_k": [routing.routed_top_k for routing in routings],
        "plotted_layer": layer,
        "tasks": {},
    }
    for name, texts in documents.items():
        print(f"[moh heads] {name}: {len(texts)} documents", flush=True)
        counts, num_tokens = count_head_selections(model_obj, tokenizer, texts, opts.batch_size)
        data["tasks"][name] = {
            "documents": len(texts),
            "tokens": num_tokens,
            "layers": layer_densities(counts, num_tokens, routings),
        }
    output.parent.mkdir(parents=True, exist_ok=True)
    save_figure(head_load_figure(data, layer), output)
    output.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    return data


def prepare_padding(tokenizer) -> None:
    """Right padding (real tokens keep their positions) with a pad token, borrowing EOS when there is none."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
