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
7. The layer then runs as MoH, and its output feeds the next layer's calibration.
Only one decoder layer's weights are in memory at a time (read from the safetensors shards), plus the embeddings,
the final norm and the LM head, plus activations.
"""
import json
import math
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .errors import MoHError
from .modeling.configuration_moh import MoHConfig
from .modeling.modeling_moh import attach_head_routing, detach_head_routing
from .options import validate_options

REPORT_NAME = "calibration_report.json"
# Calibration tokens set aside (per layer) to choose how many heads to share.
CHECK_TOKENS = 4096
RIDGE = 1e-2  # ridge strength, relative to the mean diagonal of X^T X
OUTPUT_RIDGE = 1e-2  # pull of the refitted o_proj towards the original, relative to the mean diagonal of X^T X
# A model's own samples at temperature 1 are easier text than real text; sampling a little hotter gives calibration
# more varied activations (SmolLM2 6/9 'self': see the calibration table in BENCHMARKS.md).
SELF_SAMPLING_TEMPERATURE = 1.1
SELF_SAMPLING_TOP_P = 0.95
LM_HEAD_SLICE = 4096  # vocabulary rows of the LM head cast to float32 at a time for the held-out loss


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


# --- calibration text ---------------------------------------------------------------------------------------


def load_calibration_windows(
    settings: CalibrationSettings, tokenizer, model_folder: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration windows, held-out windows), LongTensors [num_windows, seq_len] from the configured source."""
    seq_len = settings.calibration_seq_len
    num_calibration = math.ceil(settings.calibration_tokens / seq_len)
    num_heldout = math.ceil(settings.calibration_heldout_tokens / seq_len)
    if settings.calibration_data == "self":
        token_ids = sample_own_text(model_folder, tokenizer, (num_calibration + num_heldout) * seq_len, seq_len, settings.seed,
                                    batch_size=16 * settings.calibration_batch_size)
    else:
        needed_tokens = (num_calibration + num_heldout + 1) * seq_len  # one spare window: the cut may split a word
        needed_chars = needed_tokens * 8
        text = read_calibration_text(settings, needed_chars=needed_chars)
        # Tokenize only a prefix long enough (tokenizing a whole large file costs time and memory), longer if needed.
        while True:
            token_ids = tokenizer(text[:needed_chars], return_tensors="pt", add_special_tokens=False)["input_ids"][0]
            if token_ids.numel() >= needed_tokens or needed_chars >= len(text):
                break
            needed_chars *= 2
    num_windows = token_ids.numel() // seq_len
    if num_windows < num_calibration + max(num_heldout, 0):
        raise MoHError(
            f"calibration source {settings.calibration_data!r} has {token_ids.numel()} tokens; "
            f"{(num_calibration + num_heldout) * seq_len} are needed ({settings.calibration_tokens} for calibration "
            f"+ {settings.calibration_heldout_tokens} held out): give more text or lower --calibration-tokens"
        )
    windows = token_ids[: num_windows * seq_len].view(num_windows, seq_len)
    return windows[:num_calibration], windows[num_calibration : num_calibration + num_heldout]


def read_calibration_text(settings: CalibrationSettings, needed_chars: int) -> str:
    source = settings.calibration_data
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".jsonl":
            texts = []
            for line_number, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)[settings.calibration_column])
                except (ValueError, KeyError):
                    raise MoHError(
                        f"{path}:{line_number} is not a JSON object with a {settings.calibration_column!r} field "
                        "(set --calibration-column)"
                    ) from None
            return "\n\n".join(texts)
        return path.read_text()
    if path.suffix in (".txt", ".jsonl", ".json") or os.sep in source or source.startswith("."):
        raise MoHError(f"calibration file {source} not found")
    return read_hub_dataset_text(settings, needed_chars)


def read_hub_dataset_text(settings: CalibrationSettings, needed_chars: int) -> str:
    """Stream a Hugging Face dataset until enough text is read (through the local cache when offline)."""
    import datasets

    try:
        dataset = datasets.load_dataset(
            settings.calibration_data, settings.calibration_dataset_config, split=settings.calibration_split,
            streaming=True,
        )
        texts, length = [], 0
        for row in dataset:
            if settings.calibration_column not in row:
                raise MoHError(
                    f"dataset {settings.calibration_data!r} has no column {settings.calibration_column!r} "
                    f"(columns: {', '.join(row)}); set --calibration-column"
                )
            texts.append(row[settings.calibration_column])
            length += len(texts[-1])
            if length >= needed_chars:
                break
    except MoHError:
        raise
    except Exception as error:  # datasets raises many types for missing / offline datasets
        raise MoHError(
            f"could not read calibration dataset {settings.calibration_data!r} ({type(error).__name__}: {error}); "
            "pass a local .txt/.jsonl file or 'self'"
        ) from None
    return "\n\n".join(texts)


@torch.no_grad()
def sample_own_text(
    model_folder: Path, tokenizer, num_tokens: int, seq_len: int, seed: int, batch_size: int = 64
) -> torch.Tensor:
    """Data-free calibration: sample windows of text from the dense source model (same weights, no routing).

    Decoding is one token per step for the whole batch, so the fewer, larger batches the faster: every window is
    sampled in one batch when it fits in `batch_size`."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = MoHConfig.from_pretrained(model_folder)
    source_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config.text_config)]
    model = source_class.from_pretrained(model_folder, config=config.text_config, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    start_token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    num_sequences = math.ceil(num_tokens / seq_len)
    samples = []
    for start in tqdm(range(0, num_sequences, batch_size), desc="Sampling calibration text"):
        prompts = torch.full((min(batch_size, num_sequences - start), 1), start_token, dtype=torch.long)
        tokens = model.generate(
            prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_p=SELF_SAMPLING_TOP_P,
            temperature=SELF_SAMPLING_TEMPERATURE,
            max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1, pad_token_id=tokenizer.eos_token_id,
        )
        samples.append(tokens[:, :seq_len])
    del model
    return torch.cat(samples)[:num_sequences].reshape(-1)


# --- the model, one layer at a time -------------------------------------------------------------------------


class ShardedWeights:
    """Reads named tensors from a model folder's safetensors files, one tensor at a time, without memory maps (a
    mapped shard's pages would count as the process's memory until the end)."""

    def __init__(self, folder: Path):
        from .safetensors_stream import read_safetensors_header

        index = folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
        self.folder = folder
        self.weight_map, self.headers = {}, {}
        for file in files:
            data_start, header = read_safetensors_header(folder / file)
            self.headers[file] = (data_start, header)
            self.weight_map.update({name: file for name in header})

    def get(self, name: str) -> torch.Tensor:
        from .safetensors_stream import read_safetensors_tensor

        file = self.weight_map[name]
        data_start, header = self.headers[file]
        return read_safetensors_tensor(self.folder / file, data_start, header[name])

    def load_into(self, module: torch.nn.Module, prefix: str, init_fn) -> None:
        """Materialise a meta-device module on the CPU, in float32, with its checkpoint tensors (`prefix.<name>`).

        Each tensor is read and cast on its own, so the transient memory is one tensor, not a second copy of the
        module. Only a module with buffers (rotary frequencies, embedding scales, computed by `init_fn`) or with
        tensors missing from the checkpoint is allocated empty first."""
        names = list(module.state_dict())
        state = {name: self.get(f"{prefix}.{name}").float() for name in names if f"{prefix}.{name}" in self.weight_map}
        if len(state) < len(names) or any(True for _ in module.buffers()):
            module.to_empty(device="cpu")
            for submodule in module.modules():
                init_fn(submodule)
        module.load_state_dict(state, strict=False, assign=True)
        module.float()


class LayerInputRecorder(torch.nn.Module):
    """Stands in for a decoder layer while the model's own forward computes each layer's keyword arguments
    (masks, rotary position embeddings), which depend only on positions, not on hidden states."""

    def __init__(self, layer: torch.nn.Module, records: list):
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", None)
        self.records = records

    def forward(self, hidden_states, *args, **kwargs):
        self.records.append((hidden_states, kwargs))
        return hidden_states


class _StopLayer(Exception):
    """Raised once a layer's attention output is captured: the rest of the layer is not needed then."""


def head_outputs_and_inputs(layer, attention, hidden_batches, kwargs_batches):
    """Run `layer` (dense) and return attention inputs X [tokens, hidden] and head outputs [tokens, heads*head_dim]."""
    inputs, outputs = [], []

    def keep_input(module, args, kwargs):
        inputs.append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).reshape(-1, module.o_proj.out_features))

    def keep_output_and_stop(module, args):
        outputs.append(args[0].reshape(-1, args[0].shape[-1]))
        raise _StopLayer

    handles = [
        attention.register_forward_pre_hook(keep_input, with_kwargs=True),
        attention.o_proj.register_forward_pre_hook(keep_output_and_stop),
    ]
    try:
        for hidden_states, kwargs in zip(hidden_batches, kwargs_batches):
            try:
                layer(hidden_states, **kwargs)
            except _StopLayer:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(inputs).float(), torch.cat(outputs).float()


def projected_deviation(head_outputs: torch.Tensor, head_means: torch.Tensor, o_proj_weight: torch.Tensor) -> torch.Tensor:
    """(h_i - m_i) W_O^i per token and head: [tokens, heads, hidden], what each head adds beyond its average."""
    num_heads, head_dim = head_means.shape
    weight = o_proj_weight.float().view(-1, num_heads, head_dim)
    deviation = head_outputs.view(-1, num_heads, head_dim) - head_means
    return torch.einsum("nhd,ohd->nho", deviation, weight)


def head_importance(head_outputs: torch.Tensor, head_means: torch.Tensor, o_proj_weight: torch.Tensor) -> torch.Tensor:
    """||(h_i - m_i) W_O^i|| per token and head: [tokens, heads]. Chunked to bound memory."""
    # A chunk's projected deviations are [chunk, heads, hidden]: 128 tokens keep that small for large models.
    return torch.cat([projected_deviation(chunk, head_means, o_proj_weight).norm(dim=-1) for chunk in head_outputs.split(128)])


def keep_frequency(importance: torch.Tensor, active: int) -> torch.Tensor:
    """Share of tokens for which each head is among the token's top-`active` heads by importance (the oracle)."""
    kept = torch.zeros_like(importance).scatter_(1, importance.topk(active, dim=1).indices, 1.0)
    return kept.mean(0)


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(scores).scatter_(1, scores.topk(k, dim=1).indices, 1.0)


def reconstruction_error(deviation: torch.Tensor, skipped: torch.Tensor, o_proj_weight: torch.Tensor) -> float:
    """Mean squared norm of what the skipped heads would have added to the output, sum_i skipped_i (h_i - m_i) W_O^i.
    deviation: [tokens, heads, head_dim] = h - m; skipped: [tokens, heads], 1 where the token skips the head."""
    total = 0.0
    for deviation_chunk, skipped_chunk in zip(deviation.split(512), skipped.split(512)):
        lost = (deviation_chunk * skipped_chunk.unsqueeze(-1)).flatten(1) @ o_proj_weight.float().T
        total += lost.pow(2).sum().item()
    return total / deviation.shape[0]


def candidate_shared_counts(active: int) -> list[int]:
    """0..active, thinned to at most 9 values for models with many heads (each candidate costs a router fit)."""
    return sorted({round(active * step / 8) for step in range(9)}) if active > 8 else list(range(active + 1))


def choose_head_split(inputs, importance, deviation_check, o_proj_weight, active: int, fixed_shared: int | None) -> dict:
    """Pick the shared heads and fit the router of one layer.

    Shared heads are the heads the oracle keeps most often. How many: `fixed_shared` if the user set it, otherwise
    every count from 0 to `active` is tried (router fitted on the first part of the tokens) and the one whose
    routing loses the least of the attention output on the last part (`deviation_check`: h - m there) wins. A router that cannot
    see the context of a token is only worth its routing decisions where it is reliable."""
    num_tokens, num_heads = importance.shape
    num_fit = num_tokens - deviation_check.shape[0]
    frequency = keep_frequency(importance, active)
    order = frequency.argsort(descending=True).tolist()
    counts = [min(fixed_shared, active)] if fixed_shared is not None else candidate_shared_counts(active)
    fit_part = RidgeRouterFit(inputs[:num_fit]) if fixed_shared is None else RidgeRouterFit(inputs)
    best = None
    for count in counts:
        shared = sorted(order[:count])
        routed = [head for head in range(num_heads) if head not in shared]
        top_k = active - count
        if top_k == 0 or not routed:
            weight, bias = torch.zeros(len(routed), inputs.shape[1]), torch.zeros(len(routed))
        else:
            targets = importance[:, routed].clamp_min(1e-6).log()
            weight, bias = fit_part.fit(targets[: fit_part.inputs.shape[0]])
        skipped = torch.ones(deviation_check.shape[0], num_heads)
        skipped[:, shared] = 0.0
        if top_k:
            picks = top_k_mask(inputs[num_fit:] @ weight.T + bias, top_k)
            skipped[:, routed] = 1.0 - picks
        error = reconstruction_error(deviation_check, skipped, o_proj_weight) if len(counts) > 1 else 0.0
        if best is None or error < best["error"]:
            best = {"error": error, "shared": shared, "routed": routed, "top_k": top_k, "weight": weight, "bias": bias}
    del fit_part
    if fixed_shared is None and best["top_k"] > 0:
        # Refit the chosen router on every calibration token.
        targets = importance[:, best["routed"]].clamp_min(1e-6).log()
        best["weight"], best["bias"] = RidgeRouterFit(inputs).fit(targets)
    best["frequency"] = frequency
    return best


class RidgeRouterFit:
    """Ridge regression targets ≈ inputs @ W.T + b for several sets of targets on the same inputs (one per candidate
    split of a layer): the normal matrix is accumulated in float64 chunk by chunk and factored once."""

    def __init__(self, inputs: torch.Tensor):
        self.inputs = inputs
        gram = torch.zeros(inputs.shape[1] + 1, inputs.shape[1] + 1, dtype=torch.float64)
        for features in self._feature_chunks():
            gram.addmm_(features.T, features)
        ridge = RIDGE * gram.diagonal()[:-1].mean()
        gram.diagonal()[:-1].add_(ridge)  # not on the bias
        self.factor = torch.linalg.cholesky(gram)

    def _feature_chunks(self):
        for chunk in self.inputs.split(1024):
            yield torch.cat([chunk, torch.ones(chunk.shape[0], 1)], dim=1).double()

    def fit(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (W [outputs, hidden], b [outputs])."""
        right_side = torch.zeros(self.factor.shape[0], targets.shape[1], dtype=torch.float64)
        for features, target_chunk in zip(self._feature_chunks(), targets.split(1024)):
            right_side.addmm_(features.T, target_chunk.double())
        solution = torch.cholesky_solve(right_side, self.factor)  # [hidden + 1, outputs]
        return solution[:-1].T.float().contiguous(), solution[-1].float().contiguous()


def refit_output_projection(seen: torch.Tensor, dense: torch.Tensor, weight: torch.Tensor, ridge: float) -> torch.Tensor:
    """W' minimising ||dense W^T - seen W'^T||^2 + r ||W' - W||^2: the output projection refitted so that the heads a
    token keeps make up for the ones it skips. seen/dense: o_proj inputs [tokens, heads*head_dim].

    Normal equations (S^T S + r I) W'^T = S^T (D W^T) + r W^T in float64, solved through a Cholesky factor (the
    ridge makes the system positive definite). The right side is accumulated from the dense outputs D W^T chunk by
    chunk and the system is solved in place, so two width x width float64 matrices exist at a time."""
    gram = torch.zeros(seen.shape[1], seen.shape[1], dtype=torch.float64)
    right_side = torch.zeros(seen.shape[1], weight.shape[0], dtype=torch.float64)
    for seen_chunk, dense_chunk in zip(seen.split(512), dense.split(512)):
        seen_chunk = seen_chunk.double()
        gram.addmm_(seen_chunk.T, seen_chunk)
        # D W^T is the dense layer's own o_proj output: computed in the weight's precision, as the model does.
        right_side.addmm_(seen_chunk.T, (dense_chunk @ weight.float().T).double())
    strength = (ridge * gram.diagonal().mean()).item()
    right_side.add_(weight.T, alpha=strength)
    gram.diagonal().add_(strength)
    # In place: gram becomes its Cholesky factor L (lower triangle), right_side the solution of L L^T X = right_side.
    torch.linalg.cholesky(gram, out=gram)
    torch.linalg.solve_triangular(gram, right_side, upper=False, out=right_side)
    torch.linalg.solve_triangular(gram.T, right_side, upper=True, out=right_side)
    del gram
    return right_side.T.to(weight.dtype).contiguous()


def run_layer(layer, hidden_batches, kwargs_batches) -> list[torch.Tensor]:
    return [layer(hidden_states, **kwargs) for hidden_states, kwargs in zip(hidden_batches, kwargs_batches)]


def stream_loss(final_norm, head_weight, head_bias, hidden_batches, token_batches, text_config) -> float:
    """Mean next-token loss of final hidden states (final norm + LM head, with the family's logit scaling).

    Memory: the LM head (vocabulary x hidden, the largest matrix of a small model) stays in its stored dtype and is
    cast to float32 one slice of the vocabulary at a time; the loss is accumulated with a running log-sum-exp, so
    the numbers are those of a float32 head without ever holding one (or a whole vocabulary of logits)."""
    softcap = getattr(text_config, "final_logit_softcapping", None)
    logits_scaling = getattr(text_config, "logits_scaling", None)
    states = [final_norm(hidden_states).float()[:, :-1] for hidden_states in hidden_batches]
    targets = [tokens[:, 1:] for tokens in token_batches]
    log_normalisers = [torch.full(target.shape, -math.inf) for target in targets]
    target_logits = [torch.zeros(target.shape) for target in targets]
    for start in range(0, head_weight.shape[0], LM_HEAD_SLICE):
        weight_slice = head_weight[start : start + LM_HEAD_SLICE].float()
        for state, target, log_normaliser, target_logit in zip(states, targets, log_normalisers, target_logits):
            logits = state @ weight_slice.T  # [batch, seq - 1, slice]
            if head_bias is not None:
                logits = logits + head_bias[start : start + weight_slice.shape[0]]
            if logits_scaling:
                logits = logits / logits_scaling
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            torch.logaddexp(log_normaliser, logits.logsumexp(-1), out=log_normaliser)
            in_slice = (target >= start) & (target < start + weight_slice.shape[0])
            target_logit[in_slice] = logits[in_slice].gather(-1, (target[in_slice] - start).unsqueeze(-1)).squeeze(-1)
    total = sum((log_normaliser - target_logit).sum().item() for log_normaliser, target_logit in zip(log_normalisers, target_logits))
    count = sum(target.numel() for target in targets)
    return total / max(count, 1)


# --- the calibration run ------------------------------------------------------------------------------------


@torch.no_grad()
def calibrate_folder(folder: Path, settings: CalibrationSettings, shared_heads: int | str = "auto") -> dict:
    """Calibrate the MoH model in `folder` in place (the caller provides a staging copy). Returns the report."""
    from transformers import AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    started = time.perf_counter()
    return_large_blocks_to_the_os()
    config = MoHConfig.from_pretrained(folder)
    text_config = config.text_config
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calibration_windows, heldout_windows = load_calibration_windows(settings, tokenizer, folder)
    batch_size = settings.calibration_batch_size
    calibration_tokens = list(calibration_windows.split(batch_size))
    heldout_tokens = list(heldout_windows.split(batch_size)) if heldout_windows.numel() else []

    # The source model as a meta-device skeleton: only what is in use is ever materialised.
    source_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)]
    text_config._attn_implementation = "sdpa" if source_class._supports_sdpa else "eager"
    with torch.device("meta"):
        model = source_class(text_config)
    model.eval()
    weights = ShardedWeights(folder)
    decoder = model.model
    # Memory: the embeddings are only needed to start the streams and the LM head only for held-out perplexity at
    # the end, so neither is in memory while the decoder layers are calibrated one at a time.
    for name, child in decoder.named_children():
        if name != "layers":
            weights.load_into(child, f"model.{name}", model._init_weights)

    # Every layer's inputs for every batch: hidden states of layer 0 plus masks / position embeddings.
    real_layers = list(decoder.layers)
    streams = {"calibration": calibration_tokens, "heldout": heldout_tokens}
    layer_kwargs, hidden = {}, {}
    for stream, token_batches in streams.items():
        records_per_layer = [[] for _ in real_layers]
        decoder.layers = torch.nn.ModuleList(
            LayerInputRecorder(layer, records) for layer, records in zip(real_layers, records_per_layer)
        )
        for tokens in token_batches:
            decoder(input_ids=tokens, use_cache=False)
        layer_kwargs[stream] = [[kwargs for _, kwargs in records] for records in records_per_layer]
        hidden[stream] = [hidden_states.float() for hidden_states, _ in records_per_layer[0]]
    decoder.layers = torch.nn.ModuleList(real_layers)
    decoder.embed_tokens.to("meta")
    # Held-out text flows through three versions of each layer: dense, as converted, and calibrated.
    heldout = {"dense": hidden["heldout"], "before": hidden["heldout"], "after": hidden["heldout"]}

    calibrated = MoHConfig.from_dict(config.to_dict())
    calibrated.router, calibrated.gate_mode, calibrated.router_bias, calibrated.head_fallback = "learned", "binary", True, True
    calibrated.shared_heads = [list(heads) for heads in config.shared_heads]
    calibrated.routed_top_k = [config.layer_top_k(i) for i in range(config.num_layers)]
    router_state, layer_reports = {}, []
    # Refitted o_proj weights wait on disk (one small file per layer, inside the staging folder) until they are
    # written over the originals in their shards at the end: kept in memory they would add up to a whole matrix
    # per layer. Not for self-sampled text: fitted to the model's own samples, the refit measured worse on real text.
    refit = settings.refit_output_projection and settings.calibration_data != "self"
    refit_dir = folder / ".moh-refitted-o_proj"
    output_projections = {}  # tensor name -> file holding it

    for layer_idx in tqdm(range(config.num_layers), desc="Calibrating layers"):
        layer = real_layers[layer_idx]
        weights.load_into(layer, f"model.layers.{layer_idx}", model._init_weights)
        attention = layer.self_attn
        active = config.active_heads(layer_idx)
        kwargs_calibration = layer_kwargs["calibration"][layer_idx]
        kwargs_heldout = layer_kwargs["heldout"][layer_idx]

        if heldout_tokens:
            heldout["dense"] = run_layer(layer, heldout["dense"], kwargs_heldout)
            attach_head_routing(attention, config, layer_idx)
            if config.router == "learned" or config.head_fallback:
                attention.moh.load_state_dict(
                    {name: weights.get(f"model.layers.{layer_idx}.self_attn.moh.{name}") for name in attention.moh.state_dict()}
                )
            heldout["before"] = run_layer(layer, heldout["before"], kwargs_heldout)
            detach_head_routing(attention)

        inputs, outputs = head_outputs_and_inputs(layer, attention, hidden["calibration"], kwargs_calibration)
        num_heads = config.num_heads
        head_means = outputs.view(outputs.shape[0], num_heads, -1).mean(0)
        if settings.head_fallback == "zero":  # importance is then the plain output norm ||h_i W_O^i||
            head_means = torch.zeros_like(head_means)
        importance = head_importance(outputs, head_means, attention.o_proj.weight)
        # The last fifth of the tokens (at most CHECK_TOKENS) judges candidate splits.
        num_check = min(CHECK_TOKENS, importance.shape[0] // 5)
        deviation_check = outputs[-num_check:].view(num_check, num_heads, -1) - head_means
        fixed_shared = None if shared_heads == "auto" else shared_heads
        split = choose_head_split(inputs, importance, deviation_check, attention.o_proj.weight, active, fixed_shared)
        del deviation_check
        shared, routed, top_k, frequency = split["shared"], split["routed"], split["top_k"], split["frequency"]
        router_weight, router_bias = split["weight"], split["bias"]
        calibrated.shared_heads[layer_idx], calibrated.routed_top_k[layer_idx] = shared, top_k

        scores = inputs @ router_weight.T + router_bias
        router_pick = top_k_mask(scores, top_k)
        oracle_pick = top_k_mask(importance[:, routed], top_k)
        agreement = (router_pick * oracle_pick).sum(1).mean().item() / top_k if top_k else 1.0

        # A skipped head outputs its mean over the tokens that skip it.
        per_head = outputs.view(outputs.shape[0], num_heads, -1)
        fallback = head_means.clone()
        skipped = 1.0 - router_pick
        skipped_count = skipped.sum(0)
        for position, head in enumerate(routed):
            if skipped_count[position] > 0 and settings.head_fallback == "mean":
                fallback[head] = (per_head[:, head] * skipped[:, position : position + 1]).sum(0) / skipped_count[position]
        del inputs, scores  # the router is fitted: free them before the refit's matrices
        if refit and active < num_heads:
            # o_proj's input as the calibrated layer will see it: kept heads' outputs, fallbacks for skipped ones.
            gates = torch.ones(per_head.shape[0], num_heads)
            gates[:, routed] = router_pick
            seen = per_head * gates.unsqueeze(-1) + (1.0 - gates).unsqueeze(-1) * fallback
            refitted = refit_output_projection(seen.flatten(1), outputs, attention.o_proj.weight, OUTPUT_RIDGE)
            attention.o_proj.weight.copy_(refitted)
            name = f"model.layers.{layer_idx}.self_attn.o_proj.weight"
            refit_dir.mkdir(exist_ok=True)
            output_projections[name] = refit_dir / f"{layer_idx}.safetensors"
            save_file({name: refitted.to(_weights_dtype(text_config))}, output_projections[name])
            del seen, gates
        del outputs, importance, per_head

        routing = attach_head_routing(attention, calibrated, layer_idx)
        routing.router.routed_proj.weight.copy_(router_weight)
        routing.router.routed_proj.bias.copy_(router_bias)
        routing.head_fallback.copy_(fallback)
        hidden["calibration"] = run_layer(layer, hidden["calibration"], kwargs_calibration)
        if heldout_tokens:
            heldout["after"] = run_layer(layer, heldout["after"], kwargs_heldout)
        dtype = _weights_dtype(text_config)
        for name, tensor in routing.state_dict().items():
            router_state[f"model.layers.{layer_idx}.self_attn.moh.{name}"] = tensor.to(dtype).clone()
        detach_head_routing(attention)
        layer.to("meta")  # free this layer's weights before the next one is read
        release_freed_memory()
        layer_reports.append({
            "layer": layer_idx, "shared_heads": shared, "routed_top_k": top_k,
            "router_agreement": round(agreement, 4),
            "oracle_keep_frequency": [round(value, 4) for value in frequency.tolist()],
        })

    perplexity = {}
    if heldout_tokens:
        tied = getattr(text_config, "tie_word_embeddings", False) or "lm_head.weight" not in weights.weight_map
        head_weight = weights.get("model.embed_tokens.weight" if tied else "lm_head.weight")
        head_bias = weights.get("lm_head.bias").float() if "lm_head.bias" in weights.weight_map else None
        perplexity = {
            name: round(math.exp(stream_loss(decoder.norm, head_weight, head_bias, states, heldout_tokens, text_config)), 3)
            for name, states in heldout.items()
        }
        del head_weight
    report = {
        "method": f"sequential per-layer: importance ||(h_i - f_i) W_O^i|| with {settings.head_fallback} fallback f; shared heads by oracle keep frequency, "
                  "their number chosen by held-back reconstruction error; ridge linear router on the attention "
                  "input" + ("; o_proj refitted by least squares to the dense output" if settings.refit_output_projection else ""),
        "output_projection_refit": bool(output_projections),
        "calibration_data": settings.calibration_data,
        "self_sampling": (
            {"temperature": SELF_SAMPLING_TEMPERATURE, "top_p": SELF_SAMPLING_TOP_P, "start": "BOS token"}
            if settings.calibration_data == "self" else None
        ),
        "calibration_tokens": int(calibration_windows.numel()),
        "heldout_tokens": int(heldout_windows.numel()),
        "seq_len": settings.calibration_seq_len,
        "seed": settings.seed,
        "active_heads": [config.active_heads(i) for i in range(config.num_layers)],
        "num_heads": config.num_heads,
        "heldout_perplexity": perplexity,
        "mean_router_agreement": round(sum(r["router_agreement"] for r in layer_reports) / len(layer_reports), 4),
        "wall_time_s": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "layers": layer_reports,
    }
    write_calibrated_files(folder, calibrated, router_state, report)
    if output_projections:
        replace_tensors_in_shards(folder, ShardedWeights(folder).weight_map, output_projections)
    shutil.rmtree(refit_dir, ignore_errors=True)
    return report


def _weights_dtype(text_config) -> torch.dtype:
    dtype = getattr(text_config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def write_calibrated_files(folder: Path, config: MoHConfig, router_state: dict, report: dict) -> None:
    """Replace the router shard, index, config, report and model card section. Files are unlinked before being
    rewritten: a staging copy may hard-link them to the original model."""
    from safetensors.torch import save_file

    from .convert import ROUTER_SHARD, safetensors_data_size

    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
    else:  # single-file model: it becomes shard 1 of an indexed checkpoint next to the router shard
        weight_map = {name: "model-00001-of-00001.safetensors" for name in ShardedWeights(folder).weight_map}
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    weight_map = {name: file for name, file in weight_map.items() if ".self_attn.moh." not in name}
    for path in (folder / ROUTER_SHARD, index_path, folder / "config.json", folder / REPORT_NAME):
        path.unlink(missing_ok=True)
    save_file(router_state, folder / ROUTER_SHARD, metadata={"format": "pt"})
    weight_map.update({name: ROUTER_SHARD for name in router_state})
    total_size = sum(safetensors_data_size(folder / name) for name in set(weight_map.values()))
    index_path.write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    config.save_pretrained(folder)
    (folder / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    card = folder / "README.md"
    if card.exists():
        text = card.read_text()
        card.unlink()
        card.write_text(insert_card_section(text, calibration_card_section(report)))


def _glibc():
    """The C library when it is glibc (malloc tuning below), else None (macOS, Windows, musl: nothing to tune)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def return_large_blocks_to_the_os() -> None:
    """Serve every allocation of 1 MB or more from its own memory map (glibc's M_MMAP_THRESHOLD), which goes back
    to the OS when the tensor is freed. By default glibc raises that threshold to the largest block freed so far
    (up to 32 MB), after which a layer's activations come from the heap and its freed space stays with the process
    (see the 1.1B memory figure in BENCHMARKS.md). Process-wide; allocations under 1 MB are unaffected."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, 1 << 20)  # -3 = M_MMAP_THRESHOLD


def release_freed_memory() -> None:
    """Give memory freed by the last layer back to the OS. glibc keeps freed blocks below its (adaptive) mmap
    threshold in the heap, and a layer's tensors of varying sizes then make the heap grow layer after layer."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def replace_tensors_in_shards(folder: Path, weight_map: dict[str, str], tensors: dict[str, Path]) -> None:
    """Overwrite the values of existing tensors in their safetensors shards, keeping names, dtypes and shapes (so
    headers, offsets and the index stay valid). Each touched shard is rewritten as a new file: a staging copy may
    hard-link it to the original model, which must not change. `tensors` maps each name to a safetensors file
    holding its new value, already in the stored dtype."""
    from safetensors import safe_open

    from .safetensors_stream import read_safetensors_header

    by_shard: dict[str, list[str]] = {}
    for name in tensors:
        by_shard.setdefault(weight_map[name], []).append(name)
    for shard, names in by_shard.items():
        path = folder / shard
        data_start, header = read_safetensors_header(path)
        replacement = path.with_name(path.name + ".new")
        shutil.copyfile(path, replacement)
        with open(replacement, "r+b") as handle:
            for name in names:
                begin, end = header[name]["data_offsets"]
                with safe_open(tensors[name], framework="pt") as stored:
                    data = stored.get_tensor(name).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                if len(data) != end - begin:
                    raise ValueError(f"{name}: {len(data)} bytes do not fit the {end - begin} stored in {shard}")
                handle.seek(data_start + begin)
                handle.write(data)
        path.unlink()
        replacement.rename(path)


def calibration_card_section(report: dict) -> str:
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


def insert_card_section(card: str, section: str) -> str:
    """Put `section` before '## Usage' (replacing an earlier '## Calibration' section)."""
    if "## Calibration\n" in card:
        start = card.index("## Calibration\n")
        end = card.find("\n## ", start + 1)
        card = card[:start] + (card[end + 1 :] if end != -1 else "")
    marker = "## Usage"
    if marker in card:
        position = card.index(marker)
        return card[:position] + section + "\n" + card[position:]
    return card.rstrip("\n") + "\n\n" + section


# --- public API ---------------------------------------------------------------------------------------------


def calibrate(model: str | os.PathLike, **options) -> Path:
    """Calibrate an already converted MoH model folder (in place, or into `output`). Returns the folder."""
    from .convert import move_into_place

    opts = validate_options(CalibrateOptions, options)
    if opts.calibration_data is None:
        raise MoHError("calibrate needs --calibration-data (a .txt/.jsonl file, a Hub dataset name, or 'self')")
    model = Path(model).expanduser().resolve()
    if not (model / "config.json").is_file():
        raise MoHError(f"{model} is not a model folder (no config.json); convert a model first with `moh convert`")
    if json.loads((model / "config.json").read_text()).get("model_type") != "moh":
        raise MoHError(f"{model} is not a MoH model; convert it first with `moh convert`")
    earlier_report = model / REPORT_NAME
    if earlier_report.is_file() and json.loads(earlier_report.read_text()).get("output_projection_refit"):
        raise MoHError(
            f"{model} was calibrated with refitted output projections, so its attention is no longer the source "
            "model's; calibrate again from the source: `moh convert SOURCE OUTPUT --calibration-data ...`"
        )
    output = Path(opts.output).expanduser().resolve() if opts.output else model
    if opts.output and output.exists() and not opts.overwrite:
        raise MoHError(f"output {output} already exists; pass --overwrite to replace it")
    work_dir = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        staging = work_dir / output.name
        # Hard links: the source weights are never rewritten, so the copy costs no disk space or time.
        shutil.copytree(model, staging, copy_function=_link_or_copy)
        settings = CalibrationSettings(**opts.model_dump(include=set(CalibrationSettings.model_fields)))
        report = calibrate_folder(staging, settings, opts.shared_heads)
        move_into_place(staging, output)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print_report(report)
    return output


def _link_or_copy(source, destination):
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def print_report(report: dict) -> None:
    ppl = report["heldout_perplexity"]
    if ppl:
        print(
            f"held-out perplexity: dense {ppl['dense']:.2f}, before {ppl['before']:.2f}, calibrated {ppl['after']:.2f} "
            f"({ppl['after'] / ppl['dense']:.3f}x dense); router agreement {report['mean_router_agreement']:.0%}; "
            f"{report['wall_time_s']:.0f} s, peak RSS {report['peak_rss_mb']:.0f} MB"
        )


def register_cli(commands) -> None:
    from .options import add_options_to_parser, options_from_args

    parser = commands.add_parser(
        "calibrate",
        help="fit routers and shared heads of a converted model on a little text",
        description="Choose each layer's shared heads from measured head importance and fit a linear router per "
        "layer, one decoder layer at a time (peak memory: about one layer plus activations). Updates MODEL in "
        "place unless --output is given. Writes calibration_report.json and a model card section.",
    )
    parser.add_argument("model", metavar="MODEL", help="a MoH model folder written by `moh convert`")
    add_options_to_parser(parser, CalibrateOptions)

    def run(args):
        calibrate(args.model, **options_from_args(args, CalibrateOptions))

    parser.set_defaults(handler=run)
