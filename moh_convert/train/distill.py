"""Distillation from the dense model (the recipe's `distill:` section): which teacher, the teacher loaded next to
the student (same process and device, no gradients), and the losses.

The converted model has a perfect teacher at hand, the model it came from: matching its next-token distributions
(KL divergence with a temperature, Hinton et al.) gives every position a full distribution to learn instead of one
label, so a few million tokens recover what plain language-model training needs far more for. The teacher is
deterministic, so a resumed run sees the same targets; under DDP/FSDP/DeepSpeed every process holds a full copy of
the teacher (it is never wrapped or sharded: it only runs forward)."""
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from ..errors import MoHError
from ..sources import check_source
from .recipe import DistillSettings, TrainRecipe

TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KL_TOKENS_PER_CHUNK = 1024  # token rows of [tokens, vocabulary] float32 log-probabilities held at a time


def resolve_teacher(recipe: TrainRecipe, model_config: dict) -> str | None:
    """The teacher to load (checked before any model is loaded), or None without a `distill:` section. Default: the
    model the MoH folder was converted from, as its config records it."""
    if recipe.distill is None:
        return None
    teacher = recipe.distill.teacher or model_config.get("source_model")
    if not teacher:
        raise MoHError(
            "recipe key 'distill.teacher': the model's config does not record what it was converted from (a dense "
            "model, or converted before moh_convert recorded it); set distill.teacher to the dense model's folder, "
            "Hub id or .gguf file"
        )
    check_source(teacher, "recipe key 'distill.teacher'")
    return str(teacher)


@dataclass
class Teacher:
    model: torch.nn.Module
    source: str
    dtype: torch.dtype
    load_seconds: float
    parameter_megabytes: float

    def describe(self) -> str:
        return (f"teacher {self.source} ({str(self.dtype).removeprefix('torch.')}, "
                f"{self.parameter_megabytes:,.0f} MB, loaded in {self.load_seconds:.1f} s)")


def teacher_dtype(settings: DistillSettings, device: torch.device) -> torch.dtype:
    if settings.teacher_dtype != "auto":
        return TEACHER_DTYPES[settings.teacher_dtype]
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def load_teacher(source: str, settings: DistillSettings, device: torch.device, vocab_size: int,
                 scratch: Path) -> Teacher:
    """The teacher on `device`, in eval mode, without gradients. A .gguf teacher is dequantized into a temporary
    folder under `scratch` (removed once loaded)."""
    from transformers import AutoModelForCausalLM

    from ..sources import resolve_source

    started = time.perf_counter()
    dtype = teacher_dtype(settings, device)
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".teacher-{os.getpid()}-", dir=scratch) as work_dir:
        folder = resolve_source(source, Path(work_dir)).folder
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.to(device).eval().requires_grad_(False)
    teacher_vocab = model.config.get_text_config().vocab_size
    if teacher_vocab != vocab_size:
        raise MoHError(f"recipe key 'distill.teacher': {source} predicts {teacher_vocab} tokens but the model "
                       f"{vocab_size}; distil from the model it was converted from (same tokenizer)")
    megabytes = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return Teacher(model, source, dtype, time.perf_counter() - started, megabytes)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The plain next-token loss for the log, without a graph: what the model's own loss with labels=input_ids
    gives (every token of a packed sequence is a label), when distillation does not train on it."""
    with torch.no_grad():
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


@dataclass
class DistillLosses:
    kl: torch.Tensor  # mean per token of KL(teacher || student) at the temperature, times T^2
    hidden: torch.Tensor  # mean over layers of the relative squared error of the layer outputs (0 when not asked)


def distillation_losses(student_outputs, teacher_outputs, settings: DistillSettings) -> DistillLosses:
    """From the student's and the teacher's outputs on the same tokens (logits [b, q, vocab]; hidden_states when
    `hidden_states_weight` > 0)."""
    temperature = settings.temperature
    student = student_outputs.logits.flatten(0, -2)
    teacher = teacher_outputs.logits.flatten(0, -2)
    kl_sum = student.new_zeros((), dtype=torch.float32)
    # In chunks of token rows: [tokens, vocabulary] float32 log-probabilities of a long sequence and a large
    # vocabulary would otherwise be several GB (autograd keeps each chunk's student log-probabilities anyway).
    for start in range(0, student.shape[0], KL_TOKENS_PER_CHUNK):
        student_log_probs = F.log_softmax(student[start:start + KL_TOKENS_PER_CHUNK].float() / temperature, dim=-1)
        teacher_log_probs = F.log_softmax(teacher[start:start + KL_TOKENS_PER_CHUNK].float() / temperature, dim=-1)
        kl_sum = kl_sum + F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum")
    kl = kl_sum / student.shape[0] * temperature**2
    hidden = student.new_zeros((), dtype=torch.float32)
    if settings.hidden_states_weight > 0:
        # hidden_states[0] is the embedding output (identical in both models): the decoder layers' outputs only.
        pairs = list(zip(student_outputs.hidden_states[1:], teacher_outputs.hidden_states[1:]))
        hidden = torch.stack([
            (mine.float() - theirs.float()).pow(2).mean() / theirs.float().pow(2).mean().clamp_min(1e-12)
            for mine, theirs in pairs
        ]).mean()
    return DistillLosses(kl, hidden)
