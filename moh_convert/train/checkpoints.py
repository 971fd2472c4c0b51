"""Checkpoints of a run: `output_dir/checkpoints/step-NNNNNNNN/` holds accelerate's `save_state` (model, optimizer,
RNG) and `trainer_state.json` (step, data position, ...), which is written last and so marks the checkpoint
complete. `--resume` continues from the newest complete one."""
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"  # written last in a checkpoint: its presence marks the checkpoint complete


@dataclass
class ResumePoint:
    """Where a run starts: step 0, or the step, data position and first held-out perplexity of a checkpoint."""

    step: int = 0
    sequences_consumed: int = 0
    heldout_perplexity_before: float | None = None
    checkpoint: Path | None = None


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """Checkpoints whose trainer_state.json was written, oldest first."""
    if not checkpoints.is_dir():
        return []
    complete = [path for path in checkpoints.glob("step-*") if (path / TRAINER_STATE).is_file()]
    return sorted(complete, key=lambda path: int(path.name.split("-")[1]))


def remove_unfinished_checkpoints(checkpoints: Path) -> None:
    """Checkpoints a killed run was still writing (`.step-*.partial`): never resumed from, so removed (and said)."""
    unfinished = sorted(checkpoints.glob(".step-*.partial")) if checkpoints.is_dir() else []
    for path in unfinished:
        shutil.rmtree(path, ignore_errors=True)
    if unfinished:
        print(f"moh train: removed {len(unfinished)} unfinished checkpoint(s) of an interrupted run: "
              + ", ".join(path.name for path in unfinished), file=sys.stderr)


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint (one whose trainer_state.json was written), or None."""
    complete = complete_checkpoints(checkpoints)
    return complete[-1] if complete else None


def save_checkpoint(accelerator, checkpoints: Path, trainer_state: dict, keep: int) -> Path:
    """accelerate save_state (model, optimizer, RNG) + trainer_state.json, assembled under a .partial name and
    renamed when complete, so a run killed while saving resumes from the previous checkpoint."""
    final = checkpoints / f"step-{trainer_state['step']:08d}"
    partial = checkpoints / f".{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in complete_checkpoints(checkpoints)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume_point(accelerator, checkpoints: Path, stream, resume: bool) -> ResumePoint:
    """With `resume`, restore the newest checkpoint: model/optimizer/RNG through accelerate, the data position into
    `stream`, and return its step; otherwise (or with no checkpoint) step 0."""
    checkpoint = latest_checkpoint(checkpoints) if resume else None
    if checkpoint is None:
        if resume:
            accelerator.print(f"No checkpoint in {checkpoints}; starting from step 0")
        return ResumePoint()
    accelerator.load_state(str(checkpoint))
    trainer_state = json.loads((checkpoint / TRAINER_STATE).read_text())
    stream.load_state_dict(trainer_state["data_state"])
    point = ResumePoint(trainer_state["step"], trainer_state["sequences_consumed"],
                        trainer_state.get("heldout_perplexity_before"), checkpoint)
    accelerator.print(f"Resuming from {checkpoint} (step {point.step}, {point.sequences_consumed} sequences done)")
    return point
