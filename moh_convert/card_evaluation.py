"""`moh eval` results in a model card: the schema of an eval output folder's comparison.json, the card's Evaluation
section (the results table) and its model-index metadata (the MoH model's own scores)."""
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ValidationError

from .errors import MoHError

EVAL_TABLE = "results_table.md"
EVAL_COMPARISON = "comparison.json"


class EvalTaskResult(BaseModel):
    task: str
    metric: str
    num_fewshot: int
    moh: float
    baseline: float | None = None


class EvalAverage(BaseModel):
    moh: float
    baseline: float | None = None


class EvalComparison(BaseModel):
    """Schema of `comparison.json` in a `moh eval` output folder (extra keys are allowed and ignored)."""

    model: str
    baseline: str | None = None
    active_heads_fraction: float
    tasks: list[EvalTaskResult]
    average: EvalAverage


@dataclass
class Evaluation:
    comparison: EvalComparison
    table: str  # results_table.md as `moh eval` wrote it


def load_evaluation(eval_dir: str | Path) -> Evaluation:
    """Read a `moh eval` output folder; a missing file or a schema mismatch is a MoHError naming it."""
    eval_dir = Path(eval_dir).expanduser()
    if not eval_dir.is_dir():
        raise MoHError(f"eval folder {eval_dir} not found; pass the output folder of `moh eval`")
    for file_name in (EVAL_COMPARISON, EVAL_TABLE):
        if not (eval_dir / file_name).is_file():
            raise MoHError(f"eval folder {eval_dir} has no {file_name}; pass the output folder of `moh eval`")
    comparison_path = eval_dir / EVAL_COMPARISON
    try:
        comparison = EvalComparison.model_validate_json(comparison_path.read_text())
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, item['loc'])) or 'file'}: {item['msg']}" for item in error.errors(include_url=False)
        )
        raise MoHError(f"{comparison_path} does not match the `moh eval` schema ({problems})") from None
    if not comparison.tasks:
        raise MoHError(f"{comparison_path} lists no tasks; nothing to publish")
    return Evaluation(comparison=comparison, table=without_headings((eval_dir / EVAL_TABLE).read_text()))


def without_headings(markdown: str) -> str:
    """results_table.md opens with its own title; inside the card's Evaluation section that would be a second
    page title, so headings are dropped and the prose and table are kept."""
    return "\n".join(line for line in markdown.strip().splitlines() if not line.startswith("#")).strip()


def evaluation_section(evaluation: Evaluation) -> str:
    comparison = evaluation.comparison
    baseline = f"; baseline: `{comparison.baseline}`" if comparison.baseline else ""
    return (
        "## Evaluation\n\n"
        f"Measured with `moh eval` (lm-evaluation-harness) with {comparison.active_heads_fraction:.0%} of attention "
        f"heads active per token{baseline}.\n\n"
        f"{evaluation.table}\n"
    )


def eval_results(evaluation: Evaluation) -> list:
    """The MoH model's own scores as huggingface_hub EvalResults (the card's model-index); baselines stay in the
    table, since model-index describes this model only."""
    from huggingface_hub import EvalResult

    return [
        EvalResult(
            task_type="text-generation",
            dataset_type=result.task,
            dataset_name=result.task,
            dataset_args={"num_few_shot": result.num_fewshot},
            metric_type=result.metric,
            metric_name=f"{result.metric} ({result.num_fewshot}-shot)",
            metric_value=result.moh,
        )
        for result in evaluation.comparison.tasks
    ]
