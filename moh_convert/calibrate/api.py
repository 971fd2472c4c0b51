"""`moh calibrate` / `moh_convert.calibrate()`: calibrate an already converted model folder, in a staging copy that
replaces MODEL (or becomes --output) only once it is complete."""
import os
import shutil
from pathlib import Path

from ..errors import MoHError
from ..model_folder import StagedFolder, link_or_copy, read_json_object
from ..options import validate_options
from ..sources import check_source
from .data import check_calibration_source
from .device import check_calibration_device
from .report import print_report
from .run import calibrate_folder
from .settings import REPORT_NAME, CalibrateOptions, CalibrationSettings


def calibrate(model: str | os.PathLike, **options) -> Path:
    """Calibrate an already converted MoH model folder (in place, or into `output`). Returns the folder."""
    opts = validate_options(CalibrateOptions, options)
    if opts.calibration_data is None:
        raise MoHError("calibrate needs --calibration-data: 'default' (chat, prose, math and code that need no data), "
                       "'chat', 'self', 'prose', 'math', 'code', a .txt/.jsonl file or a Hub dataset id, optionally "
                       "several with weights (a.txt:0.5 chat:0.5)")
    model = Path(model).expanduser().resolve()
    check_calibratable(model)
    check_calibration_source(opts.calibration_data, opts.calibration_column)  # before the model is copied
    check_calibration_device(opts.calibration_device)
    output = Path(opts.output).expanduser().resolve() if opts.output else model
    # In place (no --output) the staged copy replaces MODEL itself; --output must stay clear of MODEL.
    staging = StagedFolder(output, sources=[model], overwrite=opts.overwrite) if opts.output else \
        StagedFolder(model, overwrite=True)
    with staging as staged:
        # Hard links: the source weights are never rewritten, so the copy costs no disk space or time.
        shutil.copytree(model, staged.path, copy_function=link_or_copy)
        settings = CalibrationSettings(**opts.model_dump(include=set(CalibrationSettings.model_fields)))
        report = calibrate_folder(staged.path, settings, opts.shared_heads)
        staged.move_into_place()
    print_report(report)
    return output


def check_calibratable(model: Path) -> None:
    """A MoH model folder whose attention is still the source model's, with a readable config.json and tokenizer
    files (else a MoHError saying what to do)."""
    if not (model / "config.json").is_file():
        raise MoHError(f"{model} is not a model folder (no config.json); convert a model first with `moh convert`")
    config = read_json_object(model / "config.json", "re-convert the model with `moh convert`")
    if config.get("model_type") != "moh":
        raise MoHError(f"{model} is not a MoH model; convert it first with `moh convert`")
    check_source(model, "model")  # tokenizer files
    earlier_report = model / REPORT_NAME
    if earlier_report.is_file() and read_json_object(
        earlier_report, "calibrate again from the source: `moh convert SOURCE OUTPUT --calibration-data ...`"
    ).get("output_projection_refit"):
        raise MoHError(
            f"{model} was calibrated with refitted output projections, so its attention is no longer the source "
            "model's; calibrate again from the source: `moh convert SOURCE OUTPUT --calibration-data ...`"
        )
