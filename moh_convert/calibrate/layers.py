"""Running a causal LM one decoder layer at a time: the inputs each layer receives (hidden states plus the masks
and position embeddings the model computes for it), a layer's attention inputs and per-head outputs, and the loss
of the final hidden states. Tensors in, tensors out: reading and writing weights is left to the caller."""
import math

import torch

LM_HEAD_SLICE = 4096  # vocabulary rows of the LM head cast to float32 at a time for the held-out loss


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


def record_layer_inputs(
    decoder, token_batches, dtype: torch.dtype = torch.float32
) -> tuple[list[list[dict]], list[torch.Tensor]]:
    """Run the decoder's own forward on each batch of tokens with recorders in place of its layers. Returns every
    layer's keyword arguments [layer][batch] and the first layer's hidden states [batch] (in `dtype`, on the
    tokens' device); only the modules around the layers (embeddings, rotary embedding, final norm) need weights."""
    real_layers = list(decoder.layers)
    records_per_layer = [[] for _ in real_layers]
    decoder.layers = torch.nn.ModuleList(
        LayerInputRecorder(layer, records) for layer, records in zip(real_layers, records_per_layer)
    )
    try:
        for tokens in token_batches:
            decoder(input_ids=tokens, use_cache=False)
    finally:
        decoder.layers = torch.nn.ModuleList(real_layers)
    kwargs_per_layer = [[kwargs for _, kwargs in records] for records in records_per_layer]
    return kwargs_per_layer, [hidden_states.to(dtype) for hidden_states, _ in records_per_layer[0]]


class _StopLayer(Exception):
    """Raised once a layer's attention output is captured: the rest of the layer is not needed then."""


def head_outputs_and_inputs(layer, attention, hidden_batches, kwargs_batches) -> tuple[torch.Tensor, torch.Tensor]:
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


def run_layer(layer, hidden_batches, kwargs_batches) -> list[torch.Tensor]:
    return [layer(hidden_states, **kwargs) for hidden_states, kwargs in zip(hidden_batches, kwargs_batches)]


def stream_loss(
    final_norm, head_weight, head_bias, hidden_batches, token_batches, text_config, per_window: bool = False,
) -> float | tuple[float, torch.Tensor]:
    """Mean next-token loss of final hidden states (final norm + LM head, with the family's logit scaling); with
    `per_window`, also each window's own mean loss (float64 [windows], in the order of the batches' rows), so that
    the loss of a subset of windows (one calibration source's) can be taken.

    Memory: the LM head (vocabulary x hidden, the largest matrix of a small model) stays in its stored dtype and is
    cast to float32 one slice of the vocabulary at a time; the loss is accumulated with a running log-sum-exp, so
    the numbers are those of a float32 head without ever holding one (or a whole vocabulary of logits).
    Computed on the device of the hidden states (the head slices are moved there); `per_window` losses on the CPU."""
    softcap = getattr(text_config, "final_logit_softcapping", None)
    logits_scaling = getattr(text_config, "logits_scaling", None)
    states = [final_norm(hidden_states).float()[:, :-1] for hidden_states in hidden_batches]
    device = states[0].device if states else torch.device("cpu")
    targets = [tokens[:, 1:].to(device) for tokens in token_batches]
    log_normalisers = [torch.full(target.shape, -math.inf, device=device) for target in targets]
    target_logits = [torch.zeros(target.shape, device=device) for target in targets]
    for start in range(0, head_weight.shape[0], LM_HEAD_SLICE):
        weight_slice = head_weight[start : start + LM_HEAD_SLICE].to(device).float()
        for state, target, log_normaliser, target_logit in zip(states, targets, log_normalisers, target_logits):
            logits = state @ weight_slice.T  # [batch, seq - 1, slice]
            if head_bias is not None:
                logits = logits + head_bias[start : start + weight_slice.shape[0]].to(device)
            if logits_scaling:
                logits = logits / logits_scaling
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            torch.logaddexp(log_normaliser, logits.logsumexp(-1), out=log_normaliser)
            in_slice = (target >= start) & (target < start + weight_slice.shape[0])
            target_logit[in_slice] = logits[in_slice].gather(-1, (target[in_slice] - start).unsqueeze(-1)).squeeze(-1)
    losses = [log_normaliser - target_logit for log_normaliser, target_logit in zip(log_normalisers, target_logits)]
    total = sum(loss.sum().item() for loss in losses)
    count = sum(target.numel() for target in targets)
    if not per_window:
        return total / max(count, 1)
    window_losses = torch.cat([loss.double().mean(-1) for loss in losses]).cpu() if losses \
        else torch.zeros(0, dtype=torch.float64)
    return total / max(count, 1), window_losses
