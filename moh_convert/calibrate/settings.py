"""Options of calibration (`moh calibrate`, and `moh convert` with calibration data) and the constants shared by
the calibration modules. The CLI flags are generated from the pydantic fields: their names, defaults and
descriptions are the user-facing interface."""
import math
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import MoHError
from ..model_card import CALIBRATION_REPORT
from .fits import OUTPUT_RIDGE

REPORT_NAME = CALIBRATION_REPORT  # written next to the calibrated model; the model card reads it under this name
# A model's own samples at temperature 1 are easier text than real text; sampling a little hotter gives calibration
# more varied activations (SmolLM2 6/9 'self': see the calibration table in BENCHMARKS.md).
SELF_SAMPLING_TEMPERATURE = 1.1
SELF_SAMPLING_TOP_P = 0.95
COLUMN_OPTION = "--calibration-column"  # the option named in messages about a missing text column / JSONL key
# 'chat': replies the model writes itself, in its own chat template, to the prompts shipped in prompts.jsonl.
CHAT_SAMPLING_TEMPERATURE = 0.8
CHAT_SAMPLING_TOP_P = 0.95
CHAT_MAX_NEW_TOKENS = 400
# What 'default' stands for: every other use of the default mix follows from this one constant. The four kinds of
# text people run a chat model on, in equal shares: the model's own replies in its chat template, and real prose,
# math and code (builtin_text.py). The model's own text alone (the earlier default, 'chat:0.5 self:0.5') left prose,
# math and code 1.18-1.27x dense at 6 of 9 heads on SmolLM2 (BENCHMARKS.md, "Quality by kind of text").
DEFAULT_CALIBRATION_DATA = ["chat:0.25", "prose:0.25", "math:0.25", "code:0.25"]
GENERATED_SOURCES = ("self", "chat")  # sources the model writes itself (no file or dataset behind them)
BUILTIN_SOURCES = ("prose", "math", "code")  # real text that comes with the package or the environment
NAMED_SOURCES = (*GENERATED_SOURCES, *BUILTIN_SOURCES, "default")  # names that are never files or Hub datasets
# --objective: how much attention cost weighs against lost attention output when a layer's split is chosen
# (moh_convert.calibrate.fits.choose_head_split scores log(lost output) + weight x cost). quality: the least lost
# output, whatever it costs; balanced: a static layer (6 of 9 heads shared, cost 0.67) instead of a routed one (~0.9)
# when it loses at most ~11% more output (exp(0.5 x 0.23)); speed: up to ~1.8x more (exp(2.5 x 0.23)).
SPEED_WEIGHTS = {"quality": 0.0, "balanced": 0.5, "speed": 2.5}


class CalibrationSettings(BaseModel):
    """Where calibration text comes from and how much of it; shared by `moh convert` and `moh calibrate`."""

    model_config = ConfigDict(extra="forbid")

    calibration_data: list[str] | str | None = Field(
        None,
        description="Text to calibrate on: a .txt or .jsonl file, a Hugging Face dataset name, 'self' (text the "
        "model samples itself), 'chat' (replies the model writes in its chat template to varied shipped prompts), "
        "'prose' / 'math' (WikiText-2 articles / GSM8K worked solutions shipped with the package), 'code' (Python "
        f"sources of installed packages) or 'default' ({' '.join(DEFAULT_CALIBRATION_DATA)}); several sources mix "
        "with weights: "
        "SOURCE[:WEIGHT] ... (e.g. wiki.txt:0.5 self:0.5; weights are normalised).",
        # several values after one CLI flag (moh_convert.options)
        json_schema_extra={"nargs": "+", "metavar": "SOURCE[:WEIGHT]"},
    )
    calibration_tokens: int = Field(16384, gt=0, description="Tokens to calibrate on.")
    calibration_seq_len: int = Field(512, gt=1, description="Tokens per calibration window.")
    calibration_batch_size: int = Field(4, gt=0, description="Windows per forward pass (lower it to save memory).")
    calibration_heldout_tokens: int = Field(
        2048, ge=0, description="Further tokens of the same source, held out for the before/after perplexity."
    )
    calibration_dataset_config: str | None = Field(None, description="Config name of a Hub dataset.")
    calibration_split: str = Field("train", description="Split of a Hub dataset.")
    calibration_column: str = Field("text", description="Text column of a Hub dataset or key of a JSONL file.")
    seed: int = Field(0, description="Seed for sampling 'self' text (calibration is otherwise deterministic).")
    head_fallback: Literal["zero", "mean"] = Field(
        "zero", description="What a skipped head outputs: zero (the paper's binary gates) or its mean output on the "
        "calibration text (importance is then measured as the deviation from that mean)."
    )
    refit_output_projection: bool = Field(
        True, description="Refit each layer's output projection (o_proj) by least squares so that the heads a token "
        "keeps make up for the ones it skips (halved the perplexity gap at 6 of 9 heads on SmolLM2). Not done when "
        "'self' is the only source, where it measured worse on real text."
    )
    output_ridge: float = Field(
        OUTPUT_RIDGE, ge=0, description="How strongly the refitted output projection stays near the original (ridge "
        "strength relative to the mean squared head output): larger keeps more of the source model and fits the "
        "calibration text less closely."
    )
    refit_router: bool = Field(
        True, description="After the output projection is refitted, refit each router to what its heads move through "
        "the refitted projection, then refit the projection once more for the new routing (SmolLM2 at 6/9, default "
        "data: better on every kind of held-out text, chat 1.20x -> 1.08x, code 1.30x -> 1.18x dense). Needs "
        "--refit-output-projection; --no-refit-router keeps the single fit."
    )
    objective: Literal["quality", "balanced", "speed"] = Field(
        "balanced", description="What each layer's split of shared and routed heads optimises: 'quality' (the least "
        "attention output lost, whatever the routed heads cost), 'speed' (layers keep a fixed set of heads and skip "
        "routing where that loses little: fastest), or 'balanced' (default: a layer keeps a fixed set of heads, or "
        "shares more of them, only where its routing would lose at most ~11% less attention output). "
        "Ignored when --shared-heads fixes the split."
    )
    head_allocation: Literal["uniform", "per-layer"] = Field(
        "uniform", description="How many heads each layer keeps active: 'uniform' (the converted model's numbers) or "
        "'per-layer' (layers whose skipped heads would change the residual stream more keep more, others fewer; "
        "the model's average stays --active-heads). Measured in one dense pass over the first calibration tokens."
    )
    calibration_device: str = Field(
        "auto", description="Where layers are computed during calibration: 'auto' = CUDA when available, else CPU; "
        "or 'cpu', 'cuda', 'cuda:1', ... ('self'/'chat' text is generated there too when it is CUDA)."
    )
    calibration_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype the decoder layers run in during calibration (the fits always accumulate in "
        "float32); bfloat16 halves activation memory and is the fast choice on GPUs."
    )

    @field_validator("calibration_data")
    @classmethod
    def _one_entry_is_a_string(cls, value):
        """A list of one entry is that entry (as a single string has always been); an empty list is no source."""
        if isinstance(value, list):
            if not value:
                raise ValueError("give at least one source")
            if len(value) == 1:
                return value[0]
        return value


class CalibrateOptions(CalibrationSettings):
    """Options of `moh calibrate` / `moh_convert.calibrate()`."""

    shared_heads: int | Literal["auto"] = Field(
        "auto",
        description="How many shared heads per layer (which ones is always measured): 'auto' chooses per layer "
        "from held-back calibration tokens; a number fixes it.",
    )
    output: str | None = Field(None, description="Write the calibrated model here instead of updating MODEL.")
    overwrite: bool = Field(False, description="Replace --output if it exists.")


# ---------------------------------------------------------------- entries SOURCE[:WEIGHT]

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


@dataclass(frozen=True)
class SourceEntry:
    """One calibration source and its share of the windows (weights of all entries sum to 1)."""

    source: str
    weight: float


def split_entry(entry: str) -> tuple[str, float | None]:
    """'wiki.txt:0.5' -> ('wiki.txt', 0.5). The weight is parsed only when the text after the LAST colon is a
    number, so 'C:\\data\\x.txt' and 'a:b.txt' stay file names (with no weight: None)."""
    source, colon, weight = entry.rpartition(":")
    if not colon or not _NUMBER.fullmatch(weight.strip()):
        return entry, None
    if not source:
        raise MoHError(f"calibration data entry {entry!r} has a weight but no source; write SOURCE:WEIGHT")
    value = float(weight)
    if not (value > 0 and math.isfinite(value)):
        raise MoHError(f"calibration data entry {entry!r}: the weight must be a positive number, not {weight}")
    return source, value


def parse_calibration_data(calibration_data: str | list[str]) -> list[SourceEntry]:
    """The entries SOURCE[:WEIGHT] (default weight 1) as sources with normalised weights. 'default' expands to
    DEFAULT_CALIBRATION_DATA (its weight scaling the mix's); a source named twice gets the sum of its weights."""
    entries = [calibration_data] if isinstance(calibration_data, str) else list(calibration_data)
    weights: dict[str, float] = {}
    for entry in entries:
        source, weight = split_entry(entry)
        weight = 1.0 if weight is None else weight
        if source == "default":
            parts = [split_entry(part) for part in DEFAULT_CALIBRATION_DATA]
            total = sum(1.0 if part_weight is None else part_weight for _, part_weight in parts)
            expanded = [(name, weight * (1.0 if part_weight is None else part_weight) / total) for name, part_weight in parts]
        else:
            expanded = [(source, weight)]
        for name, value in expanded:
            weights[name] = weights.get(name, 0.0) + value
    total = sum(weights.values())
    return [SourceEntry(source, weight / total) for source, weight in weights.items()]
