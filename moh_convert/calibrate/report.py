"""What calibration tells the user: calibration_report.json (its keys are read by the model card, benchmarks and
`moh calibrate` itself), the model card's Calibration section and the summary line printed at the end."""
import resource
import time
from dataclasses import dataclass

import torch

from ..modeling.configuration_moh import MoHConfig
from .settings import REPORT_NAME, SELF_SAMPLING_TEMPERATURE, SELF_SAMPLING_TOP_P, CalibrationSettings


@dataclass
class LayerSummary:
    """One layer's entry in the report."""

    layer: int
    shared_heads: list[int]
    routed_top_k: int
    router_agreement: float  # rounded as reported (the mean over layers is taken of the rounded values)
    oracle_keep_frequency: list[float]

    @classmethod
    def measured(cls, layer: int, shared_heads: list[int], routed_top_k: int, agreement: float,
                 frequency: torch.Tensor) -> "LayerSummary":
        return cls(layer, shared_heads, routed_top_k, round(agreement, 4), [round(value, 4) for value in frequency.tolist()])

    def as_dict(self) -> dict:
        return {
            "layer": self.layer, "shared_heads": self.shared_heads, "routed_top_k": self.routed_top_k,
            "router_agreement": self.router_agreement, "oracle_keep_frequency": self.oracle_keep_frequency,
        }


def method_description(settings: CalibrationSettings) -> str:
    return (
        f"sequential per-layer: importance ||(h_i - f_i) W_O^i|| with {settings.head_fallback} fallback f; shared "
        "heads by oracle keep frequency, their number chosen by held-back reconstruction error; ridge linear router "
        "on the attention input"
        + ("; o_proj refitted by least squares to the dense output" if settings.refit_output_projection else "")
    )


def build_report(
    settings: CalibrationSettings, config: MoHConfig, calibration_tokens: int, heldout_tokens: int,
    perplexity: dict[str, float], layers: list[LayerSummary], output_projection_refit: bool, started: float,
) -> dict:
    """The calibration report; wall time counts from `started` (time.perf_counter()), peak RSS is the process's."""
    return {
        "method": method_description(settings),
        "output_projection_refit": output_projection_refit,
        "calibration_data": settings.calibration_data,
        "self_sampling": (
            {"temperature": SELF_SAMPLING_TEMPERATURE, "top_p": SELF_SAMPLING_TOP_P, "start": "BOS token"}
            if settings.calibration_data == "self" else None
        ),
        "calibration_tokens": calibration_tokens,
        "heldout_tokens": heldout_tokens,
        "seq_len": settings.calibration_seq_len,
        "seed": settings.seed,
        "active_heads": [config.active_heads(i) for i in range(config.num_layers)],
        "num_heads": config.num_heads,
        "heldout_perplexity": perplexity,
        "mean_router_agreement": round(sum(layer.router_agreement for layer in layers) / len(layers), 4),
        "wall_time_s": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "layers": [layer.as_dict() for layer in layers],
    }


def calibration_card_section(report: dict) -> str:
    """The model card's `## Calibration` section for a report."""
    ppl = report["heldout_perplexity"]
    lines = [
        "## Calibration\n",
        f"Routers and shared heads were fitted on {report['calibration_tokens']:,} tokens of "
        f"`{report['calibration_data']}` ({report['seq_len']}-token windows), one layer at a time, with no training "
        f"(method: {report['method']}). Mean agreement of the router with the per-token oracle: "
        f"{report['mean_router_agreement']:.0%}. Full per-layer report: `{REPORT_NAME}`.\n",
    ]
    if ppl:
        lines += [
            f"Perplexity on {report['heldout_tokens']:,} held-out tokens of the same source:\n",
            "| model | perplexity |", "| --- | --- |",
            f"| dense source | {ppl['dense']:.2f} |",
            f"| MoH before calibration | {ppl['before']:.2f} |",
            f"| MoH calibrated | {ppl['after']:.2f} |\n",
        ]
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
        )
