"""`moh train RECIPE.yaml`: continue-tune a (MoH) model with accelerate, on one CPU or many GPUs.

One training loop, top to bottom, in the style of accelerate's examples:

    recipe -> validated before any model is loaded (unknown keys, data files, seq_len, batch divisibility)
    -> Accelerator (DDP / FSDP / DeepSpeed / CPU come from `accelerate launch --config_file ...`)
    -> tokenizer, model, what is trainable (all | routers | lora), AdamW
    -> packed token stream: every process reads the same stream and takes its own slice of each global batch,
       so a run gives the same losses whatever the number of processes (same global batch, same micro-batches)
    -> per step: micro-batches with gradient accumulation, loss = LM loss + routing losses, clip, AdamW, LR
    -> metrics.jsonl (+ TensorBoard when installed), held-out perplexity every `eval_every` steps,
       checkpoints every `save_every` steps (accelerate save_state + step/data position), `--resume`
    -> final model folder with the same layout as `moh convert` output and a Training section in its card.

Routing losses are computed here from what each MoH routing module records during a training forward
(`last_router_probs`, `last_routed_mask`), so the shipped modeling files stay inference code.
"""
import argparse
import itertools
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import MoHError

METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"  # written last in a checkpoint: its presence marks the checkpoint complete
FINAL_MODEL_DIR = "model"
TEXT_CHUNK_CHARS = 1 << 16  # .txt files are tokenized in pieces of about 64 KB, cut at line ends
MOA_LOAD_BALANCE_COEF = 0.01  # MoA (Zhang et al. 2022): switch-style load-balance loss ...
MOA_Z_LOSS_COEF = 0.001  # ... and router z-loss
MOH_LOAD_BALANCE_COEF = 0.01  # MoH paper: beta


# ================================================================================================ recipe


class DataSource(BaseModel):
    """Training or held-out text: local .txt/.jsonl file(s), or a Hugging Face dataset (streamed)."""

    model_config = ConfigDict(extra="forbid")

    path: str | list[str] | None = Field(None, description=".txt or .jsonl file(s), read in order.")
    dataset: str | None = Field(None, description="Hugging Face dataset name (instead of `path`).")
    dataset_config: str | None = Field(None, description="Config name of the dataset.")
    split: str = Field("train", description="Split of the dataset.")
    column: str = Field("text", description="Text column of the dataset, or key of each JSONL record.")
    streaming: bool = Field(True, description="Stream the dataset instead of downloading it whole.")

    @model_validator(mode="after")
    def one_source(self):
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of `path` (local .txt/.jsonl files) or `dataset` (Hub dataset name)")
        return self

    def paths(self) -> list[Path]:
        paths = [self.path] if isinstance(self.path, str) else list(self.path or [])
        return [Path(path).expanduser() for path in paths]


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch input.")
    target_modules: list[str] | None = Field(
        None,
        description="Module names to adapt. Default: every linear layer of the decoder except o_proj (MoH gates "
        "o_proj's input) and, for adapters on a query-norm router, the query projection.",
    )
    save: Literal["merged", "adapter"] = Field(
        "merged", description="merged: LoRA folded into the saved MoH model; adapter: a peft adapter folder."
    )


class TrainRecipe(BaseModel):
    """A training recipe (YAML). Paths are relative to the current directory."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Model folder (a `moh convert` output, or a dense model) or Hub id.")
    output_dir: str = Field(description="Run folder: checkpoints/, metrics.jsonl, and the final model/ folder.")
    data: DataSource = Field(description="Training text.")
    eval_data: DataSource | None = Field(
        None, description="Held-out text; default: the first `eval_windows` sequences of `data`, not trained on."
    )
    seq_len: int = Field(2048, gt=1, description="Tokens per packed training sequence.")
    max_tokens: int | None = Field(None, gt=0, description="Token budget (or give max_steps).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps (or give max_tokens).")
    global_batch_tokens: int = Field(65536, gt=0, description="Tokens per optimizer step, over all processes.")
    micro_batch_size: int = Field(1, gt=0, description="Sequences per forward pass per process.")
    learning_rate: float = Field(2e-5, gt=0, description="Peak AdamW learning rate.")
    final_learning_rate: float = Field(1e-6, ge=0, description="Learning rate at the end of the cosine decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = Field(1.0, description="Gradient clipping norm (null: no clipping).")
    mixed_precision: Literal["no", "bf16", "fp16"] | None = Field(
        None, description="Overrides the accelerate config's mixed precision (weights stay float32)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    attn_implementation: str | None = Field(None, description="eager, sdpa, flash_attention_2, ... (default: auto).")
    trainable: Literal["all", "routers", "lora"] = Field("all", description="What the optimizer updates.")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    aux_loss: Literal["auto", "moh", "moa", "none"] = Field(
        "auto",
        description="moh: the paper's load-balance loss sum_i P_i f_i; moa: switch loss + router z-loss; auto: moa "
        "for the MoA preset (softmax gates, no shared heads), else moh.",
    )
    load_balance_coef: float | None = Field(None, ge=0, description="Load-balance loss weight (default 0.01).")
    router_z_loss_coef: float | None = Field(None, ge=0, description="Router z-loss weight (default 0.001 for moa).")
    eval_every: int = Field(0, ge=0, description="Held-out perplexity every N steps (0: only before and after).")
    eval_windows: int = Field(8, ge=0, description="Held-out sequences of seq_len tokens (0: no evaluation).")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: none).")
    keep_checkpoints: int = Field(2, gt=0, description="Checkpoints kept on disk (the newest).")
    log_every: int = Field(1, gt=0, description="Write metrics every N steps.")
    seed: int = 0
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the saved weights; auto: the model's own dtype from its config."
    )


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


def format_validation_error(error: ValidationError, model_cls: type[BaseModel]) -> str:
    """pydantic's report as one line that names each recipe key; unknown keys list the valid ones."""
    problems = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        name = ".".join(loc) or "recipe"
        if item["type"] == "extra_forbidden":
            owner = model_cls
            for part in loc[:-1]:  # walk into nested sections (data.*, lora.*) to list their keys
                annotation = owner.model_fields[part].annotation
                owner = next((arg for arg in getattr(annotation, "__args__", (annotation,)) if isinstance(arg, type)
                              and issubclass(arg, BaseModel)), annotation)
            problems.append(f"unknown recipe key {name!r} (valid keys: {', '.join(owner.model_fields)})")
        elif item["type"] == "missing":
            problems.append(f"recipe key {name!r} is required")
        else:
            problems.append(f"recipe key {name!r}: {item['msg']}")
    return "; ".join(problems)


def parse_override(text: str) -> tuple[list[str], object]:
    """'lora.r=8' -> (['lora', 'r'], 8): values are YAML, so numbers, booleans, lists and null work."""
    if "=" not in text:
        raise MoHError(f"--set {text!r}: use KEY=VALUE, e.g. --set max_steps=100 or --set data.path=train.txt")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def load_recipe(recipe: str | Path | dict, overrides: list[str] = ()) -> TrainRecipe:
    """Read a YAML recipe (or a dict), apply `--set key=value` overrides, validate the keys and their types."""
    if isinstance(recipe, dict):
        values = json.loads(json.dumps(recipe))
    else:
        path = Path(recipe).expanduser()
        if not path.is_file():
            raise MoHError(f"recipe {path} not found")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise MoHError(f"recipe {path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise MoHError(f"recipe {path} must be a mapping of keys to values")
    for override in overrides:
        keys, value = parse_override(override)
        target = values
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise MoHError(f"--set {override!r}: {key!r} is not a section of the recipe")
        target[keys[-1]] = value
    try:
        return TrainRecipe(**values)
    except ValidationError as error:
        raise MoHError(format_validation_error(error, TrainRecipe)) from None


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
    for path in source.paths():
        if not path.is_file():
            raise MoHError(f"recipe key '{key}.path': file {path} not found")
        if path.suffix not in (".txt", ".jsonl"):
            raise MoHError(f"recipe key '{key}.path': {path} must be a .txt or .jsonl file")


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
    text_config = text_config_of(config)
    is_moh = config.get("model_type") == "moh"

    check_data_source(recipe.data, "data")
    if recipe.eval_data is not None:
        check_data_source(recipe.eval_data, "eval_data")

    max_positions = text_config.get("max_position_embeddings")
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

    router = config.get("router") if is_moh else None
    if recipe.trainable == "routers":
        if not is_moh:
            raise MoHError(f"recipe key 'trainable': {model_folder} is not a MoH model, so it has no routers")
        if router != "learned" and not config.get("head_fallback"):
            raise MoHError(
                "recipe key 'trainable': 'routers' needs router parameters, but this model's router is "
                f"{router!r} (parameter-free); use 'all' or 'lora', or convert/calibrate with a learned router"
            )
    lora_targets = None
    if recipe.trainable == "lora":
        if distributed_type == "FSDP":
            raise MoHError("recipe key 'trainable': lora is not supported with FSDP here; use DDP or DeepSpeed, "
                           "or trainable: all with FSDP")
        lora_targets = recipe.lora.target_modules or default_lora_targets(text_config, recipe.lora.save, router)
        if recipe.lora.save == "adapter" and is_moh:
            # An unmerged adapter runs in peft's own wrapper around the module; MoH's hooks sit on the wrapped base
            # layer, so the LoRA branch would see o_proj's input ungated (and a query-norm router the queries
            # without the LoRA update). Merged saves are fine: training moves the hooks onto the wrappers.
            hooked = {"o_proj"} | ({"q_proj", "qkv_proj"} if router == "query-norm" else set())
            clash = sorted(hooked & set(lora_targets))
            if clash:
                raise MoHError(
                    f"recipe key 'lora.target_modules': {', '.join(clash)} cannot be saved as an adapter on a MoH "
                    "model (MoH gates/reads these modules, an unmerged adapter would bypass that); drop them or "
                    "use lora.save: merged"
                )

    gate_mode = config.get("gate_mode")
    shared = config.get("shared_heads") or []
    aux_loss = recipe.aux_loss
    if aux_loss == "auto":
        is_moa = is_moh and gate_mode == "softmax" and not any(shared)
        aux_loss = "moa" if is_moa else ("moh" if is_moh else "none")
    if aux_loss != "none" and not is_moh:
        raise MoHError(f"recipe key 'aux_loss': {aux_loss!r} needs a MoH model; {model_folder} is dense")
    default_lb = MOA_LOAD_BALANCE_COEF if aux_loss == "moa" else MOH_LOAD_BALANCE_COEF
    default_z = MOA_Z_LOSS_COEF if aux_loss == "moa" else 0.0

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
        sequences_per_step=sequences_per_step,
        sequences_per_process=sequences_per_step // num_processes,
        gradient_accumulation_steps=sequences_per_step // per_forward,
        max_steps=max_steps,
        model_folder=model_folder,
        source_config=config,
        is_moh=is_moh,
        aux_loss=aux_loss,
        load_balance_coef=0.0 if aux_loss == "none" else (
            recipe.load_balance_coef if recipe.load_balance_coef is not None else default_lb),
        router_z_loss_coef=0.0 if aux_loss == "none" else (
            recipe.router_z_loss_coef if recipe.router_z_loss_coef is not None else default_z),
        lora_targets=lora_targets,
    )


# ================================================================================================ data


def local_pieces(source: DataSource) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces of local files in a fixed order: a .txt file is one document, read in pieces of
    about TEXT_CHUNK_CHARS cut at line ends; each JSONL record is a document."""
    for path in source.paths():
        if path.suffix == ".jsonl":
            with open(path) as handle:
                for line_number, line in enumerate(handle, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)[source.column], True
                        except (ValueError, KeyError, TypeError):
                            raise MoHError(f"{path}:{line_number}: not a JSON object with key {source.column!r}") from None
            continue
        with open(path) as handle:
            piece: list[str] = []
            size = 0
            for line in handle:
                piece.append(line)
                size += len(line)
                if size >= TEXT_CHUNK_CHARS:
                    yield "".join(piece), False
                    piece, size = [], 0
            yield "".join(piece), True


def hub_pieces(rows, source: DataSource) -> Iterator[tuple[str, bool]]:
    for row in rows:
        if source.column not in row:
            raise MoHError(f"recipe key 'column': dataset {source.dataset} has no column {source.column!r} "
                           f"(columns: {', '.join(row)})")
        yield row[source.column], True


class PackedTokenStream:
    """Tokens of every document, EOS after each, concatenated and cut into seq_len sequences; the data repeats
    (epochs) in the same order when it runs out. Every process builds the same stream.

    Its position (`state_dict`) is small: the epoch, how many text pieces of it were read, the tokens left over from
    the last piece, and for streamed Hub datasets the dataset's own state. Resuming therefore neither re-tokenizes
    nor (for Hub datasets) re-downloads what was already trained on."""

    def __init__(self, source: DataSource, tokenizer, seq_len: int):
        self.source, self.tokenizer, self.seq_len = source, tokenizer, seq_len
        self.epoch, self.pieces_read, self.buffer = 0, 0, []
        self.produced_any = False
        self._dataset = None  # the Hub dataset being iterated
        self._dataset_state = None  # a saved position to restore when it is next opened
        self._pieces = None

    def state_dict(self) -> dict:
        import copy

        state = {"epoch": self.epoch, "pieces_read": self.pieces_read, "buffer": list(self.buffer)}
        if self._dataset is not None and hasattr(self._dataset, "state_dict"):
            state["dataset_state"] = copy.deepcopy(self._dataset.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pieces_read, self.buffer = state["epoch"], state["pieces_read"], list(state["buffer"])
        self._dataset_state = state.get("dataset_state")
        self._pieces, self.produced_any = None, True

    def _open(self) -> Iterator[tuple[str, bool]]:
        skip = self.pieces_read
        if self.source.dataset is None:
            pieces = local_pieces(self.source)
        else:
            import datasets

            self._dataset = datasets.load_dataset(self.source.dataset, self.source.dataset_config,
                                                  split=self.source.split, streaming=self.source.streaming)
            if self._dataset_state is not None and hasattr(self._dataset, "load_state_dict"):
                self._dataset.load_state_dict(self._dataset_state)
                skip = 0
            pieces = hub_pieces(self._dataset, self.source)
        self._dataset_state = None
        return itertools.islice(pieces, skip, None)  # skipping reads text but tokenizes nothing

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        while len(self.buffer) < self.seq_len:
            if self._pieces is None:
                self._pieces = self._open()
            piece = next(self._pieces, None)
            if piece is None:  # end of the data: next epoch, same order
                if not self.produced_any:
                    raise MoHError(f"the data has fewer than seq_len={self.seq_len} tokens; give more text or "
                                   "lower seq_len")
                self.epoch, self.pieces_read, self._pieces = self.epoch + 1, 0, None
                continue
            text, ends_document = piece
            self.pieces_read += 1
            self.buffer.extend(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if ends_document and self.tokenizer.eos_token_id is not None:
                self.buffer.append(self.tokenizer.eos_token_id)
        self.produced_any = True
        sequence = self.buffer[: self.seq_len]
        del self.buffer[: self.seq_len]
        return sequence


def take(stream: Iterator[list[int]], count: int) -> torch.Tensor:
    rows = [next(stream) for _ in range(count)]
    return torch.tensor(rows, dtype=torch.long)


# ================================================================================================ model


def load_model(recipe: TrainRecipe, plan: TrainingPlan):
    from transformers import AutoModelForCausalLM

    import moh_convert  # noqa: F401  (registers the MoH classes: the model loads natively, no remote code)

    kwargs = {"dtype": torch.float32}  # float32 master weights; mixed precision is accelerate's autocast
    if recipe.attn_implementation:
        kwargs["attn_implementation"] = recipe.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(plan.model_folder, **kwargs)
    model.config.use_cache = False
    return model


def routing_modules(model) -> list:
    """The MoH routing module of every layer (empty for a dense model)."""
    return [module for module in model.modules() if hasattr(module, "last_router_probs")]


def is_router_parameter(name: str) -> bool:
    return ".moh." in name or name.startswith("moh.")


def move_routing_hooks_to_lora_wrappers(model) -> int:
    """peft replaces `o_proj` (and `q_proj`) by a wrapper that calls the original layer plus a LoRA branch. MoH's
    hooks stay on the original layer, so the LoRA branch would see o_proj's input *ungated* and the query-norm
    router would read queries *without* the LoRA update: training and the merged model would disagree. Move every
    routing hook onto the wrapper so the whole module (base + LoRA) sees what MoH sees. Returns hooks moved."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    moved = 0
    for attention in [module for module in model.modules() if hasattr(module, "moh")]:
        routing = attention.moh
        handle_ids = {handle.id for handle in routing.hook_handles}
        # The masked path's o_proj gate (the sparse path gates inside its attention function and has none).
        gate_id = routing.output_gate_handle.id if routing.output_gate_handle is not None else None
        for name, wrapper in list(attention.named_children()):
            if not isinstance(wrapper, BaseTunerLayer):
                continue
            base = wrapper.get_base_layer()
            for hooks, register in ((base._forward_pre_hooks, wrapper.register_forward_pre_hook),
                                    (base._forward_hooks, wrapper.register_forward_hook)):
                for hook_id in [hook_id for hook_id in hooks if hook_id in handle_ids or hook_id == gate_id]:
                    handle = register(hooks.pop(hook_id))
                    if hook_id == gate_id:
                        routing.output_gate_handle = handle
                    else:
                        routing.hook_handles.append(handle)
                    moved += 1
    return moved


def make_trainable(model, recipe: TrainRecipe, plan: TrainingPlan):
    """Freeze what the recipe does not train; wrap with peft LoRA for `trainable: lora`."""
    if recipe.trainable == "all":
        model.requires_grad_(True)
        return model
    if recipe.trainable == "routers":
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(is_router_parameter(name))
        return model
    from peft import LoraConfig, get_peft_model

    lora = recipe.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules
                        or plan.lora_targets, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, config)
    except ValueError as error:
        raise MoHError(f"recipe key 'lora.target_modules': {str(error).splitlines()[0]}") from None
    move_routing_hooks_to_lora_wrappers(model)
    if lora.save == "merged":
        # Merged saves keep every tensor, so learned routers (if any) train along with the adapters.
        for name, parameter in model.named_parameters():
            if is_router_parameter(name):
                parameter.requires_grad_(True)
    return model


def build_optimizer(model, recipe: TrainRecipe) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 and "norm" not in name else no_decay).append(parameter)
    if not decay and not no_decay:
        raise MoHError(f"recipe key 'trainable': {recipe.trainable!r} leaves no parameter to train")
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # On CPU the fused kernel is several times faster than torch's per-tensor default; elsewhere torch chooses.
    on_cpu = all(parameter.device.type == "cpu" for group in groups for parameter in group["params"])
    return torch.optim.AdamW([group for group in groups if group["params"]], lr=recipe.learning_rate,
                             betas=(recipe.adam_beta1, recipe.adam_beta2), eps=recipe.adam_epsilon,
                             fused=True if on_cpu else None)


def learning_rate_at(step: int, recipe: TrainRecipe, max_steps: int) -> float:
    """LR of optimizer step `step` (0-based): linear warmup, then cosine from learning_rate to final_learning_rate,
    reached at the last step."""
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, max_steps - recipe.warmup_steps - 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return recipe.final_learning_rate + (recipe.learning_rate - recipe.final_learning_rate) * cosine


# ================================================================================================ routing losses


class RouterLogits:
    """Captures each layer's router logits for the z-loss (routers return probabilities; softmax hides the
    logits' scale, which is what the z-loss penalises)."""

    def __init__(self, routings: list):
        self.logits: dict[int, torch.Tensor] = {}
        self.handles = []
        for index, routing in enumerate(routings):
            router = routing.router
            if hasattr(router, "routed_proj"):  # learned router: its linear layer's output
                self.handles.append(router.routed_proj.register_forward_hook(self._keep(index)))
            else:  # query-norm: the normalised norms it feeds to softmax
                self.handles.append(router.register_forward_hook(self._query_norm_logits(index, router)))

    def _keep(self, index):
        def hook(module, args, output):
            self.logits[index] = output.float()
        return hook

    def _query_norm_logits(self, index, router):
        def hook(module, args, output):
            norms = args[1].float().norm(dim=-1)
            if router.num_routed > 1:
                norms = norms / norms.std(dim=-1, keepdim=True).clamp_min(1e-6)
            self.logits[index] = norms
        return hook


def routing_losses(routings: list, router_logits: RouterLogits | None, aux_loss: str) -> dict[str, torch.Tensor]:
    """From the routing of the last forward: load-balance loss, z-loss and head-load spread, averaged over layers.

    moh: L_b = sum_i P_i f_i over routed heads (paper eq. 7): P_i = mean router probability of head i, f_i = share
    of tokens that selected it. moa: the switch-style form, num_routed / top_k * sum_i P_i f_i (1 when balanced).
    z-loss: mean over tokens of logsumexp(router logits)^2. Spread: max_i f_i - min_i f_i (0 = balanced).
    """
    balance, z_loss, spread = [], [], []
    for index, routing in enumerate(routings):
        probs, mask = routing.last_router_probs, routing.last_routed_mask
        if probs is None or routing.is_dense:
            continue
        router_prob = probs.float().mean(dim=(0, 1))
        token_share = mask.float().mean(dim=(0, 1))
        layer_balance = (router_prob * token_share).sum()
        if aux_loss == "moa":
            layer_balance = layer_balance * probs.shape[-1] / max(1, routing.routed_top_k)
        balance.append(layer_balance)
        spread.append((token_share.max() - token_share.min()).detach())
        if router_logits is not None and index in router_logits.logits:
            z_loss.append(router_logits.logits[index].logsumexp(dim=-1).square().mean())
    zero = torch.zeros(())
    mean = lambda values: torch.stack(values).mean() if values else zero  # noqa: E731
    return {"load_balance_loss": mean(balance), "z_loss": mean(z_loss), "load_spread": mean(spread)}


# ================================================================================================ checkpoints


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint (one whose trainer_state.json was written), or None."""
    if not checkpoints.is_dir():
        return None
    complete = [path for path in checkpoints.glob("step-*") if (path / TRAINER_STATE).is_file()]
    return max(complete, key=lambda path: int(path.name.split("-")[1]), default=None)


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
        complete = sorted((path for path in checkpoints.glob("step-*") if (path / TRAINER_STATE).is_file()),
                          key=lambda path: int(path.name.split("-")[1]))
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ================================================================================================ evaluation


@torch.no_grad()
def heldout_perplexity(model, windows: torch.Tensor, micro_batch_size: int, accelerator) -> float:
    """Perplexity over `windows`, split across processes (each its own rows; sums are reduced)."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for batch in windows[rank::world].split(micro_batch_size):
        batch = batch.to(accelerator.device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        total[0] += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").double()
        total[1] += batch[:, 1:].numel()
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return math.exp((total[0] / total[1]).item())


# ================================================================================================ final save


def save_final_model(accelerator, model, recipe: TrainRecipe, plan: TrainingPlan, summary: dict, tokenizer) -> Path:
    """The trained model as a folder laid out like `moh convert` output, assembled in a hidden temp folder inside
    output_dir and renamed to output_dir/model when complete."""
    from .convert import AUTO_MAP, DTYPES, MODELING_DIR, MODELING_FILES, copy_support_files, move_into_place

    state_dict = accelerator.get_state_dict(model)  # every process takes part (FSDP/DeepSpeed gather here)
    output = Path(recipe.output_dir).expanduser().resolve() / FINAL_MODEL_DIR
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return output
    unwrapped = accelerator.unwrap_model(model)
    work_dir = Path(tempfile.mkdtemp(prefix=f".{FINAL_MODEL_DIR}.partial-", dir=output.parent))
    try:
        staging = work_dir / FINAL_MODEL_DIR
        source = Path(plan.model_folder)
        if recipe.trainable == "lora" and recipe.lora.save == "adapter":
            unwrapped.save_pretrained(staging, state_dict=state_dict)
            tokenizer.save_pretrained(staging)
        else:
            if recipe.trainable == "lora":
                unwrapped.load_state_dict(state_dict)
                unwrapped = unwrapped.merge_and_unload()
                state_dict = unwrapped.state_dict()
            dtype = recipe.save_dtype if recipe.save_dtype != "auto" else str(
                text_config_of(plan.source_config).get("dtype") or plan.source_config.get("dtype") or "float32")
            dtype = DTYPES.get(dtype.replace("torch.", ""), torch.float32)
            state_dict = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor
                          for name, tensor in state_dict.items()}
            unwrapped.config.use_cache = True
            unwrapped.save_pretrained(staging, state_dict=state_dict)
            copy_support_files(source, staging)  # tokenizer, chat template, generation config, calibration report
            if plan.is_moh:
                config = json.loads((staging / "config.json").read_text())
                config["auto_map"] = dict(AUTO_MAP)
                config["dtype"] = str(dtype).replace("torch.", "")
                (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
                for file_name in MODELING_FILES:
                    shutil.copyfile(MODELING_DIR / file_name, staging / file_name)
        from .model_card import CARD_NAME, TRAINING_SUMMARY, update_model_card

        (staging / TRAINING_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        if (source / CARD_NAME).is_file():
            card = (source / CARD_NAME).read_text().replace(  # the convert-time card's claim no longer holds
                "The source model's tensors are unchanged.", "The model was then continue-tuned (see Training).")
            (staging / CARD_NAME).write_text(card)
            if plan.is_moh and (staging / "config.json").is_file():
                update_model_card(staging)  # adds/refreshes the Training section from training_summary.json
        move_into_place(staging, output)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return output


# ================================================================================================ the loop


def train(recipe: str | Path | dict | TrainRecipe, overrides: list[str] = (), resume: bool = False) -> Path:
    """Run a recipe (path, dict or TrainRecipe) in this process, under `accelerate launch` when distributed.
    Returns the final model folder (output_dir/model)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    if not isinstance(recipe, TrainRecipe):
        recipe = load_recipe(recipe, list(overrides))
    state = PartialState(cpu=cpu_multiprocess_launch())
    plan = plan_training(recipe, state.num_processes, str(state.distributed_type).split(".")[-1], resume)

    output_dir = Path(recipe.output_dir).expanduser().resolve()
    log_with = ["tensorboard"] if _tensorboard_available() else None
    accelerator = Accelerator(
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        mixed_precision=recipe.mixed_precision,
        log_with=log_with,
        project_dir=str(output_dir),
        cpu=state.device.type == "cpu" and state.num_processes > 1,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = output_dir / CHECKPOINTS_DIR
    set_seed(recipe.seed)

    # ---- tokenizer, model, trainable parameters, optimizer
    tokenizer = AutoTokenizer.from_pretrained(plan.model_folder)
    model = load_model(recipe, plan)
    routings = routing_modules(model)
    if recipe.gradient_checkpointing:
        # Non-reentrant checkpointing keeps the graph from the router probabilities (recorded inside the
        # checkpointed layers) to the routing losses computed outside them.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.25 (the old name warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = make_trainable(model, recipe, plan)
    router_logits = RouterLogits(routings) if plan.router_z_loss_coef > 0 else None
    optimizer = build_optimizer(model, recipe)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    # ---- data: the same packed stream in every process; each takes its slice of every global batch
    stream = PackedTokenStream(recipe.data, tokenizer, recipe.seq_len)
    if recipe.eval_windows and recipe.eval_data is not None:
        eval_windows = take(PackedTokenStream(recipe.eval_data, tokenizer, recipe.seq_len), recipe.eval_windows)
    elif recipe.eval_windows:
        eval_windows = take(stream, recipe.eval_windows)  # held out: training starts after them
    else:
        eval_windows = None

    # ---- resume: model/optimizer/RNG from accelerate, step and data position from trainer_state.json
    start_step, sequences_consumed, first_ppl = 0, 0, None
    checkpoint = latest_checkpoint(checkpoints) if resume else None
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        trainer_state = json.loads((checkpoint / TRAINER_STATE).read_text())
        start_step, sequences_consumed = trainer_state["step"], trainer_state["sequences_consumed"]
        stream.load_state_dict(trainer_state["data_state"])
        first_ppl = trainer_state.get("heldout_perplexity_before")
        accelerator.print(f"Resuming from {checkpoint} (step {start_step}, {sequences_consumed} sequences done)")
    elif resume:
        accelerator.print(f"No checkpoint in {checkpoints}; starting from step 0")
    metrics_path = output_dir / METRICS_FILE
    if accelerator.is_main_process:
        kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= start_step] \
            if checkpoint is not None and metrics_path.is_file() else []
        metrics_path.write_text("".join(line + "\n" for line in kept))  # drop steps the resumed run will redo
    accelerator.init_trackers("moh_train", config={k: v for k, v in recipe.model_dump().items()
                                                   if isinstance(v, (int, float, str, bool))})

    if eval_windows is not None and start_step == 0:
        first_ppl = heldout_perplexity(model, eval_windows, recipe.micro_batch_size, accelerator)
        accelerator.print(f"held-out perplexity before training: {first_ppl:.3f}")
    tokens_per_step = plan.sequences_per_step * recipe.seq_len
    progress = tqdm(total=plan.max_steps, initial=start_step, desc="Training", unit="step",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    last_ppl, train_started, last_loss = first_ppl, time.perf_counter(), None
    rank = accelerator.process_index

    for step in range(start_step, plan.max_steps):
        step_started = time.perf_counter()
        global_batch = take(stream, plan.sequences_per_step)
        sequences_consumed += plan.sequences_per_step
        my_rows = global_batch[rank * plan.sequences_per_process:(rank + 1) * plan.sequences_per_process]
        lr = learning_rate_at(step, recipe, plan.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        sums = torch.zeros(4, dtype=torch.float64)  # lm loss, load-balance loss, z-loss, load spread
        for micro_batch in my_rows.split(recipe.micro_batch_size):
            with accelerator.accumulate(model):  # syncs gradients (and steps) only on the last micro-batch
                micro_batch = micro_batch.to(accelerator.device)
                outputs = model(input_ids=micro_batch, labels=micro_batch)
                aux = routing_losses(routings, router_logits, plan.aux_loss)
                loss = (outputs.loss + plan.load_balance_coef * aux["load_balance_loss"]
                        + plan.router_z_loss_coef * aux["z_loss"])
                accelerator.backward(loss)  # divided by gradient_accumulation_steps inside
                if accelerator.sync_gradients and recipe.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            sums += torch.tensor([outputs.loss.item(), aux["load_balance_loss"].item(), aux["z_loss"].item(),
                                  aux["load_spread"].item()], dtype=torch.float64)
        # Every micro-batch has the same token count, so the mean of their means is the global batch's mean.
        means = accelerator.reduce(sums.to(accelerator.device) / plan.gradient_accumulation_steps, "mean").cpu()
        last_loss = means[0].item()
        done = step + 1
        step_seconds = time.perf_counter() - step_started
        metrics = {"step": done, "tokens": done * tokens_per_step, "sequences_consumed": sequences_consumed,
                   "lr": lr, "loss": last_loss, "load_balance_loss": means[1].item(), "z_loss": means[2].item(),
                   "load_spread": means[3].item(), "tokens_per_s": tokens_per_step / step_seconds}
        if recipe.eval_every and eval_windows is not None and (done % recipe.eval_every == 0 or done == plan.max_steps):
            last_ppl = metrics["heldout_perplexity"] = heldout_perplexity(
                model, eval_windows, recipe.micro_batch_size, accelerator)
        if done % recipe.log_every == 0 or done == plan.max_steps or "heldout_perplexity" in metrics:
            if accelerator.is_main_process:
                with open(metrics_path, "a") as handle:
                    handle.write(json.dumps(metrics) + "\n")
            accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=done)
        progress.set_postfix(loss=f"{last_loss:.3f}", lb=f"{metrics['load_balance_loss']:.3f}",
                             spread=f"{metrics['load_spread']:.2f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        progress.update(1)
        if recipe.save_every and done % recipe.save_every == 0 and done < plan.max_steps:
            trainer_state = {"step": done, "sequences_consumed": sequences_consumed, "lr": lr, "loss": last_loss,
                             "heldout_perplexity_before": first_ppl, "data_state": stream.state_dict()}
            save_checkpoint(accelerator, checkpoints, trainer_state, recipe.keep_checkpoints)
    progress.close()

    if eval_windows is not None and (not recipe.eval_every or last_ppl is None):
        last_ppl = heldout_perplexity(model, eval_windows, recipe.micro_batch_size, accelerator)
    seconds = time.perf_counter() - train_started
    summary = {
        "base_model": recipe.model,
        "data": recipe.data.dataset or recipe.data.path,
        "steps": plan.max_steps,
        "tokens": plan.max_steps * tokens_per_step,
        "seq_len": recipe.seq_len,
        "global_batch_tokens": tokens_per_step,
        "learning_rate": f"{recipe.learning_rate:g} -> {recipe.final_learning_rate:g} (warmup {recipe.warmup_steps}, cosine)",
        "trainable": recipe.trainable + (f" (r={recipe.lora.r}, {', '.join(plan.lora_targets)}, {recipe.lora.save})"
                                         if recipe.trainable == "lora" else ""),
        "aux_loss": plan.aux_loss,
        "load_balance_coef": plan.load_balance_coef,
        "router_z_loss_coef": plan.router_z_loss_coef,
        "processes": plan.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "final_train_loss": last_loss,
        "heldout_perplexity_before": first_ppl,
        "heldout_perplexity_after": last_ppl,
        "wall_seconds_this_run": round(seconds, 1),
    }
    output = save_final_model(accelerator, model, recipe, plan, summary, tokenizer)
    accelerator.end_training()
    accelerator.print(f"Trained model written to {output}")
    return output


def cpu_multiprocess_launch() -> bool:
    """True for a multi-process launch (torchrun-style LOCAL_RANK) on a machine without GPUs: accelerate then needs
    cpu=True to use torch.distributed's gloo backend. (accelerate's own MULTI_CPU launcher needs mpirun; the
    cpu_2proc config launches through torchrun instead, see recipes/accelerate/cpu_2proc.yaml.)"""
    import os

    return "LOCAL_RANK" in os.environ and not torch.cuda.is_available() and not (
        hasattr(torch, "xpu") and torch.xpu.is_available())


def _tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


# ================================================================================================ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", metavar="RECIPE.yaml", help="training recipe (see recipes/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key (YAML value; nested keys with dots: data.path=..., lora.r=8)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")


def run_from_args(args: argparse.Namespace) -> None:
    train(args.recipe, args.overrides, resume=args.resume)


def register_cli(commands) -> None:
    """`moh train RECIPE.yaml [--set key=value ...] [--resume]`."""
    parser = commands.add_parser(
        "train",
        help="continue-tune a MoH model with accelerate",
        description="Run a training recipe in this process. For several processes or GPUs use "
        "`accelerate launch --config_file recipes/accelerate/CONFIG.yaml -m moh_convert.train RECIPE.yaml`.",
        epilog="examples:\n  moh train recipes/smollm2-135m-moh.yaml --set max_steps=20\n"
        "  accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml -m moh_convert.train "
        "recipes/smollm2-135m-moh.yaml --resume",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(handler=run_from_args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moh_convert.train", description="Run a MoH training recipe.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_from_args(args)
    except MoHError as error:
        print(f"moh train: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
