"""The training recipe: its YAML schema (pydantic), `--set key=value` overrides, and validation errors as one line
that names each recipe key."""
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import MoHError


class DataSource(BaseModel):
    """Training or held-out text: local .txt/.jsonl file(s), a Hugging Face dataset (streamed), or text the teacher
    (or the model's own dense weights) writes."""

    model_config = ConfigDict(extra="forbid")

    path: str | list[str] | None = Field(None, description=".txt or .jsonl file(s), read in order.")
    dataset: str | None = Field(None, description="Hugging Face dataset name (instead of `path`).")
    generate: Literal["self", "chat", "default"] | None = Field(
        None, description="Instead of `path`/`dataset`: text written by the distillation teacher (without `distill:`, "
        "by the model's own dense weights): 'self' (free samples), 'chat' (replies in its chat template to the "
        "prompts shipped with moh_convert), 'default' (half each). Written once, before "
        "training, to output_dir/generated-text.jsonl (a resumed run reads it again)."
    )
    generate_tokens: int = Field(32768, gt=0, description="How many tokens `generate` writes (the data repeats "
                                 "in epochs when training needs more).")
    dataset_config: str | None = Field(None, description="Config name of the dataset.")
    split: str = Field("train", description="Split of the dataset.")
    column: str = Field("text", description="Text column of the dataset, or key of each JSONL record.")
    streaming: bool = Field(True, description="Stream the dataset instead of downloading it whole.")
    weight: float = Field(1.0, gt=0, description="When `data` lists several sources: this source's share of the "
                          "training sequences (weights are normalised; sources are interleaved sequence by sequence).")

    @model_validator(mode="after")
    def one_source(self):
        if sum(value is not None for value in (self.path, self.dataset, self.generate)) != 1:
            raise ValueError("give exactly one of `path` (local .txt/.jsonl files), `dataset` (Hub dataset name) or "
                             "`generate` (self, chat or default: text the teacher writes)")
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


class DistillSettings(BaseModel):
    """Knowledge distillation from the dense model: the student (the MoH model) learns the teacher's next-token
    distributions on the training text."""

    model_config = ConfigDict(extra="forbid")

    teacher: str | None = Field(
        None, description="Teacher model: folder, Hub id or .gguf file. Default: the model the MoH folder was "
        "converted from (its config's `source_model`)."
    )
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of both distributions in the KL term.")
    kl_weight: float = Field(1.0, ge=0, description="Weight of KL(teacher || student) per token (times T^2).")
    lm_loss_weight: float = Field(0.0, ge=0, description="Weight of the plain next-token loss on the training text.")
    hidden_states_weight: float = Field(
        0.0, ge=0, description="Weight of matching every decoder layer's output hidden states to the teacher's "
        "(mean squared error relative to the teacher's mean squared norm, averaged over layers)."
    )
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the teacher runs in: auto = float32 on CPU, bfloat16 on GPUs."
    )


class TrainRecipe(BaseModel):
    """A training recipe (YAML). Paths are relative to the current directory."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Model folder (a `moh convert` output, or a dense model) or Hub id.")
    output_dir: str = Field(description="Run folder: checkpoints/, metrics.jsonl, and the final model/ folder.")
    data: list[DataSource] = Field(
        description="Training text: one source (a mapping) or a list of sources mixed by their `weight`, e.g. "
        "your own files with text the teacher writes: [{path: my.jsonl, weight: 3}, {generate: default}]."
    )
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
    trainable: Literal["all", "attention", "routers", "lora"] = Field(
        "all", description="What the optimizer updates: all weights; attention (every MoH attention block: query, "
        "key, value and output projections and the router; the MLPs, norms and embeddings stay as they are); "
        "routers (learned routers / head fallbacks only); lora (peft adapters)."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    aux_loss: Literal["auto", "moh", "moa", "none"] = Field(
        "auto",
        description="moh: the paper's load-balance loss sum_i P_i f_i; moa: switch loss + router z-loss; auto: moa "
        "for the MoA preset (softmax gates, no shared heads), else moh.",
    )
    load_balance_coef: float | None = Field(None, ge=0, description="Load-balance loss weight (default 0.01).")
    router_z_loss_coef: float | None = Field(None, ge=0, description="Router z-loss weight (default 0.001 for moa).")
    distill: DistillSettings | None = Field(
        None, description="Distil from the dense model (teacher) instead of (or besides) the plain next-token loss; "
        "`distill: {}` takes every default."
    )
    eval_every: int = Field(0, ge=0, description="Held-out perplexity every N steps (0: only before and after).")
    eval_windows: int = Field(8, ge=0, description="Held-out sequences of seq_len tokens (0: no evaluation).")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: none).")
    keep_checkpoints: int = Field(2, gt=0, description="Checkpoints kept on disk (the newest).")
    log_every: int = Field(1, gt=0, description="Write metrics every N steps.")
    seed: int = 0
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the saved weights; auto: the model's own dtype from its config."
    )

    @field_validator("data", mode="before")
    @classmethod
    def _one_source_is_a_list_of_one(cls, value):
        if isinstance(value, dict):
            return [value]
        if isinstance(value, list) and not value:
            raise ValueError("give at least one source")
        return value

    def data_keys(self) -> list[str]:
        """The recipe key of each training source, for messages: 'data' for a single one, else 'data.0', 'data.1'."""
        return ["data"] if len(self.data) == 1 else [f"data.{index}" for index in range(len(self.data))]


def recipe_key_path(loc: tuple, values: dict | None) -> list[str]:
    """pydantic's error location as the user's recipe keys: list positions stay ('data.1.path') except where the
    user wrote a single mapping that the recipe holds as a list of one ('data.path', not 'data.0.path')."""
    parts, raw = [], values
    for part in loc:
        if isinstance(part, int) and not isinstance(raw, list):
            continue
        parts.append(str(part))
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            raw = None
    return parts


def format_validation_error(error: ValidationError, model_cls: type[BaseModel], values: dict | None = None) -> str:
    """pydantic's report as one line that names each recipe key; unknown keys list the valid ones."""
    problems = []
    for item in error.errors():
        loc = recipe_key_path(item["loc"], values)
        name = ".".join(loc) or "recipe"
        if item["type"] == "extra_forbidden":
            owner = model_cls
            for part in loc[:-1]:  # walk into nested sections (data.*, lora.*) to list their keys
                if part.isdigit():  # a position in a list of sections
                    continue
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
            if isinstance(target, list) and key.isdigit() and int(key) < len(target):  # data.1.weight=2
                target = target[int(key)]
            elif isinstance(target, dict):
                target = target.setdefault(key, {})
            else:
                target = None
            if not isinstance(target, dict | list):
                raise MoHError(f"--set {override!r}: {key!r} is not a section of the recipe")
        if isinstance(target, list):
            raise MoHError(f"--set {override!r}: name a key inside one source, e.g. data.0.path=...")
        target[keys[-1]] = value
    try:
        return TrainRecipe(**values)
    except ValidationError as error:
        raise MoHError(format_validation_error(error, TrainRecipe, values)) from None
