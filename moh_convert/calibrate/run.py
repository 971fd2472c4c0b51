"""`calibrate_folder`: the calibration run over a MoH model folder, one decoder layer at a time, bottom to top
(the method is in the package docstring). Only one decoder layer's weights are in memory at a time, plus the final
norm (and the embeddings while the streams start, the LM head for the held-out perplexity at the end).

Layers, streams of hidden states and fits live on the calibration device (`--calibration-device`), the layers and
streams in the calibration dtype; router tensors, refitted o_proj weights and summary numbers come back to the CPU
(in the stored dtype) before they are written."""
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..model_card import refresh_conversion_section, set_card_section
from ..model_folder import (
    ShardedWeights, replace_tensors_in_shards, save_router_shard, write_moh_config,
)
from ..modeling.configuration_moh import MoHConfig
from ..modeling.modeling_moh import MoHHeadRouting
from .allocation import ALLOCATION_TOKENS, allocate_active_heads, minimum_active_heads, oracle_loss_curves
from .data import CalibrationMix, load_calibration_mix
from .device import CALIBRATION_DTYPES, describe_device, peak_device_memory_mb, place, resolve_calibration_device
from .fits import fit_routing, refit_output_projection, refit_router_to_projection, routed_head_outputs
from .layers import head_outputs_and_inputs, record_layer_inputs, run_layer, stream_loss
from .memory import release_freed_memory, return_large_blocks_to_the_os
from .report import LayerSummary, build_report, calibration_card_section
from .settings import REPORT_NAME, SPEED_WEIGHTS, CalibrationSettings

# Refitted o_proj weights wait on disk (one small file per layer, inside the folder being calibrated) until they are
# written over the originals in their shards at the end: kept in memory they would add up to a whole matrix per layer.
REFIT_DIR = ".moh-refitted-o_proj"


@torch.no_grad()
def calibrate_folder(folder: Path, settings: CalibrationSettings, shared_heads: int | str = "auto") -> dict:
    """Calibrate the MoH model in `folder` in place (the caller provides a staging copy). Returns the report."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    return_large_blocks_to_the_os()
    device = resolve_calibration_device(settings.calibration_device)
    compute_dtype = CALIBRATION_DTYPES[settings.calibration_dtype]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    config = MoHConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    mix = load_calibration_mix(settings, tokenizer, folder)
    calibration_windows, heldout_windows = mix.calibration, mix.heldout
    source = SourceModel(folder, config.text_config, device, compute_dtype)
    streams = Streams.start(source.decoder, calibration_windows, heldout_windows, settings.calibration_batch_size,
                            device, compute_dtype)
    source.decoder.embed_tokens.to("meta")  # only needed to start the streams
    active_heads = [config.active_heads(layer_idx) for layer_idx in range(config.num_layers)]
    if settings.head_allocation == "per-layer":
        active_heads = per_layer_active_heads(source, streams, config, sum(active_heads))
    run = LayerwiseRun(
        settings=settings, config=config, calibrated=calibrated_config(config), source=source, streams=streams,
        active_heads=active_heads,
        fixed_shared=None if shared_heads == "auto" else shared_heads,
        refit=settings.refit_output_projection and refits_output_projection(mix),
        refit_dir=folder / REFIT_DIR, dtype=weights_dtype(config.text_config), device=device,
        compute_dtype=compute_dtype,
    )
    results = [calibrate_layer(run, layer_idx) for layer_idx in tqdm(range(config.num_layers), desc="Calibrating layers")]
    perplexity, per_source = heldout_perplexity(source, streams, config.text_config, mix) if streams.heldout_tokens \
        else ({}, [{} for _ in mix.sources])
    report = build_report(
        settings, run.calibrated, int(calibration_windows.numel()), int(heldout_windows.numel()), perplexity,
        [result.summary for result in results], any(result.output_projection is not None for result in results), started,
        sources=source_summaries(mix, per_source),
        chat_sampling=next((item.sampling for item in mix.sources if item.sampling is not None), None),
        device=describe_device(device), dtype=settings.calibration_dtype, peak_cuda_memory_mb=peak_device_memory_mb(device),
    )
    write_calibrated_model(folder, run.calibrated, results, report)
    return report


class SourceModel:
    """The source model as a meta-device skeleton whose parts are materialised from the folder's shards when in
    use, then placed on the calibration device in the calibration dtype. Memory: the embeddings are only needed to
    start the streams and the LM head only for the held-out perplexity at the end, so neither is in memory while the
    decoder layers are calibrated."""

    def __init__(self, folder: Path, text_config, device: torch.device = torch.device("cpu"),
                 dtype: torch.dtype = torch.float32):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        source_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)]
        text_config._attn_implementation = "sdpa" if source_class._supports_sdpa else "eager"
        with torch.device("meta"):
            self.model = source_class(text_config)
        self.model.eval()
        self.weights = ShardedWeights(folder)
        self.decoder = self.model.model
        self.device, self.dtype = device, dtype
        for name, child in self.decoder.named_children():
            if name != "layers":
                self.weights.load_into(child, f"model.{name}", self.model._init_weights)
                place(child, device, dtype)

    def load_layer(self, layer_idx: int) -> torch.nn.Module:
        layer = self.decoder.layers[layer_idx]
        self.weights.load_into(layer, f"model.layers.{layer_idx}", self.model._init_weights)
        return place(layer, self.device, self.dtype)

    def lm_head(self, text_config) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight in its stored dtype, float32 bias or None); tied to the embeddings when the config says so or
        the checkpoint has no separate head."""
        weight_map = self.weights.weight_map
        tied = getattr(text_config, "tie_word_embeddings", False) or "lm_head.weight" not in weight_map
        weight = self.weights.get("model.embed_tokens.weight" if tied else "lm_head.weight")
        bias = self.weights.get("lm_head.bias").float() if "lm_head.bias" in weight_map else None
        return weight, bias


@dataclass
class Streams:
    """Hidden states at the input of the next layer to calibrate, batch by batch, and every layer's recorded keyword
    arguments (masks, position embeddings: they depend only on positions). Held-out text flows through three
    versions of each layer: dense, as converted ('before') and calibrated ('after')."""

    calibration: list[torch.Tensor]
    heldout: dict[str, list[torch.Tensor]]
    heldout_tokens: list[torch.Tensor]
    calibration_kwargs: list[list[dict]]  # [layer][batch]
    heldout_kwargs: list[list[dict]]

    @classmethod
    def start(cls, decoder, calibration_windows, heldout_windows, batch_size: int,
              device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32) -> "Streams":
        """The streams on `device`, in `dtype`, from the decoder's embeddings (already placed there)."""
        heldout_tokens = [batch.to(device) for batch in heldout_windows.split(batch_size)] if heldout_windows.numel() else []
        calibration_batches = [batch.to(device) for batch in calibration_windows.split(batch_size)]
        calibration_kwargs, calibration = record_layer_inputs(decoder, calibration_batches, dtype)
        heldout_kwargs, heldout = record_layer_inputs(decoder, heldout_tokens, dtype)
        return cls(calibration, {"dense": heldout, "before": heldout, "after": heldout}, heldout_tokens,
                   calibration_kwargs, heldout_kwargs)


@dataclass
class LayerwiseRun:
    """What calibrating a layer reads, and advances (the streams; the calibrated config's per-layer heads)."""

    settings: CalibrationSettings
    config: MoHConfig  # as converted
    calibrated: MoHConfig  # the config being calibrated, filled in layer by layer
    source: SourceModel
    streams: Streams
    active_heads: list[int]  # per layer: shared + routed top-k after calibration
    fixed_shared: int | None  # shared heads per layer, None to choose them per layer
    refit: bool  # refit o_proj
    refit_dir: Path
    dtype: torch.dtype  # of the stored weights
    device: torch.device = torch.device("cpu")  # where layers, streams and fits are computed
    compute_dtype: torch.dtype = torch.float32  # the layers' and streams' dtype during calibration


@dataclass
class LayerResult:
    summary: LayerSummary
    router_state: dict[str, torch.Tensor]  # the layer's routing tensors by checkpoint name, on the CPU in the weights' dtype
    output_projection: Path | None  # file holding the refitted o_proj weight; None when it is not refitted


def calibrated_config(config: MoHConfig) -> MoHConfig:
    """A copy of the converted config with learned routers, binary gates and head fallbacks; its shared heads and
    routed top-K per layer start as converted and are set as each layer is calibrated."""
    calibrated = MoHConfig.from_dict(config.to_dict())
    calibrated.router, calibrated.gate_mode, calibrated.router_bias, calibrated.head_fallback = "learned", "binary", True, True
    calibrated.shared_heads = [list(heads) for heads in config.shared_heads]
    calibrated.routed_top_k = [config.layer_top_k(i) for i in range(config.num_layers)]
    return calibrated


def calibrate_layer(run: LayerwiseRun, layer_idx: int) -> LayerResult:
    """Fit one layer on the calibration stream, then move every stream through it."""
    config, streams = run.config, run.streams
    layer = run.source.load_layer(layer_idx)
    attention = layer.self_attn
    calibration_kwargs, heldout_kwargs = streams.calibration_kwargs[layer_idx], streams.heldout_kwargs[layer_idx]
    if streams.heldout_tokens:
        streams.heldout["dense"] = run_layer(layer, streams.heldout["dense"], heldout_kwargs)
        streams.heldout["before"] = run_as_converted(run, layer, layer_idx, streams.heldout["before"], heldout_kwargs)

    # Step 1: the dense layer's attention inputs and head outputs; steps 2-5: shared heads, router, fallbacks.
    inputs, outputs = head_outputs_and_inputs(layer, attention, streams.calibration, calibration_kwargs)
    active = run.active_heads[layer_idx]
    o_proj_weight = attention.o_proj.weight.float()  # the fits work in float32 whatever the layer's dtype
    routing = fit_routing(inputs, outputs, o_proj_weight, config.num_heads, active, run.settings.head_fallback,
                          run.fixed_shared, SPEED_WEIGHTS[run.settings.objective])
    refits = run.refit and active < config.num_heads
    if not (refits and run.settings.refit_router):
        inputs = None  # the router is fitted for good: free the inputs before the refit's matrices
    output_projection = None
    if refits:  # steps 6 and 7
        seen = routed_head_outputs(outputs, config.num_heads, routing)
        refitted = refit_output_projection(seen, outputs, o_proj_weight, run.settings.output_ridge)
        del seen
        if run.settings.refit_router:
            # The router again, to the heads' importance through the refitted o_proj; then o_proj for that routing
            # (from the source's weight, as the first refit).
            routing = refit_router_to_projection(inputs, outputs, refitted, config.num_heads, routing)
            seen = routed_head_outputs(outputs, config.num_heads, routing)
            refitted = refit_output_projection(seen, outputs, o_proj_weight, run.settings.output_ridge)
            del seen
        attention.o_proj.weight.copy_(refitted)
        output_projection = save_output_projection(run.refit_dir, layer_idx, refitted.to(device="cpu", dtype=run.dtype))
    del inputs, outputs, o_proj_weight
    split = routing.split
    run.calibrated.shared_heads[layer_idx], run.calibrated.routed_top_k[layer_idx] = split.shared, split.top_k

    # Step 8: the layer runs as MoH and feeds the next layer.
    module = MoHHeadRouting.attach_to(attention, run.calibrated, layer_idx).to(run.device)
    module.router.routed_proj.weight.copy_(split.weight)
    module.router.routed_proj.bias.copy_(split.bias)
    module.head_fallback.copy_(routing.fallback)
    # Saved from the float32 fit (not from the module in the calibration dtype), on the CPU in the stored dtype.
    router_state = {
        f"{routing_prefix(layer_idx)}.{name}": tensor.to(device="cpu", dtype=run.dtype).clone()
        for name, tensor in module.state_dict().items()
    }
    place(module, run.device, run.compute_dtype)
    streams.calibration = run_layer(layer, streams.calibration, calibration_kwargs)
    if streams.heldout_tokens:
        streams.heldout["after"] = run_layer(layer, streams.heldout["after"], heldout_kwargs)
    module.detach()
    layer.to("meta")  # free this layer's weights before the next one is read
    release_freed_memory()
    summary = LayerSummary.measured(layer_idx, split.shared, split.top_k, routing.agreement, split.frequency,
                                    split.candidates)
    return LayerResult(summary=summary, router_state=router_state, output_projection=output_projection)


def per_layer_active_heads(source: SourceModel, streams: Streams, config: MoHConfig, budget: int) -> list[int]:
    """`--head-allocation per-layer`: the active heads of each layer from the oracle loss curves of a dense pass
    over the first ALLOCATION_TOKENS calibration tokens (moh_convert.calibrate.allocation)."""
    tokens_per_batch = streams.calibration[0].shape[0] * streams.calibration[0].shape[1]
    hidden_batches = streams.calibration[: max(1, ALLOCATION_TOKENS // tokens_per_batch)]
    curves = oracle_loss_curves(source, hidden_batches, streams.calibration_kwargs, config.num_heads)
    return allocate_active_heads(curves, budget, minimum_active_heads(budget / config.num_layers), config.num_heads)


def run_as_converted(run: LayerwiseRun, layer, layer_idx: int, hidden_batches, kwargs_batches) -> list[torch.Tensor]:
    """The layer with the routing it was converted with (its stored router tensors, if it has any)."""
    config = run.config
    routing = place(MoHHeadRouting.attach_to(layer.self_attn, config, layer_idx), run.device, run.compute_dtype)
    if config.router == "learned" or config.head_fallback:
        prefix = routing_prefix(layer_idx)
        routing.load_state_dict({name: run.source.weights.get(f"{prefix}.{name}") for name in routing.state_dict()})
    hidden_batches = run_layer(layer, hidden_batches, kwargs_batches)
    routing.detach()
    return hidden_batches


def routing_prefix(layer_idx: int) -> str:
    return f"model.layers.{layer_idx}.self_attn.moh"


def o_proj_name(layer_idx: int) -> str:
    return f"model.layers.{layer_idx}.self_attn.o_proj.weight"


def save_output_projection(refit_dir: Path, layer_idx: int, weight: torch.Tensor) -> Path:
    """Park a refitted o_proj weight (in the stored dtype) in REFIT_DIR until it replaces the original."""
    refit_dir.mkdir(exist_ok=True)
    path = refit_dir / f"{layer_idx}.safetensors"
    save_file({o_proj_name(layer_idx): weight}, path)
    return path


def refits_output_projection(mix: CalibrationMix) -> bool:
    """Not for 'self' text alone: fitted to the model's own samples from BOS, the refit measured worse on real text."""
    return any(item.entry.source != "self" for item in mix.sources)


def heldout_perplexity(
    source: SourceModel, streams: Streams, text_config, mix: CalibrationMix
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Perplexity of the held-out text through the dense, converted and calibrated layers: over all windows, and
    per source (over its windows; a source without held-out windows gets {})."""
    head_weight, head_bias = source.lm_head(text_config)
    # On the calibration device, in the stored dtype (cast to float32 a slice at a time).
    head_weight, head_bias = head_weight.to(source.device), None if head_bias is None else head_bias.to(source.device)
    overall, per_source = {}, [{} for _ in mix.sources]
    for name, states in streams.heldout.items():
        loss, window_losses = stream_loss(source.decoder.norm, head_weight, head_bias, states, streams.heldout_tokens,
                                          text_config, per_window=True)
        overall[name] = round(math.exp(loss), 3)
        for index, perplexities in enumerate(per_source):
            in_source = mix.heldout_source == index
            if len(mix.sources) == 1:
                perplexities[name] = overall[name]
            elif in_source.any():
                perplexities[name] = round(math.exp(window_losses[in_source].mean().item()), 3)
    return overall, per_source


def source_summaries(mix: CalibrationMix, per_source: list[dict[str, float]]) -> list[dict]:
    """The report's `sources`: each source's weight, tokens and held-out perplexity; for a built-in source, what
    its text is ("text") and the files it was read from ("files")."""
    return [
        {
            "source": item.entry.source, "weight": round(item.entry.weight, 4),
            "calibration_tokens": int(item.calibration.numel()), "heldout_tokens": int(item.heldout.numel()),
            "heldout_perplexity": perplexities, **(item.origin or {}),
        }
        for item, perplexities in zip(mix.sources, per_source)
    ]


def weights_dtype(text_config) -> torch.dtype:
    dtype = getattr(text_config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def write_calibrated_model(folder: Path, calibrated: MoHConfig, results: list[LayerResult], report: dict) -> None:
    """Router shard and index, config, report, model card section, then the refitted o_proj weights in their shards.
    Files are unlinked before being rewritten: a staging copy may hard-link them to the original model."""
    save_router_shard(folder, {name: tensor for result in results for name, tensor in result.router_state.items()})
    write_moh_config(folder, calibrated)
    (folder / REPORT_NAME).unlink(missing_ok=True)
    (folder / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    set_card_section(folder, "Calibration", calibration_card_section(report))
    refresh_conversion_section(folder, calibrated)
    output_projections = {
        o_proj_name(result.summary.layer): result.output_projection
        for result in results if result.output_projection is not None
    }
    if output_projections:
        replace_tensors_in_shards(folder, output_projections)
    shutil.rmtree(folder / REFIT_DIR, ignore_errors=True)
