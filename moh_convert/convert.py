"""`moh convert`: turn a dense checkpoint into a MoH model folder, streaming tensors shard by shard."""
import json
import os
import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from .architectures import attention_tensor_names, check_supported
from .calibrate import CalibrationSettings, calibrate_folder, print_report

# Without --calibration-data a converted model is calibrated on the default data mix (moh_convert.calibrate).
DEFAULT_CALIBRATION_SOURCE = "default"
from .calibrate.data import check_calibration_source
from .calibrate.device import check_calibration_device
from .errors import MoHError
from .heads import first_heads_shared, resolve_head_counts
from .model_card import write_model_card
from .model_folder import (
    DTYPES, FIRST_SHARD_NAME, ROUTER_SHARD, SINGLE_WEIGHTS_NAME, StagedFolder, copy_support_files, write_moh_config,
    write_weight_index,
)
from .modeling.configuration_moh import MoHConfig
from .modeling.modeling_moh import MoHHeadRouting
from .options import validate_options
from .safetensors_stream import SAFETENSORS_DTYPES, write_safetensors_streaming
from .sources import SourceCheckpoint, resolve_source


class ConvertOptions(CalibrationSettings):
    """Options of `moh convert` / `moh_convert.convert()`. Calibration options are inherited: the converted model
    is calibrated before it is moved into place, on `calibration_data` or, without it, on the default data (text
    the model writes itself, see `moh_convert.calibrate`); `no_calibration` gives the paper's parameter-free
    conversion instead."""

    active_heads: int | None = Field(None, description="Heads each token uses per layer (shared + routed top-K).")
    active_ratio: float | None = Field(None, description="Active heads as a fraction of all heads (default 0.75).")
    shared_heads: int | None = Field(None, description="Always-on heads per layer (default: half of all heads).")
    shared_ratio: float | None = Field(None, description="Shared heads as a fraction of all heads (default 0.5).")
    router: Literal["query-norm", "learned"] = Field(
        "query-norm",
        description="query-norm: the paper's parameter-free router (L2 norm of each head's query); "
        "learned: a linear router on the attention input, zero-initialised (train or calibrate it).",
    )
    gate_mode: Literal["binary", "two-stage", "softmax"] = Field(
        "binary",
        description="binary: 0/1 gates (paper's conversion); two-stage: the paper's learned shared/routed weights "
        "(needs --router learned); softmax: MoA-style raw router weights.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype of the written weights; auto keeps the source's."
    )
    no_calibration: bool = Field(
        False,
        description="Skip calibration and write the paper's parameter-free conversion (the first heads shared, the "
        "query-norm router): far below the source's quality until trained on billions of tokens; for `moh train`.",
    )
    base_model: str | None = Field(None, description="Hub id recorded as base_model in the model card.")
    overwrite: bool = Field(False, description="Replace OUTPUT if it exists.")
    push_to_hub: str | None = Field(None, description="Hub repo id to publish OUTPUT to when done (see `moh push`).")


def convert(source: str | os.PathLike, output: str | os.PathLike, **options) -> Path:
    """Convert SOURCE (Hub id, checkpoint folder or .gguf file) into a MoH model folder at OUTPUT.

    Keyword options are those of `ConvertOptions` (the same as the CLI flags). The folder is assembled in a
    hidden temporary folder next to OUTPUT and renamed into place only when complete. Returns OUTPUT.
    """
    opts = validate_options(ConvertOptions, options)
    if opts.no_calibration and opts.calibration_data is not None:
        raise MoHError("give either --calibration-data or --no-calibration, not both")
    calibration_data = None if opts.no_calibration else (opts.calibration_data or DEFAULT_CALIBRATION_SOURCE)
    if calibration_data is not None:
        check_calibration_source(calibration_data, opts.calibration_column)  # before GBs of weights are copied
        check_calibration_device(opts.calibration_device)
    output = Path(output).expanduser().resolve()
    if opts.push_to_hub:
        from .hub import check_push_ready

        check_push_ready(opts.push_to_hub)  # a bad id, offline mode or no token fails now, not after the work
    local_source = Path(source).expanduser()
    with StagedFolder(output, sources=[local_source] if local_source.exists() else [], overwrite=opts.overwrite) as staged:
        source_checkpoint = resolve_source(source, staged.work_dir)
        moh_config = build_moh_config(source_checkpoint, opts)
        # Where it came from (the default teacher of `moh train`'s distillation): a Hub id, or a local absolute path.
        moh_config.source_model = str(local_source.resolve()) if local_source.exists() else str(source)
        staging = staged.path
        staging.mkdir()
        write_weights(source_checkpoint, staging, router_tensors(moh_config), DTYPES.get(opts.dtype))
        copy_support_files(source_checkpoint.folder, staging)
        write_moh_config(staging, moh_config)
        base_model = opts.base_model or _hub_id_or_none(source_checkpoint.name)
        write_model_card(staging, moh_config, source_checkpoint.name, base_model=base_model)
        if calibration_data is not None:
            settings = CalibrationSettings(**{**opts.model_dump(include=set(CalibrationSettings.model_fields)),
                                              "calibration_data": calibration_data})
            # Calibration measures which heads each layer shares, and how many unless the user fixed that number.
            report = calibrate_folder(staging, settings, opts.shared_heads if opts.shared_heads is not None else "auto")
        staged.move_into_place()
    if calibration_data is not None:
        print_report(report)
    if opts.push_to_hub:
        from .hub import describe_push, push

        print(describe_push(push(output, opts.push_to_hub)))
    return output


def _hub_id_or_none(name: str) -> str | None:
    return name if name.count("/") == 1 and not Path(name).exists() else None


def load_source_config(folder: Path):
    from transformers import AutoConfig

    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError as error:
        raise MoHError(f"{folder / 'config.json'} is not valid JSON ({error}); re-download the checkpoint") from None
    if config.get("model_type") == "moh":
        raise MoHError(f"{folder} is already a MoH model; convert its source model instead")
    try:
        return AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError) as error:
        raise MoHError(f"cannot read {folder / 'config.json'}: {error}") from None


def build_moh_config(source: SourceCheckpoint, opts: ConvertOptions) -> MoHConfig:
    source_config = load_source_config(source.folder)
    check_supported(source_config)
    for layer_idx in range(source_config.num_hidden_layers):
        missing = [name for name in attention_tensor_names(source_config, layer_idx) if name not in source.weight_map]
        if missing:
            raise MoHError(f"source checkpoint lacks tensor(s) {', '.join(missing)}; it is incomplete or corrupt")
    num_heads = source_config.num_attention_heads
    active_heads, shared_heads = resolve_head_counts(
        num_heads, opts.active_heads, opts.active_ratio, opts.shared_heads, opts.shared_ratio
    )
    if opts.gate_mode == "two-stage" and opts.router != "learned":
        raise MoHError("--gate-mode two-stage needs --router learned")
    if opts.dtype != "auto":
        source_config.dtype = opts.dtype
    text_config = source_config.to_dict()
    text_config.pop("architectures", None)
    config = MoHConfig(
        text_config=text_config,
        shared_heads=first_heads_shared(source_config.num_hidden_layers, shared_heads),
        routed_top_k=active_heads - shared_heads,
        router=opts.router,
        gate_mode=opts.gate_mode,
    )
    config.architectures = ["MoHForCausalLM"]
    config.dtype = source_config.dtype
    return config


def router_tensors(config: MoHConfig) -> dict[str, torch.Tensor]:
    """Initial router tensors (zeros: uniform routing) named as the MoH model stores them."""
    dtype = config.text_config.dtype
    dtype = DTYPES.get(dtype, torch.float32) if isinstance(dtype, str) else (dtype or torch.float32)
    tensors = {}
    for layer_idx in range(config.num_layers):
        text_config = config.text_config
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // config.num_heads
        routing = MoHHeadRouting(config, layer_idx, text_config.hidden_size, head_dim)
        for name, tensor in routing.state_dict().items():
            tensors[f"model.layers.{layer_idx}.self_attn.moh.{name}"] = torch.zeros_like(tensor, dtype=dtype)
    return tensors


def write_weights(
    source: SourceCheckpoint, staging: Path, routers: dict[str, torch.Tensor], dtype: torch.dtype | None
) -> None:
    """Write the source tensors (unchanged names) plus router tensors as safetensors shards with an index.

    Safetensors shards in the source dtype are copied byte for byte; otherwise each shard is rewritten one
    tensor at a time (cast to `dtype` if given), so peak memory is about the largest tensor.
    """
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    shards = source.weight_files
    out_names = {
        shard: shard if source.weight_format == "safetensors" else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        for i, shard in enumerate(shards)
    }
    if routers and out_names == {shards[0]: SINGLE_WEIGHTS_NAME}:
        # transformers reads model.safetensors and ignores any index when that file exists: name it as a shard.
        out_names[shards[0]] = FIRST_SHARD_NAME
    total_bytes = sum((source.folder / shard).stat().st_size for shard in shards)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="Writing weights") as progress:
        for shard in shards:
            source_path, out_path = source.folder / shard, staging / out_names[shard]
            if source.weight_format == "safetensors" and dtype is None:
                shutil.copyfile(source_path, out_path)
            else:
                cast_shard(source_path, out_path, source.weight_format, dtype)
            for name, file_name in source.weight_map.items():
                if file_name == shard:
                    weight_map[name] = out_names[shard]
            progress.update(source_path.stat().st_size)
    if routers:
        save_file(routers, staging / ROUTER_SHARD, metadata={"format": "pt"})
        weight_map.update({name: ROUTER_SHARD for name in routers})
    out_files = sorted(set(weight_map.values()))
    if len(out_files) > 1:
        write_weight_index(staging, weight_map)
    elif out_files[0] != SINGLE_WEIGHTS_NAME:
        (staging / out_files[0]).rename(staging / SINGLE_WEIGHTS_NAME)


def cast_shard(source_path: Path, out_path: Path, weight_format: str, dtype: torch.dtype | None) -> None:
    """Rewrite one shard as safetensors, casting floating-point tensors to `dtype`, one tensor at a time."""
    from safetensors import safe_open

    def target(tensor_dtype: torch.dtype) -> torch.dtype:
        return dtype if dtype is not None and tensor_dtype.is_floating_point else tensor_dtype

    if weight_format == "safetensors":
        dtype_by_code = {code: torch_dtype for torch_dtype, code in SAFETENSORS_DTYPES.items()}
        with safe_open(source_path, framework="pt") as handle:
            slices = {name: handle.get_slice(name) for name in handle.keys()}
            specs = [(name, target(dtype_by_code[s.get_dtype()]), tuple(s.get_shape())) for name, s in slices.items()]
            out_dtype = {name: tensor_dtype for name, tensor_dtype, _ in specs}
            write_safetensors_streaming(
                out_path, specs, lambda name: handle.get_tensor(name).to(out_dtype[name]), metadata={"format": "pt"}
            )
        return
    try:  # the header of .bin files is only checked here, so a damaged file fails here
        state_dict = torch.load(source_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise MoHError(f"could not read weights from {source_path} ({error}); re-download the checkpoint") from None
    specs = [(name, target(tensor.dtype), tuple(tensor.shape)) for name, tensor in state_dict.items()]
    write_safetensors_streaming(
        out_path, specs, lambda name: state_dict[name].to(target(state_dict[name].dtype)), metadata={"format": "pt"}
    )
