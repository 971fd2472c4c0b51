"""`moh calibrate`: choose shared heads and fit routers from a little text, one decoder layer at a time.

Method (measured in BENCHMARKS.md). For every layer, in order, on the calibration tokens as the already calibrated
layers below pass them on:
1. Run the dense layer and record, per token, the attention input x and each head's output h_i (o_proj's input).
2. A head's importance for a token is ||(h_i - f_i) W_O^i||: how much the output changes if the head is replaced by
   its fallback f_i (zero, or its mean output). The oracle keeps each token's top-`active` heads.
3. Shared heads are those the oracle keeps most often (each layer its own). How many: `--shared-heads N`, or
   by default per layer: for each count a router is fitted and the count whose routing loses the least attention
   output on held-back calibration tokens wins. The layer keeps shared + top-K = active heads per token.
   (Sharing the paper's 50% of heads measured far worse on SmolLM2: 1.53x dense perplexity at 6/9 vs 1.19x with
   none; see BENCHMARKS.md.)
4. The router is linear, fitted by ridge regression from x to the log importance of each routed head.
5. A routed head a token skips outputs zero (default), or with `--head-fallback mean` its mean output over the
   tokens that skip it, importance then being measured against that mean.
6. The output projection o_proj is refitted by ridge least squares, min ||h W_O^T - s W'^T||^2 + r ||W' - W_O||^2
   with s = o_proj's input as the MoH layer sees it (skipped heads at their fallback): the kept heads then make
   up for part of what the skipped ones contributed (`--no-refit-output-projection` turns it off). The refitted
   weights replace the originals in their shards (same names, dtype and shape).
7. The router is fitted again, to the routed heads' importance through the refitted o_proj (the refit changes which
   heads a token does best without), and o_proj is refitted once more, from W_O, for that routing
   (`--no-refit-router` stops after step 6).
8. The layer then runs as MoH, and its output feeds the next layer's calibration.
Only one decoder layer's weights are in memory at a time (read from the safetensors shards), plus the embeddings,
the final norm and the LM head, plus activations. Layers and activations live on the calibration device (CUDA when
available) in the calibration dtype (float32, or bfloat16); the fits always accumulate in float32/float64.

Modules, in the order a run uses them:
- settings: the options (CLI flags are generated from them) and shared constants;
- data: calibration text as token windows, from one or several weighted sources (files and Hub datasets through
  `moh_convert.text_sources`, 'self', 'chat', 'default');
- chat_text: 'chat' text, replies the model writes in its own chat template to the shipped prompts.jsonl;
- layers: running the model one decoder layer at a time (recorded layer inputs, head outputs, held-out loss);
- fits: the per-layer fits as tensor functions (importance, shared heads, ridge router, fallbacks, o_proj refit);
- device: `--calibration-device` / `--calibration-dtype` (checked up front), placing modules on the device;
- memory: glibc malloc tuning between layers;
- run: `calibrate_folder`, the loop over layers and the files it writes;
- report: calibration_report.json, the model card section, the printed summary;
- api: `calibrate()`, the staging copy around `calibrate_folder`.
"""
from .api import calibrate
from .data import load_calibration_windows, sample_own_text
from .fits import OUTPUT_RIDGE, RIDGE, HeadSplit, RidgeRouterFit, choose_head_split, refit_output_projection
from .report import print_report
from .run import calibrate_folder
from .settings import (
    REPORT_NAME, SELF_SAMPLING_TEMPERATURE, SELF_SAMPLING_TOP_P, CalibrateOptions, CalibrationSettings,
)

__all__ = [
    "OUTPUT_RIDGE", "REPORT_NAME", "RIDGE", "SELF_SAMPLING_TEMPERATURE", "SELF_SAMPLING_TOP_P", "CalibrateOptions",
    "CalibrationSettings", "HeadSplit", "RidgeRouterFit", "calibrate", "calibrate_folder", "choose_head_split",
    "load_calibration_windows", "print_report", "refit_output_projection", "sample_own_text",
]
