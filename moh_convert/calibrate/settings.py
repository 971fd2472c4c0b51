"""Options of calibration (`moh calibrate`, and `moh convert` with calibration data) and the constants shared by
the calibration modules. The CLI flags are generated from the pydantic fields: their names, defaults and
descriptions are the user-facing interface."""
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..model_card import CALIBRATION_REPORT

REPORT_NAME = CALIBRATION_REPORT  # written next to the calibrated model; the model card reads it under this name
# A model's own samples at temperature 1 are easier text than real text; sampling a little hotter gives calibration
# more varied activations (SmolLM2 6/9 'self': see the calibration table in BENCHMARKS.md).
SELF_SAMPLING_TEMPERATURE = 1.1
SELF_SAMPLING_TOP_P = 0.95
COLUMN_OPTION = "--calibration-column"  # the option named in messages about a missing text column / JSONL key


class CalibrationSettings(BaseModel):
    """Where calibration text comes from and how much of it; shared by `moh convert` and `moh calibrate`."""

    model_config = ConfigDict(extra="forbid")

    calibration_data: str | None = Field(
        None,
        description="Text to calibrate on: a .txt or .jsonl file, a Hugging Face dataset name, or 'self' "
        "(sample text from the model itself: no data needed).",
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
        "keeps make up for the ones it skips (halved the perplexity gap at 6 of 9 heads on SmolLM2). Not done with "
        "'self' data, where it measured worse on real text."
    )


class CalibrateOptions(CalibrationSettings):
    """Options of `moh calibrate` / `moh_convert.calibrate()`."""

    shared_heads: int | Literal["auto"] = Field(
        "auto",
        description="How many shared heads per layer (which ones is always measured): 'auto' chooses per layer "
        "from held-back calibration tokens; a number fixes it.",
    )
    output: str | None = Field(None, description="Write the calibrated model here instead of updating MODEL.")
    overwrite: bool = Field(False, description="Replace --output if it exists.")
