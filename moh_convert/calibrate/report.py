"""What calibration tells the user: calibration_report.json (its keys are read by the model card, benchmarks and
`moh calibrate` itself), the model card's Calibration section and the summary line printed at the end."""
import resource
import time
from dataclasses import dataclass, field

import torch

from ..modeling.configuration_moh import MoHConfig
from .settings import REPORT_NAME, SPEED_WEIGHTS, SELF_SAMPLING_TEMPERATURE, SELF_SAMPLING_TOP_P, CalibrationSettings


@dataclass
class LayerSummary:
    """One layer's entry in the report."""

    layer: int
    shared_heads: list[int]
    routed_top_k: int
    router_agreement: float  # rounded as reported (the mean over layers is taken of the rounded values)
    oracle_keep_frequency: list[float]
    # Every number of shared heads tried: {"shared", "error" (share of the attention output lost), "cost" (relative
    # attention cost)}; empty when --shared-heads fixed it.
    split_candidates: list[dict] = field(default_factory=list)

    @classmethod
    def measured(cls, layer: int, shared_heads: list[int], routed_top_k: int, agreement: float,
                 frequency: torch.Tensor, candidates=None) -> "LayerSummary":
        tried = [{"shared": c.shared, "error": float(f"{c.error:.4g}"), "cost": round(c.cost, 4)} for c in candidates or []]
        return cls(layer, shared_heads, routed_top_k, round(agreement, 4), [round(value, 4) for value in frequency.tolist()],
                   tried)

    def as_dict(self) -> dict:
        return {
            "layer": self.layer, "shared_heads": self.shared_heads, "routed_top_k": self.routed_top_k,
            "router_agreement": self.router_agreement, "oracle_keep_frequency": self.oracle_keep_frequency,
            "split_candidates": self.split_candidates,
        }


def method_description(settings: CalibrationSettings) -> str:
    return (
        f"sequential per-layer: importance ||(h_i - f_i) W_O^i|| with {settings.head_fallback} fallback f; shared "
        "heads by oracle keep frequency, their number chosen by held-back reconstruction error "
        f"(objective {settings.objective}: log(error) + {SPEED_WEIGHTS[settings.objective]} x attention cost); ridge linear "
        "router on the attention input"
        + (f"; o_proj refitted by least squares to the dense output (ridge {settings.output_ridge})"
           if settings.refit_output_projection else "")
        + ("; router refitted to the importance through the refitted o_proj, then o_proj refitted for that routing"
           if settings.refit_output_projection and settings.refit_router else "")
    )


def sampling_record(sources: list[dict], chat_sampling: dict | None) -> dict | None:
    """How generated text was written: 'self' settings (as they have always been reported) and, with 'chat', its
    settings under "chat"; None when no source is generated."""
    record = {}
    if any(source["source"] == "self" for source in sources):
        record.update(temperature=SELF_SAMPLING_TEMPERATURE, top_p=SELF_SAMPLING_TOP_P, start="BOS token")
    if chat_sampling is not None:
        record["chat"] = chat_sampling
    return record or None


def build_report(
    settings: CalibrationSettings, config: MoHConfig, calibration_tokens: int, heldout_tokens: int,
    perplexity: dict[str, float], layers: list[LayerSummary], output_projection_refit: bool, started: float,
    sources: list[dict] | None = None, chat_sampling: dict | None = None, device: str = "cpu", dtype: str = "float32",
    peak_cuda_memory_mb: float | None = None,
) -> dict:
    """The calibration report; wall time counts from `started` (time.perf_counter()), peak RSS is the process's.
    `sources`: per source {source, weight, calibration_tokens, heldout_tokens, heldout_perplexity}; `chat_sampling`:
    how 'chat' text was written (ChatText.record); `device` / `dtype`: where and in which dtype the layers ran
    (e.g. 'cuda:0 (NVIDIA H100 80GB HBM3)', 'bfloat16'), with the peak CUDA memory when on CUDA."""
    sources = sources or []
    report = {
        "method": method_description(settings),
        "output_projection_refit": output_projection_refit,
        "router_refit": output_projection_refit and settings.refit_router,  # step 7: router fitted again after the refit
        "calibration_data": settings.calibration_data,  # as given: a string, or the list of SOURCE[:WEIGHT] entries
        "self_sampling": sampling_record(sources, chat_sampling),
        "calibration_tokens": calibration_tokens,
        "heldout_tokens": heldout_tokens,
        "seq_len": settings.calibration_seq_len,
        "seed": settings.seed,
        "device": device,
        "dtype": dtype,
        "head_allocation": settings.head_allocation,
        "objective": settings.objective,
        "active_heads": [config.active_heads(i) for i in range(config.num_layers)],
        "num_heads": config.num_heads,
        "heldout_perplexity": perplexity,
        "mean_router_agreement": round(sum(layer.router_agreement for layer in layers) / len(layers), 4),
        "wall_time_s": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "sources": sources,
        "layers": [layer.as_dict() for layer in layers],
    }
    if peak_cuda_memory_mb is not None:
        report["peak_cuda_memory_mb"] = peak_cuda_memory_mb
    return report


def data_description(calibration_data: str | list[str]) -> str:
    return f"`{calibration_data}`" if isinstance(calibration_data, str) else ", ".join(f"`{entry}`" for entry in calibration_data)


def ratio(perplexity: dict, key: str = "after") -> str:
    return f"{perplexity[key] / perplexity['dense']:.3f}x" if perplexity.get(key) and perplexity.get("dense") else "-"


def source_table(sources: list[dict]) -> list[str]:
    """The card's per-source table (several sources only): shares and held-out perplexity of each."""
    lines = ["Per source (held-out perplexity on that source's own held-out text):\n",
             "| source | weight | calibration tokens | held-out tokens | dense | before | calibrated | calibrated / dense |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for source in sources:
        ppl = source["heldout_perplexity"]
        cells = [f"{ppl[key]:.2f}" if key in ppl else "-" for key in ("dense", "before", "after")]
        lines.append(f"| `{source['source']}` | {source['weight']:.2f} | {source['calibration_tokens']:,} | "
                     f"{source['heldout_tokens']:,} | {' | '.join(cells)} | {ratio(ppl)} |")
    origins = [f"- `{source['source']}`: {source['text']}" for source in sources if source.get("text")]
    return lines + [""] + (origins + [""] if origins else [])


def calibration_card_section(report: dict) -> str:
    """The model card's `## Calibration` section for a report."""
    ppl = report["heldout_perplexity"]
    lines = [
        "## Calibration\n",
        f"Routers and shared heads were fitted on {report['calibration_tokens']:,} tokens of "
        f"{data_description(report['calibration_data'])} ({report['seq_len']}-token windows), one layer at a time, with no training "
        f"(method: {report['method']}). Mean agreement of the router with the per-token oracle: "
        f"{report['mean_router_agreement']:.0%}. Objective: `{report.get('objective', 'quality')}`. Full per-layer "
        f"report: `{REPORT_NAME}`.\n",
    ]
    sources = report.get("sources") or []
    if ppl:
        lines += [
            f"Perplexity on {report['heldout_tokens']:,} held-out tokens of the same "
            f"{'sources' if len(sources) > 1 else 'source'}:\n",
            "| model | perplexity |", "| --- | --- |",
            f"| dense source | {ppl['dense']:.2f} |",
            f"| MoH before calibration | {ppl['before']:.2f} |",
            f"| MoH calibrated | {ppl['after']:.2f} |\n",
        ]
    if len(sources) > 1:
        lines += source_table(sources)
    shared = [layer["shared_heads"] for layer in report["layers"]]
    lines.append("Shared heads per layer: " + "; ".join(f"{i}: {heads}" for i, heads in enumerate(shared)) + "\n")
    return "\n".join(lines)


def print_report(report: dict) -> None:
    ppl = report["heldout_perplexity"]
    if ppl:
        print(
            f"held-out perplexity: dense {ppl['dense']:.2f}, before {ppl['before']:.2f}, calibrated {ppl['after']:.2f} "
            f"({ppl['after'] / ppl['dense']:.3f}x dense); router agreement {report['mean_router_agreement']:.0%}; "
            f"{report['wall_time_s']:.0f} s, peak RSS {report['peak_rss_mb']:.0f} MB"
            + (f", peak CUDA memory {report['peak_cuda_memory_mb']:.0f} MB" if "peak_cuda_memory_mb" in report else "")
            + (f" ({report['device']}, {report['dtype']})" if "device" in report else "")
        )
    sources = report.get("sources") or []
    if len(sources) > 1:
        print("calibrated / dense perplexity per source: " + ", ".join(
            f"{source['source']} {ratio(source['heldout_perplexity'])}" for source in sources))
