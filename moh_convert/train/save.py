"""The trained model as a folder laid out like `moh convert` output (or a peft adapter folder), with the run's
training_summary.json and a Training section in its model card."""
import json
from pathlib import Path

import torch

from ..model_card import CARD_NAME, TRAINING_SUMMARY, update_model_card
from ..model_folder import DTYPES, StagedFolder, copy_support_files, finish_saved_moh_folder
from .plan import TrainingPlan, text_config_of
from .recipe import TrainRecipe

FINAL_MODEL_DIR = "model"


def save_final_model(accelerator, model, recipe: TrainRecipe, plan: TrainingPlan, summary: dict, tokenizer) -> Path:
    """Write output_dir/model, assembled in a hidden staging folder inside output_dir and renamed into place when
    complete. Every process must call it (FSDP/DeepSpeed gather the weights here); the main process writes."""
    state_dict = accelerator.get_state_dict(model)
    output = Path(recipe.output_dir).expanduser().resolve() / FINAL_MODEL_DIR
    if accelerator.is_main_process:
        # The run's own earlier result (same output_dir) is replaced; output_dir itself is locked by the run.
        with StagedFolder(output, overwrite=True, replaceable=is_saved_model_folder,
                          what="a model folder saved by `moh train`") as staged:
            source = Path(plan.model_folder)
            if recipe.trainable == "lora" and recipe.lora.save == "adapter":
                accelerator.unwrap_model(model).save_pretrained(staged.path, state_dict=state_dict)
                tokenizer.save_pretrained(staged.path)
            else:
                write_model_folder(staged.path, accelerator.unwrap_model(model), state_dict, recipe, plan)
            write_training_report(staged.path, source, summary, plan.is_moh)
            staged.move_into_place()
    accelerator.wait_for_everyone()
    return output


def is_saved_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def save_dtype(recipe: TrainRecipe, plan: TrainingPlan) -> torch.dtype:
    """The recipe's save_dtype, or for `auto` the source model's own dtype (float32 when its config has none)."""
    name = recipe.save_dtype if recipe.save_dtype != "auto" else str(
        text_config_of(plan.source_config).get("dtype") or plan.source_config.get("dtype") or "float32")
    return DTYPES.get(name.replace("torch.", ""), torch.float32)


def write_model_folder(folder: Path, unwrapped, state_dict: dict, recipe: TrainRecipe, plan: TrainingPlan) -> None:
    """Full weights (LoRA merged in) in the save dtype, the source's tokenizer and support files, and for a MoH
    model the config's auto_map and the shipped modeling code."""
    if recipe.trainable == "lora":
        unwrapped.load_state_dict(state_dict)
        unwrapped = unwrapped.merge_and_unload()
        state_dict = unwrapped.state_dict()
    dtype = save_dtype(recipe, plan)
    state_dict = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor
                  for name, tensor in state_dict.items()}
    unwrapped.config.use_cache = True
    unwrapped.save_pretrained(folder, state_dict=state_dict)
    copy_support_files(Path(plan.model_folder), folder)  # tokenizer, chat template, generation config, reports
    if plan.is_moh:
        finish_saved_moh_folder(folder, str(dtype).replace("torch.", ""))


def write_training_report(folder: Path, source: Path, summary: dict, is_moh: bool) -> None:
    """training_summary.json, and the source's model card with a Training section."""
    (folder / TRAINING_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    if (source / CARD_NAME).is_file():
        card = (source / CARD_NAME).read_text().replace(  # the convert-time card's claim no longer holds
            "The source model's tensors are unchanged.", "The model was then continue-tuned (see Training).")
        (folder / CARD_NAME).write_text(card)
        if is_moh and (folder / "config.json").is_file():
            update_model_card(folder)  # adds/refreshes the Training section from training_summary.json
