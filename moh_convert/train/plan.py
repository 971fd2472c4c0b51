"""What a recipe means for one launch (`TrainingPlan`), and every check that can fail before any model is loaded:
model config, data files, sequence length, batch divisibility, step budget, what is trainable, routing losses,
existing checkpoints. Each error names the recipe key to fix."""
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import MoHError
from ..sources import check_source
from ..text_sources import TEXT_SUFFIXES, check_text_file
from .checkpoints import CHECKPOINTS_DIR, latest_checkpoint
from .distill import resolve_teacher
from .recipe import DataSource, TrainRecipe

MOA_LOAD_BALANCE_COEF = 0.01  # MoA (Zhang et al. 2022): switch-style load-balance loss ...
MOA_Z_LOSS_COEF = 0.001  # ... and router z-loss
MOH_LOAD_BALANCE_COEF = 0.01  # MoH paper: beta


@dataclass
class TrainingPlan:
    """What the recipe means for this launch (derived once, before any model is loaded)."""

    num_processes: int
    sequences_per_step: int
    sequences_per_process: int
    gradient_accumulation_steps: int
    max_steps: int
    model_folder: str
    source_config: dict
    is_moh: bool
    aux_loss: str
    load_balance_coef: float
    router_z_loss_coef: float
    lora_targets: list[str] | None = None
    teacher: str | None = None  # the distillation teacher (recipe `distill:`), None without distillation


def read_model_config(model: str) -> tuple[str, dict]:
    """(local folder, config.json as a dict) without loading any weights; Hub ids go through the HF cache."""
    folder = Path(model).expanduser()
    if not folder.exists():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(model, allow_patterns=["*.json"]))
        except Exception as error:  # offline, unknown repo, bad id: one line either way
            raise MoHError(f"recipe key 'model': {model!r} is neither a local folder nor a Hub model ({error})") from None
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise MoHError(f"recipe key 'model': {folder} has no config.json; point it at a model folder")
    try:
        return str(folder), json.loads(config_path.read_text())
    except ValueError as error:
        raise MoHError(f"recipe key 'model': {config_path} is not valid JSON ({error})") from None


def text_config_of(config: dict) -> dict:
    return config.get("text_config") or config if config.get("model_type") == "moh" else config


def check_data_source(source: DataSource, key: str) -> None:
    """Every local data file exists, is UTF-8 text and (JSONL) has the column on every line: training reads its
    files lazily, so without this a bad byte or line would stop a run only after the model is loaded."""
    has_text = False
    for path in source.paths():
        if not path.is_file():
            raise MoHError(f"recipe key '{key}.path': file {path} not found")
        if path.suffix not in TEXT_SUFFIXES:
            raise MoHError(f"recipe key '{key}.path': {path} must be a .txt or .jsonl file")
        try:
            has_text = check_text_file(path, source.column, f"recipe key '{key}.column'") or has_text
        except MoHError as error:
            raise MoHError(f"recipe key '{key}.path': {error}") from None
    if source.paths() and not has_text:
        raise MoHError(f"recipe key '{key}.path': {', '.join(map(str, source.paths()))} hold(s) no text")


def check_tokenizer(model: str, model_folder: str) -> None:
    """A local model folder must hold tokenizer files: without them AutoTokenizer would quietly make a tiny
    vocabulary of special tokens and training would run on nonsense. (Hub models come with theirs.)"""
    if Path(model).expanduser().is_dir():
        check_source(model_folder, "recipe key 'model'")


def default_lora_targets(text_config: dict, save: str, router: str | None) -> list[str]:
    """Every linear layer of a decoder block except o_proj (MoH gates its input) and, for adapters on a query-norm
    router, the query projection (the router reads its output, which an unmerged adapter would change)."""
    fused = text_config.get("model_type") == "phi3"
    targets = ["qkv_proj", "gate_up_proj", "down_proj"] if fused else [
        "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"
    ]
    if save == "adapter" and router == "query-norm":
        targets = [target for target in targets if target not in ("q_proj", "qkv_proj")]
    return targets


def plan_training(recipe: TrainRecipe, num_processes: int, distributed_type: str = "NO",
                  resume: bool = False) -> TrainingPlan:
    """Every check that can fail without loading the model, each naming the recipe key to fix."""
    model_folder, config = read_model_config(recipe.model)
    check_tokenizer(recipe.model, model_folder)
    text_config = text_config_of(config)
    is_moh = config.get("model_type") == "moh"

    for source, key in zip(recipe.data, recipe.data_keys()):
        check_data_source(source, key)
    if recipe.eval_data is not None:
        check_data_source(recipe.eval_data, "eval_data")
    batches = plan_batches(recipe, num_processes, text_config.get("max_position_embeddings"))
    lora_targets = check_trainable(recipe, model_folder, config, text_config, distributed_type)
    losses = plan_routing_losses(recipe, model_folder, config)
    teacher = resolve_teacher(recipe, config)

    if recipe.eval_windows % num_processes:
        # Every process must run the same number of forwards (FSDP/DeepSpeed gather weights in each one).
        raise MoHError(f"recipe key 'eval_windows': {recipe.eval_windows} held-out sequences cannot be shared "
                       f"evenly by {num_processes} processes; use a multiple of {num_processes}")

    checkpoints = Path(recipe.output_dir).expanduser() / CHECKPOINTS_DIR
    if not resume and latest_checkpoint(checkpoints) is not None:
        raise MoHError(
            f"recipe key 'output_dir': {recipe.output_dir} already holds checkpoints; pass --resume to continue "
            "that run or choose another output_dir"
        )
    return TrainingPlan(
        num_processes=num_processes,
        sequences_per_step=batches.sequences_per_step,
        sequences_per_process=batches.sequences_per_step // num_processes,
        gradient_accumulation_steps=batches.gradient_accumulation_steps,
        max_steps=batches.max_steps,
        model_folder=model_folder,
        source_config=config,
        is_moh=is_moh,
        aux_loss=losses.aux_loss,
        load_balance_coef=losses.load_balance_coef,
        router_z_loss_coef=losses.router_z_loss_coef,
        lora_targets=lora_targets,
        teacher=teacher,
    )


@dataclass
class BatchLayout:
    sequences_per_step: int
    gradient_accumulation_steps: int
    max_steps: int


def plan_batches(recipe: TrainRecipe, num_processes: int, max_positions: int | None) -> BatchLayout:
    """Sequences per optimizer step, micro-batches per process and the number of steps."""
    if max_positions is not None and recipe.seq_len > max_positions:
        raise MoHError(
            f"recipe key 'seq_len': {recipe.seq_len} is above the model's max_position_embeddings ({max_positions}); "
            f"use at most {max_positions}"
        )
    if recipe.global_batch_tokens % recipe.seq_len:
        raise MoHError(
            f"recipe key 'global_batch_tokens': {recipe.global_batch_tokens} is not a multiple of seq_len "
            f"({recipe.seq_len}); use e.g. {max(1, recipe.global_batch_tokens // recipe.seq_len) * recipe.seq_len}"
        )
    sequences_per_step = recipe.global_batch_tokens // recipe.seq_len
    per_forward = recipe.micro_batch_size * num_processes
    if sequences_per_step % per_forward:
        raise MoHError(
            f"recipe key 'global_batch_tokens': {sequences_per_step} sequences per step cannot be split into "
            f"micro_batch_size ({recipe.micro_batch_size}) x {num_processes} process(es); make global_batch_tokens "
            f"a multiple of {per_forward * recipe.seq_len} or change micro_batch_size"
        )
    if (recipe.max_tokens is None) == (recipe.max_steps is None):
        raise MoHError("recipe keys 'max_tokens' / 'max_steps': give exactly one of them")
    max_steps = recipe.max_steps or math.ceil(recipe.max_tokens / recipe.global_batch_tokens)
    if recipe.warmup_steps >= max_steps:
        raise MoHError(f"recipe key 'warmup_steps': {recipe.warmup_steps} must be below the {max_steps} training steps")
    if recipe.final_learning_rate > recipe.learning_rate:
        raise MoHError("recipe key 'final_learning_rate': must not exceed learning_rate (the cosine decays to it)")
    return BatchLayout(sequences_per_step, sequences_per_step // per_forward, max_steps)


def check_trainable(recipe: TrainRecipe, model_folder: str, config: dict, text_config: dict,
                    distributed_type: str) -> list[str] | None:
    """Checks `trainable` (and `lora`) against the model; returns the LoRA target modules (None without LoRA)."""
    is_moh = config.get("model_type") == "moh"
    router = config.get("router") if is_moh else None
    if recipe.trainable in ("routers", "attention") and not is_moh:
        what = "routers" if recipe.trainable == "routers" else "MoH attention blocks"
        raise MoHError(f"recipe key 'trainable': {model_folder} is not a MoH model, so it has no {what}; use 'all' "
                       "or 'lora'")
    if recipe.trainable == "routers":
        if router != "learned" and not config.get("head_fallback"):
            raise MoHError(
                "recipe key 'trainable': 'routers' needs router parameters, but this model's router is "
                f"{router!r} (parameter-free); use 'all' or 'lora', or convert/calibrate with a learned router"
            )
    if recipe.trainable != "lora":
        return None
    if distributed_type == "FSDP":
        raise MoHError("recipe key 'trainable': lora is not supported with FSDP here; use DDP or DeepSpeed, "
                       "or trainable: all with FSDP")
    lora_targets = recipe.lora.target_modules or default_lora_targets(text_config, recipe.lora.save, router)
    if recipe.lora.save == "adapter" and is_moh:
        # An unmerged adapter runs in peft's own wrapper around the module; MoH's hooks sit on the wrapped base
        # layer, so the LoRA branch would see o_proj's input ungated (and a query-norm router the queries
        # without the LoRA update). Merged saves are fine: training re-attaches the hooks to the wrappers.
        hooked = {"o_proj"} | ({"q_proj", "qkv_proj"} if router == "query-norm" else set())
        clash = sorted(hooked & set(lora_targets))
        if clash:
            raise MoHError(
                f"recipe key 'lora.target_modules': {', '.join(clash)} cannot be saved as an adapter on a MoH "
                "model (MoH gates/reads these modules, an unmerged adapter would bypass that); drop them or "
                "use lora.save: merged"
            )
    return lora_targets


@dataclass
class LossSettings:
    aux_loss: str
    load_balance_coef: float
    router_z_loss_coef: float


def plan_routing_losses(recipe: TrainRecipe, model_folder: str, config: dict) -> LossSettings:
    """Which routing losses the run adds, and their weights (recipe values, else the defaults of that loss)."""
    is_moh = config.get("model_type") == "moh"
    aux_loss = recipe.aux_loss
    if aux_loss == "auto":
        is_moa = is_moh and config.get("gate_mode") == "softmax" and not any(config.get("shared_heads") or [])
        aux_loss = "moa" if is_moa else ("moh" if is_moh else "none")
    if aux_loss != "none" and not is_moh:
        raise MoHError(f"recipe key 'aux_loss': {aux_loss!r} needs a MoH model; {model_folder} is dense")
    if aux_loss == "none":
        return LossSettings(aux_loss, 0.0, 0.0)
    default_lb = MOA_LOAD_BALANCE_COEF if aux_loss == "moa" else MOH_LOAD_BALANCE_COEF
    default_z = MOA_Z_LOSS_COEF if aux_loss == "moa" else 0.0
    return LossSettings(
        aux_loss,
        recipe.load_balance_coef if recipe.load_balance_coef is not None else default_lb,
        recipe.router_z_loss_coef if recipe.router_z_loss_coef is not None else default_z,
    )
