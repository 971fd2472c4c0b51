"""What a run reports: metrics.jsonl (one JSON object per logged step, plus accelerate's trackers such as
TensorBoard) and the training summary saved next to the final model."""
import json
from dataclasses import dataclass
from pathlib import Path

from .checkpoints import ResumePoint
from .plan import TrainingPlan
from .recipe import TrainRecipe

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """output_dir/metrics.jsonl, written by the main process, and the trackers, fed by every process."""

    def __init__(self, accelerator, output_dir: Path):
        self.accelerator, self.path = accelerator, output_dir / METRICS_FILE

    def start(self, recipe: TrainRecipe, start: ResumePoint) -> None:
        """A fresh file, or on resume the lines up to the checkpoint's step (the resumed run redoes the others)."""
        if self.accelerator.is_main_process:
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= start.step] \
                if start.checkpoint is not None and self.path.is_file() else []
            self.path.write_text("".join(line + "\n" for line in kept))
        self.accelerator.init_trackers("moh_train", config={k: v for k, v in recipe.model_dump().items()
                                                            if isinstance(v, (int, float, str, bool))})

    def write(self, metrics: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(metrics) + "\n")
        self.accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])


@dataclass
class RunOutcome:
    """The numbers of a finished run that its summary reports."""

    final_train_loss: float | None
    heldout_perplexity_before: float | None
    heldout_perplexity_after: float | None
    wall_seconds: float


def data_description(recipe: TrainRecipe, teacher: str | None) -> str | list[str]:
    """What the run trained on: a single source as before (a path, a list of paths, a dataset, or generated text);
    several as one line each with their share."""
    def describe(source) -> str | list[str]:
        return source.dataset or source.path or (
            f"generated: {source.generate} ({source.generate_tokens} tokens written by {teacher or 'the model'})")

    if len(recipe.data) == 1:
        return describe(recipe.data[0])
    total = sum(source.weight for source in recipe.data)
    return [f"{source.weight / total:.0%}: {describe(source)}" for source in recipe.data]


def training_summary(recipe: TrainRecipe, plan: TrainingPlan, mixed_precision: str, outcome: RunOutcome,
                     teacher=None) -> dict:
    """training_summary.json: what was trained, how, and the results (the model card's Training section)."""
    tokens_per_step = plan.sequences_per_step * recipe.seq_len
    distill = recipe.distill
    return {
        "base_model": recipe.model,
        "data": data_description(recipe, plan.teacher),
        "steps": plan.max_steps,
        "tokens": plan.max_steps * tokens_per_step,
        "seq_len": recipe.seq_len,
        "global_batch_tokens": tokens_per_step,
        "learning_rate": f"{recipe.learning_rate:g} -> {recipe.final_learning_rate:g} (warmup {recipe.warmup_steps}, cosine)",
        "trainable": recipe.trainable + (f" (r={recipe.lora.r}, {', '.join(plan.lora_targets)}, {recipe.lora.save})"
                                         if recipe.trainable == "lora" else ""),
        "objective": "next-token loss" if teacher is None else (
            f"distillation from {teacher.source}: KL at temperature {distill.temperature:g} (weight "
            f"{distill.kl_weight:g}), next-token loss weight {distill.lm_loss_weight:g}, hidden states weight "
            f"{distill.hidden_states_weight:g}; teacher in {str(teacher.dtype).removeprefix('torch.')}"),
        "aux_loss": plan.aux_loss,
        "load_balance_coef": plan.load_balance_coef,
        "router_z_loss_coef": plan.router_z_loss_coef,
        "processes": plan.num_processes,
        "mixed_precision": mixed_precision,
        "final_train_loss": outcome.final_train_loss,
        "heldout_perplexity_before": outcome.heldout_perplexity_before,
        "heldout_perplexity_after": outcome.heldout_perplexity_after,
        "wall_seconds_this_run": round(outcome.wall_seconds, 1),
    }
