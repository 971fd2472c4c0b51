# Mixture-of-Head (MoH) attention around an unchanged source decoder architecture.
#
# This file is copied into every converted model folder next to `configuration_moh.py` and imports only torch
# and transformers, so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works anywhere.
#
# How it works. Multi-head attention ends in o_proj(concat_i H_i); MoH weights each head's output per token:
# o_proj(concat_i g_i(x_t) H_i), with g_i = 0 for heads the token did not select (MOH paper, eq. 3). So the
# source model is built as it is (same classes, same tensor names) and each attention block gets:
#   * `self_attn.router`: scores the routed heads of every token (from the block input or from the queries);
#   * a forward pre-hook on `o_proj` that multiplies each head's slice of o_proj's input by its gate.
# Gating happens after the attention kernel, so eager, sdpa and flash attention all keep working.
import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .configuration_moh import MoHConfig


class QueryNormRouter(nn.Module):
    """The paper's parameter-free router for converted models: the score of a routed head is the L2 norm of its
    query vector, divided by the standard deviation across routed heads, then softmax."""

    uses_query = True

    def __init__(self, config: MoHConfig, layer_idx: int, hidden_size: int):
        super().__init__()
        self.num_routed = len(config.routed_heads(layer_idx))

    def forward(self, hidden_states: torch.Tensor, routed_queries: torch.Tensor) -> torch.Tensor:
        # routed_queries: [batch, seq, num_routed, head_dim] -> probabilities [batch, seq, num_routed]
        norms = routed_queries.float().norm(dim=-1)
        if self.num_routed > 1:
            norms = norms / norms.std(dim=-1, keepdim=True).clamp_min(1e-6)
        return norms.softmax(dim=-1)


class RouterProjection(nn.Linear):
    """A linear layer of a learned router. Zero-initialised: an untrained router routes uniformly."""


class LearnedRouter(nn.Module):
    """A linear router on the attention block's input (the paper's W_r). For `two-stage` gates it also has the
    shared-head weights W_s and the shared/routed balance W_h. Zero-initialised, so an untrained router routes
    uniformly and two-stage gates start at exactly the dense scale."""

    uses_query = False

    def __init__(self, config: MoHConfig, layer_idx: int, hidden_size: int):
        super().__init__()
        num_shared = len(config.shared_heads[layer_idx])
        num_routed = len(config.routed_heads(layer_idx))
        self.routed_proj = RouterProjection(hidden_size, num_routed, bias=config.router_bias)
        if config.gate_mode == "two-stage":
            self.shared_proj = RouterProjection(hidden_size, num_shared, bias=config.router_bias)
            self.stage_proj = RouterProjection(hidden_size, 2, bias=config.router_bias)

    def forward(self, hidden_states: torch.Tensor, routed_queries: torch.Tensor | None = None) -> torch.Tensor:
        return self.routed_proj(hidden_states).float().softmax(dim=-1)


ROUTER_CLASSES = {"query-norm": QueryNormRouter, "learned": LearnedRouter}


class MoHHeadRouting(nn.Module):
    """Everything MoH adds to one attention block. Registered as `self_attn.moh` (its tensors are stored as
    `...self_attn.moh.router.*`). It turns router probabilities into per-head gates [batch, seq, num_heads]."""

    def __init__(self, config: MoHConfig, layer_idx: int, hidden_size: int, head_dim: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.shared_heads = list(config.shared_heads[layer_idx])
        self.routed_heads = config.routed_heads(layer_idx)
        self.routed_top_k = config.layer_top_k(layer_idx)
        self.gate_mode = config.gate_mode
        self.router = ROUTER_CLASSES[config.router](config, layer_idx, hidden_size)
        # What an unselected head outputs instead of its attention result (zeros unless calibrated).
        self.head_fallback = nn.Parameter(torch.zeros(self.num_heads, head_dim)) if config.head_fallback else None
        # Every head on with binary gates is exactly the dense model: skip routing altogether.
        self.is_dense = self.gate_mode == "binary" and self.routed_top_k == len(self.routed_heads)
        # When True (set by training and analysis code), the last routing is kept for losses and statistics.
        self.record_routing = False
        self.last_router_probs: torch.Tensor | None = None  # [batch, seq, num_routed]
        self.last_routed_mask: torch.Tensor | None = None  # [batch, seq, num_routed], 1 where selected
        # Filled by hooks during one attention forward, consumed by the o_proj pre-hook.
        self.pending_hidden_states: torch.Tensor | None = None
        self.pending_queries: torch.Tensor | None = None
        self._index_cache: dict = {}

    def _head_index(self, which: str, device: torch.device) -> torch.Tensor:
        key = (which, device)
        if key not in self._index_cache:
            heads = self.shared_heads if which == "shared" else self.routed_heads
            self._index_cache[key] = torch.tensor(heads, dtype=torch.long, device=device)
        return self._index_cache[key]

    def head_gates(self, hidden_states: torch.Tensor, queries: torch.Tensor | None) -> torch.Tensor:
        """hidden_states: attention block input [batch, seq, hidden]; queries: [batch, seq, num_heads, head_dim]
        (only for routers that use them). Returns gates [batch, seq, num_heads] in float32."""
        routed_index = self._head_index("routed", hidden_states.device)
        shared_index = self._head_index("shared", hidden_states.device)
        routed_queries = queries.index_select(2, routed_index) if queries is not None else None
        probs = self.router(hidden_states, routed_queries)  # [batch, seq, num_routed]

        top_k_index = probs.topk(self.routed_top_k, dim=-1).indices
        routed_mask = torch.zeros_like(probs).scatter_(-1, top_k_index, 1.0)

        if self.gate_mode == "binary":
            # Straight-through estimator: forward value is the 0/1 mask, gradient is the soft score's.
            routed_gates = routed_mask + probs - probs.detach() if self.training else routed_mask
            shared_gates = probs.new_ones(*probs.shape[:-1], len(self.shared_heads))
        elif self.gate_mode == "softmax":
            routed_gates = routed_mask * probs
            shared_gates = probs.new_ones(*probs.shape[:-1], len(self.shared_heads))
        else:  # two-stage, rescaled so that uniform routing gives gates of 1 (dense output scale)
            stage = self.router.stage_proj(hidden_states).float().softmax(dim=-1) * 2.0
            selected = routed_mask * probs
            routed_gates = selected / selected.sum(-1, keepdim=True).clamp_min(1e-9) * self.routed_top_k
            routed_gates = routed_gates * stage[..., 1:2]
            shared_probs = self.router.shared_proj(hidden_states).float().softmax(dim=-1)
            shared_gates = shared_probs * len(self.shared_heads) * stage[..., 0:1]

        if self.record_routing or self.training:
            self.last_router_probs = probs
            self.last_routed_mask = routed_mask
        gates = probs.new_zeros(*probs.shape[:-1], self.num_heads)
        gates = gates.index_copy(-1, routed_index, routed_gates)
        gates = gates.index_copy(-1, shared_index, shared_gates)
        return gates, routed_mask

    def gate_attention_output(self, attn_output: torch.Tensor) -> torch.Tensor:
        """attn_output: o_proj's input [batch, seq, num_heads * head_dim]; returns it with each head scaled."""
        hidden_states, queries = self.pending_hidden_states, self.pending_queries
        self.pending_hidden_states = self.pending_queries = None
        if self.is_dense and not self.record_routing:
            return attn_output
        batch, seq = attn_output.shape[:2]
        per_head = attn_output.view(batch, seq, self.num_heads, -1)
        if queries is not None:
            queries = queries.view(batch, seq, self.num_heads, -1)
        gates, routed_mask = self.head_gates(hidden_states, queries)
        if self.is_dense:  # recording statistics only: leave the output bit-exact
            return attn_output
        gated = per_head * gates.unsqueeze(-1).to(per_head.dtype)
        if self.head_fallback is not None:
            # Routed heads the token skipped output their stored mean instead of zero.
            skipped = (1.0 - routed_mask).to(per_head.dtype).unsqueeze(-1)
            routed_index = self._head_index("routed", per_head.device)
            fallback = skipped * self.head_fallback.index_select(0, routed_index).to(per_head.dtype)
            gated = gated.index_add(2, routed_index, fallback)
        return gated.view_as(attn_output)


def _query_projection(attention: nn.Module) -> tuple[nn.Module, bool]:
    """The module whose output holds the queries, and whether it is a fused qkv projection (phi3)."""
    if hasattr(attention, "q_proj"):
        return attention.q_proj, False
    if hasattr(attention, "qkv_proj"):
        return attention.qkv_proj, True
    raise ValueError(f"{type(attention).__name__} has neither q_proj nor qkv_proj; MoH cannot route its heads")


def attach_head_routing(attention: nn.Module, config: MoHConfig, layer_idx: int) -> MoHHeadRouting:
    """Give one source attention block its MoH routing: a `moh` submodule and three hooks that feed it."""
    if not hasattr(attention, "o_proj"):
        raise ValueError(f"{type(attention).__name__} has no o_proj; MoH gates heads just before it")
    hidden_size = attention.o_proj.out_features
    head_dim = attention.o_proj.in_features // config.num_heads
    routing = MoHHeadRouting(config, layer_idx, hidden_size, head_dim)
    attention.moh = routing
    handles = []

    def keep_block_input(module, args, kwargs):
        routing.pending_hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    handles.append(attention.register_forward_pre_hook(keep_block_input, with_kwargs=True))

    if routing.router.uses_query:
        query_projection, fused_qkv = _query_projection(attention)
        query_width = config.num_heads * (attention.o_proj.in_features // config.num_heads)

        def keep_queries(module, args, output):
            # Pre-norm, pre-rotary queries: q_norm (qwen3, gemma3, olmo2) would flatten the norms the router reads.
            routing.pending_queries = output[..., :query_width] if fused_qkv else output

        handles.append(query_projection.register_forward_hook(keep_queries))

    def gate_heads(module, args):
        return (routing.gate_attention_output(args[0]),) + tuple(args[1:])

    handles.append(attention.o_proj.register_forward_pre_hook(gate_heads))
    routing.hook_handles = handles
    return routing


def detach_head_routing(attention: nn.Module) -> None:
    """Undo `attach_head_routing`: the block is the source model's again (used by calibration)."""
    for handle in attention.moh.hook_handles:
        handle.remove()
    del attention.moh


class MoHPreTrainedModel(PreTrainedModel):
    config_class = MoHConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class MoHForCausalLM(MoHPreTrainedModel, GenerationMixin):
    """A source causal LM (built from `config.text_config` with its own class) whose attention heads are routed.
    Its submodules are the source model's own (`model`, `lm_head`), so tensor names are the source's."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoHConfig):
        super().__init__(config)
        source_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config.text_config)]
        source_model = source_class(config.text_config)
        # Adopt the source model's children so names stay `model.layers.0.self_attn.q_proj.weight`, ...; keep the
        # source wrapper unregistered (it owns no tensors of its own) to reuse its forward and generation logic.
        for name, child in source_model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "source_model", source_model)
        # The source class may have changed the requested attention (e.g. gemma2 defaults to eager): agree with it.
        config._attn_implementation = source_model.config._attn_implementation
        self._no_split_modules = source_model._no_split_modules
        self.head_routing = [
            attach_head_routing(layer.self_attn, config, layer_idx) for layer_idx, layer in enumerate(self.model.layers)
        ]
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, RouterProjection):
            for parameter in module.parameters(recurse=False):
                init.zeros_(parameter)
        elif isinstance(module, MoHHeadRouting):
            if module.head_fallback is not None:
                init.zeros_(module.head_fallback)
        elif not isinstance(module, (QueryNormRouter, LearnedRouter, MoHForCausalLM)):
            self.source_model._init_weights(module)

    def train(self, mode: bool = True):
        super().train(mode)
        self.source_model.training = mode
        return self

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings
        self.source_model.lm_head = new_embeddings

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self.source_model.prepare_inputs_for_generation(*args, **kwargs)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        outputs = self.source_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        return outputs


__all__ = ["MoHConfig", "MoHForCausalLM", "MoHPreTrainedModel"]
