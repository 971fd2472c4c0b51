"""`moh train RECIPE.yaml`: continue-tune a (MoH) model with accelerate, on one CPU or many GPUs.

    recipe.py        the YAML schema, `--set` overrides, validation messages
    plan.py          what the recipe means for this launch; every check before a model is loaded
    token_stream.py  documents -> packed seq_len sequences, resumable
    model_setup.py   model loading, what is trainable (all | routers | LoRA), AdamW, learning-rate schedule
    losses.py        routing losses from what the MoH routing modules record
    checkpoints.py   checkpoints and --resume
    metrics.py       metrics.jsonl and the training summary
    save.py          the final model folder
    loop.py          `train()`: the loop, top to bottom

Run it as `moh train RECIPE.yaml`, `python -m moh_convert.train RECIPE.yaml` or
`accelerate launch --config_file CONFIG.yaml -m moh_convert.train RECIPE.yaml [--set key=value] [--resume]`.
"""
from .checkpoints import latest_checkpoint, save_checkpoint
from .losses import RoutingLosses, routing_losses
from .loop import train
from .model_setup import build_optimizer, learning_rate_at, make_trainable
from .plan import TrainingPlan, plan_training
from .recipe import DataSource, LoraSettings, TrainRecipe, load_recipe
from .save import FINAL_MODEL_DIR, save_final_model
from .token_stream import MixedTokenStream, PackedTokenStream, take, training_stream

__all__ = [
    "DataSource", "FINAL_MODEL_DIR", "LoraSettings", "MixedTokenStream", "PackedTokenStream", "RoutingLosses", "TrainRecipe",
    "TrainingPlan", "build_optimizer", "latest_checkpoint", "learning_rate_at", "load_recipe", "make_trainable",
    "plan_training", "routing_losses", "save_checkpoint", "save_final_model", "take", "train", "training_stream",
]
