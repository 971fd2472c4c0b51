# Mixture-of-Head (MoH) attention around an unchanged source decoder architecture.
#
# This file is copied into every converted model folder next to `configuration_moh.py` and imports only torch
# and transformers, so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works anywhere.
#
# How it works. Multi-head attention ends in o_proj(concat_i H_i); MoH weights each head's output per token:
# o_proj(concat_i g_i(x_t) H_i), with g_i = 0 for heads the token did not select (MOH paper, eq. 3). So the
# source model is built as it is (same classes, same tensor names) and each attention block gets:
#   * `self_attn.moh` (MoHHeadRouting) owns everything MoH adds to the block, its hooks included (`attach` /
#     `detach`); its `router` scores the routed heads of every token (logits, from the block input or from the
#     queries, which a hook on the block or on q_proj keeps for it);
#   * the gates, applied to the heads' outputs before o_proj, in one of two ways (`config.attention_path`):
#     - "masked": the source attention kernel computes every head; a forward pre-hook on o_proj zeroes unselected
#       heads. Works with every kernel (eager, sdpa, flash attention) and is the reference.
#     - "sparse" (default at inference): the attention kernel is swapped, through transformers' AttentionInterface
#       registry, for `moh_attention_forward`. It routes first, then computes shared heads for all tokens and each
#       routed head only for the tokens that selected it, so scores and values of unselected (token, head) pairs are
#       never computed. Where that cannot work or is not cheaper (training: the straight-through gradient needs every
#       head; decoding one token), it runs the source kernel and gates its output itself, so this path needs no o_proj
#       hook. The family's own forward still does the projections, q/k norms, rotary embeddings and the KV cache, so
#       every supported family works unchanged.
import math
import sys

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface, AttentionMaskInterface, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .configuration_moh import ATTENTION_PATHS, MoHConfig


class QueryNormRouter(nn.Module):
    """The paper's parameter-free router for converted models: the score of a routed head is the L2 norm of its
    query vector, divided by the standard deviation across routed heads (softmax of these logits gives the
    routing probabilities)."""

    uses_query = True

    def __init__(self, config: MoHConfig, layer_idx: int, hidden_size: int):
        super().__init__()
        self.num_routed = len(config.routed_heads(layer_idx))

    def forward(self, hidden_states: torch.Tensor, routed_queries: torch.Tensor) -> torch.Tensor:
        # routed_queries: [batch, seq, num_routed, head_dim] -> float32 logits [batch, seq, num_routed]
        norms = routed_queries.float().norm(dim=-1)
        if self.num_routed > 1:
            norms = norms / norms.std(dim=-1, keepdim=True).clamp_min(1e-6)
        return norms


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
        # float32 logits [batch, seq, num_routed]
        return self.routed_proj(hidden_states).float()


ROUTER_CLASSES = {"query-norm": QueryNormRouter, "learned": LearnedRouter}


class PendingRoutingInputs:
    """What the hooks of one attention forward hand to the kernel and the o_proj pre-hook: the block input (learned
    routers), the queries (query-norm router) and, once the sparse kernel has routed, (gates, routed_mask). A plain
    object rather than attributes of the nn.Module: every tensor assigned to a module attribute goes through
    `nn.Module.__setattr__`'s registry checks, which shows when decoding one token at a time."""

    __slots__ = ("hidden_states", "queries", "routing", "output_columns")

    def __init__(self):
        self.hidden_states: torch.Tensor | None = None
        self.queries: torch.Tensor | None = None
        self.routing: tuple[torch.Tensor, torch.Tensor] | None = None
        # Decoding on the CPU sparse path: the o_proj input columns of the heads the token keeps (see
        # `MoHHeadRouting.project_kept_heads`), set by the attention function, consumed by the o_proj call after it.
        self.output_columns: torch.Tensor | None = None

    def has_inputs(self) -> bool:
        return self.hidden_states is not None or self.queries is not None


class MoHHeadRouting(nn.Module):
    """Everything MoH adds to one attention block. Registered as `self_attn.moh` (its tensors are stored as
    `...self_attn.moh.router.*`). It turns router probabilities into per-head gates [batch, seq, num_heads, 1]
    (the trailing 1 broadcasts over head_dim)."""

    def __init__(self, config: MoHConfig, layer_idx: int, hidden_size: int, head_dim: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.shared_heads = list(config.shared_heads[layer_idx])
        self.routed_heads = config.routed_heads(layer_idx)
        self.routed_top_k = config.layer_top_k(layer_idx)
        self.gate_mode = config.gate_mode
        self.router = ROUTER_CLASSES[config.router](config, layer_idx, hidden_size)
        self.router_uses_query = self.router.uses_query  # a plain attribute: read per token when decoding
        # What an unselected head outputs instead of its attention result (zeros unless calibrated).
        self.head_fallback = nn.Parameter(torch.zeros(self.num_heads, head_dim)) if config.head_fallback else None
        # Every head on with binary gates is exactly the dense model: skip routing altogether.
        self.is_dense = self.gate_mode == "binary" and self.routed_top_k == len(self.routed_heads)
        # No routed head is ever selected (calibration's speed objective shares all active heads of some layers): the
        # layer is a fixed subset of heads, and inference needs no router at all.
        self.is_static = self.gate_mode == "binary" and self.routed_top_k == 0 and len(self.routed_heads) > 0
        # When True (set by training and analysis code), the last routing is kept for losses and statistics.
        self.record_routing = False
        self.last_router_logits: torch.Tensor | None = None  # [batch, seq, num_routed], float32
        self.last_router_probs: torch.Tensor | None = None  # [batch, seq, num_routed]
        self.last_routed_mask: torch.Tensor | None = None  # [batch, seq, num_routed], 1 where selected
        # Filled by hooks during one attention forward, consumed by the o_proj pre-hook.
        self.pending = PendingRoutingInputs()
        self._index_cache: dict = {}
        # Which kernel computes routed heads at prefill (see `sparse_kernel_for`): "auto" picks by device.
        self.sparse_kernel = "auto"
        self._fallback_checked: tuple | None = None  # (parameter, its version, any non-zero): see fallback_in_use
        # Hooks on the attention block this module is attached to (see `attach`): the one that keeps the router's
        # input, and the masked path's o_proj pre-hook (None while the sparse path gates inside its kernel).
        self.input_hook_handle = None
        self.output_gate_handle = None
        self.output_gate_enabled = True
        # The o_proj whose forward is `project_kept_heads` while the sparse path is on (None otherwise), and its weight
        # transposed (built at the first decoded token; see `project_kept_heads`).
        object.__setattr__(self, "output_projection", None)
        self._transposed_output_weight: tuple | None = None

    @classmethod
    def attach_to(cls, attention: nn.Module, config: MoHConfig, layer_idx: int) -> "MoHHeadRouting":
        """A routing module sized for one source attention block (its o_proj gives hidden size and head_dim),
        attached to it."""
        if not hasattr(attention, "o_proj"):
            raise ValueError(f"{type(attention).__name__} has no o_proj; MoH gates heads just before it")
        head_dim = attention.o_proj.in_features // config.num_heads
        routing = cls(config, layer_idx, attention.o_proj.out_features, head_dim)
        routing.attach(attention)
        return routing

    def attach(self, attention: nn.Module) -> None:
        """Become `attention.moh` and install the hooks: one keeps the router's input (the queries from the query
        projection's output, or the block input for learned routers), and on the masked path an o_proj pre-hook
        gates the heads. Attaching again re-registers the hooks on the block's modules as they are now: after peft
        wrapped q_proj/o_proj in LoRA layers, the hooks then see what the wrapper computes (base + LoRA)."""
        self.remove_hooks()
        attention.moh = self
        # A plain attribute, not a submodule: the block owns this module, not the other way round.
        object.__setattr__(self, "attention_block", attention)
        pending = self.pending
        if self.router_uses_query:
            query_projection, fused_qkv = _query_projection(attention)
            query_width = attention.o_proj.in_features

            def keep_queries(module, args, output):
                # Pre-norm, pre-rotary queries: q_norm (qwen3, gemma3, olmo2) would flatten the norms the router reads.
                pending.queries = output[..., :query_width] if fused_qkv else output

            self.input_hook_handle = query_projection.register_forward_hook(keep_queries)
        else:
            # Learned routers read the block input. (The query-norm router does not: one hook fewer per layer.)
            def keep_block_input(module, args, kwargs):
                pending.hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

            self.input_hook_handle = attention.register_forward_pre_hook(keep_block_input, with_kwargs=True)
        self.use_output_gate_hook(self.output_gate_enabled)

    def use_output_gate_hook(self, enabled: bool) -> None:
        """Gate heads with an o_proj pre-hook (the masked path) or not (the sparse path's kernel gates itself; then
        o_proj's forward becomes `project_kept_heads`, which reads only the kept heads' columns when decoding)."""
        self.output_gate_enabled = enabled
        if enabled and self.output_gate_handle is None:
            self.output_gate_handle = self.attention_block.o_proj.register_forward_pre_hook(self._gate_o_proj_input)
        elif not enabled and self.output_gate_handle is not None:
            self.output_gate_handle.remove()
            self.output_gate_handle = None
        output_projection = self.attention_block.o_proj
        if enabled or self.is_dense:
            self._restore_output_projection()
        elif self.output_projection is None and type(output_projection) is nn.Linear:
            # Exactly nn.Linear: a LoRA or quantized wrapper computes more than weight @ input (+ bias).
            output_projection.forward = self.project_kept_heads
            object.__setattr__(self, "output_projection", output_projection)  # not a submodule: the block owns it

    def _restore_output_projection(self) -> None:
        if self.output_projection is not None:
            if self.output_projection.__dict__.get("forward") == self.project_kept_heads:
                del self.output_projection.forward
            object.__setattr__(self, "output_projection", None)
            self._transposed_output_weight = None
        self.pending.output_columns = None

    def _gate_o_proj_input(self, module, args):
        return (self.gate_attention_output(args[0]),) + tuple(args[1:])

    def remove_hooks(self) -> None:
        for name in ("input_hook_handle", "output_gate_handle"):
            handle = getattr(self, name)
            if handle is not None:
                handle.remove()
                setattr(self, name, None)
        self._restore_output_projection()

    def detach(self) -> None:
        """Undo `attach`: the block is the source model's again (used by calibration)."""
        self.remove_hooks()
        del self.attention_block.moh
        object.__delattr__(self, "attention_block")

    def _head_index(self, which: str, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        key = (which, device, dtype)
        if key not in self._index_cache:
            if which == "shared-ones":  # [num_heads, 1]: 1 at shared heads, 0 at routed heads
                ones = torch.zeros(self.num_heads, 1, device=device, dtype=dtype)
                self._index_cache[key] = ones.index_fill_(0, self._head_index("shared", device), 1.0)
            elif which == "shared-exclusion":  # float32 [num_heads, 1]: -inf at shared heads, 0 at routed heads
                exclusion = torch.zeros(self.num_heads, 1, device=device)
                self._index_cache[key] = exclusion.index_fill_(0, self._head_index("shared", device), -math.inf)
            elif which == "zero-offset":  # long [1]: embedding_bag's offsets for one bag
                self._index_cache[key] = torch.zeros(1, dtype=torch.long, device=device)
            elif which == "shared-protection":  # float32 [num_heads]: +inf at shared heads, 0 at routed heads
                protection = torch.zeros(self.num_heads, device=device)
                self._index_cache[key] = protection.index_fill_(0, self._head_index("shared", device), math.inf)
            else:
                heads = self.shared_heads if which == "shared" else self.routed_heads
                self._index_cache[key] = torch.tensor(heads, dtype=torch.long, device=device)
        return self._index_cache[key]

    def _head_rows(self, head_dim: int, device: torch.device) -> torch.Tensor:
        """[num_heads, head_dim] long: row j holds j, so that an embedding lookup turns head ids into a scatter index
        over head_dim."""
        key = ("rows", head_dim, device)
        if key not in self._index_cache:
            heads = list(range(self.num_heads))
            self._index_cache[key] = torch.tensor(heads, device=device).unsqueeze(1).repeat(1, head_dim)
        return self._index_cache[key]

    def head_gates(self, hidden_states: torch.Tensor, queries: torch.Tensor | None) -> torch.Tensor:
        """hidden_states: attention block input [batch, seq, hidden]; queries: [batch, seq, num_heads, head_dim]
        (only for routers that use them). Returns gates [batch, seq, num_heads, 1] (float32, or the model's dtype
        for binary gates at inference) and the routed mask [batch, seq, num_routed] (None from the inference fast
        path: see `routed_part`)."""
        if self.gate_mode == "binary" and not self.training and not self.record_routing:
            return self.binary_gates_for_inference(hidden_states, queries), None
        device = (queries if queries is not None else hidden_states).device
        routed_index = self._head_index("routed", device)
        shared_index = self._head_index("shared", device)
        routed_queries = queries.index_select(2, routed_index) if queries is not None else None
        logits = self.router(hidden_states, routed_queries)  # [batch, seq, num_routed], float32
        probs = logits.softmax(dim=-1)

        top_k_index = probs.topk(self.routed_top_k, dim=-1).indices
        routed_mask = torch.zeros_like(probs).scatter_(-1, top_k_index, 1.0)

        if self.record_routing or self.training:
            self.last_router_logits = logits
            self.last_router_probs = probs
            self.last_routed_mask = routed_mask
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

        gates = probs.new_zeros(*probs.shape[:-1], self.num_heads)
        gates = gates.index_copy(-1, routed_index, routed_gates)
        gates = gates.index_copy(-1, shared_index, shared_gates)
        return gates.unsqueeze(-1), routed_mask

    def binary_gates_for_inference(self, hidden_states: torch.Tensor, queries: torch.Tensor | None) -> torch.Tensor:
        """0/1 gates [batch, seq, num_heads, 1] in the model's dtype, without router probabilities. Which heads win
        depends only on the order of the router's scores, and the router's normalisations (std scaling, softmax)
        keep that order, so the raw scores pick the same top-K with about half the small ops (each costs Python and
        dispatch time on every layer of every decoded token). Training and recording keep `head_gates`' full path
        (they need the probabilities)."""
        if self.router_uses_query:
            # Scores over all heads with the shared ones at -inf: top-K yields head ids directly.
            norms = torch.linalg.vector_norm(queries, dim=-1, keepdim=True, dtype=torch.float32)
            scores = norms + self._head_index("shared-exclusion", queries.device)
            selected_heads = scores.topk(self.routed_top_k, dim=-2).indices  # [batch, seq, top_k, 1]
            dtype = queries.dtype
        else:
            logits = self.router.routed_proj(hidden_states)
            selected = logits.topk(self.routed_top_k, dim=-1).indices
            selected_heads = self._head_index("routed", hidden_states.device).take(selected).unsqueeze(-1)
            dtype = hidden_states.dtype
        shared_ones = self._head_index("shared-ones", selected_heads.device, dtype)
        return shared_ones.expand(*selected_heads.shape[:-2], self.num_heads, 1).scatter(-2, selected_heads, 1.0)

    def routed_part(self, gates: torch.Tensor, routed_mask: torch.Tensor | None) -> torch.Tensor:
        """The routed mask [batch, seq, num_routed]; binary gates at inference hold it in their routed columns."""
        if routed_mask is not None:
            return routed_mask
        return gates.squeeze(-1).index_select(-1, self._head_index("routed", gates.device))

    def route_pending_inputs(self, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Route with the block input and queries the hooks kept during this attention forward."""
        pending = self.pending
        hidden_states, queries = pending.hidden_states, pending.queries
        pending.hidden_states = pending.queries = None
        if queries is not None:
            queries = queries.view(batch, seq, self.num_heads, -1)
        return self.head_gates(hidden_states, queries)

    def can_skip_heads(self, query: torch.Tensor, dropout: float, kwargs: dict) -> bool:
        """Whether the sparse kernel may run for this attention call (else the source kernel computes every head).
        Training needs every head (straight-through gradient); one query token (decoding) is cheapest as one dense
        kernel call over all heads, the masked path; paged caches and attention-weight outputs are the source
        kernel's business."""
        return (
            query.shape[2] > 1  # first: decoding ends here
            and not self.training
            and not self.is_dense
            and dropout == 0.0
            and kwargs.get("cache") is None
            and not kwargs.get("output_attentions", False)
            and self.pending.has_inputs()
        )

    def rows_path_pays(self, q_len: int) -> bool:
        """Whether the CPU rows path can be faster than the dense kernel then gates for a prefill of q_len tokens,
        judged from the layer's numbers alone (before routing): with a routed row costing
        1 + ROWS_PATH_CHUNK_TOKENS / q_len dense rows, the layer's shared heads plus its routed selections must cost
        under 95% of all heads. Static layers always pay (their shared heads are one kernel call). After routing,
        `densely_computed_routed_heads` refines this with the selections this input made."""
        if self.is_static:
            return True
        routed_row_cost = 1.0 + ROWS_PATH_CHUNK_TOKENS / max(q_len, 1)
        return len(self.shared_heads) + routed_row_cost * self.routed_top_k < 0.95 * self.num_heads

    def densely_computed_routed_heads(self, routed_mask: torch.Tensor, q_len: int) -> tuple[int, ...] | None:
        """Which routed heads (positions in `routed_heads`) the rows path should compute for every token with the
        shared heads' kernel call, then zero where unselected; None when the dense kernel for the whole layer is
        cheaper. A routed head that a share f of the tokens selected costs f x (1 + ROWS_PATH_CHUNK_TOKENS / q_len)
        dense rows per token on the rows path and 1 in the dense call: routers select some heads for most tokens
        (calibrated SmolLM2 layers route heads that 85-95% of tokens pick beside ones that 20-40% pick), and those
        are cheaper computed densely. The layer keeps the rows path when its shared heads and the cheaper of the two
        for each routed head cost under 95% of all heads."""
        routed_row_cost = 1.0 + ROWS_PATH_CHUNK_TOKENS / max(q_len, 1)
        shares = routed_mask.reshape(-1, routed_mask.shape[-1]).float().mean(0).tolist()
        costs = [min(1.0, share * routed_row_cost) for share in shares]
        if len(self.shared_heads) + sum(costs) >= 0.95 * self.num_heads:
            return None
        return tuple(j for j, share in enumerate(shares) if share * routed_row_cost >= 1.0)

    def heads_by_key_value_head(
        self, group_size: int, device: torch.device, dense_routed: tuple[int, ...] = ()
    ) -> tuple[tuple | None, list, tuple | None]:
        """Heads computed for every token, as (query heads, their key/value heads: one per query head, or each once
        when those heads are whole GQA groups) or None: the shared heads and the routed heads at positions
        `dense_routed` of `routed_heads`; the other routed heads as [(kv_head, positions among routed, query heads)]:
        routed query heads that read the same key/value head (GQA) are computed together; and the densely computed
        routed heads as (their ids, their columns of the routed mask) or None: the tokens that did not select them
        are zeroed after the dense call."""
        key = ("kv-layout", group_size, device, dense_routed)
        if key not in self._index_cache:
            dense_heads = sorted(self.shared_heads + [self.routed_heads[j] for j in dense_routed])
            kv_of_dense = [head // group_size for head in dense_heads]
            if dense_heads and len({kv_of_dense.count(kv) for kv in kv_of_dense}) == 1:
                # The same number of these heads reads each of their key/value heads (whole GQA groups as in the
                # paper's first half of the heads, or e.g. 2 of each group of 3): each key/value head once, and the
                # kernel's own GQA broadcast (sorted query heads come grouped by key/value head), instead of a
                # copy of a key/value head per query head.
                kv_of_dense = sorted(set(kv_of_dense))
            dense = (
                torch.tensor(dense_heads, device=device), torch.tensor(kv_of_dense, device=device),
            ) if dense_heads else None
            routed = []
            for kv_head in range(self.num_heads // group_size):
                positions = [i for i, head in enumerate(self.routed_heads)
                             if head // group_size == kv_head and i not in dense_routed]
                if positions:
                    routed_heads = [self.routed_heads[i] for i in positions]
                    routed.append((kv_head, torch.tensor(positions, device=device), torch.tensor(routed_heads, device=device)))
            zeroed = (
                torch.tensor([self.routed_heads[j] for j in dense_routed], device=device),
                torch.tensor(dense_routed, device=device),
            ) if dense_routed else None
            self._index_cache[key] = (dense, routed, zeroed)
        return self._index_cache[key]

    def routed_slots(self, num_kv_heads: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """For the Triton kernel's packed layout: [kv_heads, slots] long tensors of the routed heads that read each
        key/value head, as columns of the routed mask (len(routed_heads), one past the last, pads) and as head ids."""
        key = ("kv-slots", num_kv_heads, device)
        if key not in self._index_cache:
            group_size = self.num_heads // num_kv_heads
            by_kv_head = [[j for j, head in enumerate(self.routed_heads) if head // group_size == kv_head]
                          for kv_head in range(num_kv_heads)]
            slots = max(1, max(len(positions) for positions in by_kv_head))
            pad = len(self.routed_heads)
            columns = [positions + [pad] * (slots - len(positions)) for positions in by_kv_head]
            heads = [[self.routed_heads[j] for j in positions] + [0] * (slots - len(positions)) for positions in by_kv_head]
            self._index_cache[key] = (torch.tensor(columns, device=device), torch.tensor(heads, device=device))
        return self._index_cache[key]

    def attention(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        """The attention function of the sparse path (see `moh_attention_forward`), gates included: it returns the
        gated heads, so this path runs without the masked path's o_proj hook. Routes first and computes only the
        selected (token, head) pairs where that is possible and cheaper; elsewhere (decoding, training, ...) the
        source kernel computes every head and the gates are applied to its output."""
        # can_skip_heads first: it is what decoding (every generated token, every layer) stops at.
        skip = self.can_skip_heads(query, dropout, kwargs)
        kernel = sparse_kernel_for(query, attention_mask, kwargs.get("softcap"), self.sparse_kernel) if skip else "dense"
        choose_by_cost = kernel == "rows" and self.sparse_kernel == "auto"
        if choose_by_cost and not self.rows_path_pays(query.shape[2]):
            kernel = "dense"
        if kernel == "dense":
            output, weights = base_attention_function(module)(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
            if self.output_projection is not None and self.projects_kept_heads_only(output):
                # Decoding one token on the CPU: o_proj (next) reads only the kept heads' columns, so the dropped
                # heads' outputs need no zeroing and their share of o_proj's weight is not read.
                self.pending.output_columns = self.kept_head_columns(output.shape[-1])
                return output, weights
            return self.gate_heads(output), weights
        batch, _, q_len, head_dim = query.shape
        scaling = head_dim**-0.5 if scaling is None else scaling
        if self.is_static and not self.fallback_in_use():
            # The shared heads are all there is to compute: no routing, no routed rows.
            self.pending.hidden_states = self.pending.queries = None
            return head_sparse_attention(
                self, query, key, value, attention_mask, scaling, kwargs.get("softcap"), None, kernel
            ), None
        gates, routed_mask = self.route_pending_inputs(batch, q_len)
        routed_mask = self.routed_part(gates, routed_mask)
        dense_routed = ()
        if choose_by_cost and not self.is_static:
            # Now that the tokens have chosen: heads most tokens chose join the shared heads' call, and the whole
            # layer runs dense when that is cheaper for these selections.
            dense_routed = self.densely_computed_routed_heads(routed_mask, q_len)
            if dense_routed is None:
                output, weights = base_attention_function(module)(
                    module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
                )
                return self.gate_head_outputs(output, gates, routed_mask), weights
        output = head_sparse_attention(
            self, query, key, value, attention_mask, scaling, kwargs.get("softcap"), routed_mask, kernel, dense_routed
        )
        # The kernel left unselected (token, head) pairs at zero and binary gates are 1 elsewhere: nothing else to do
        # unless gates are weights or skipped heads output a fallback.
        if self.gate_mode != "binary" or self.fallback_in_use():
            output = self.gate_head_outputs(output, gates, routed_mask)
        return output, None

    def projects_kept_heads_only(self, per_head: torch.Tensor) -> bool:
        """Whether o_proj may compute this attention output [batch, seq, num_heads, head_dim] from the kept heads'
        columns alone (`project_kept_heads`): one token of one sequence (decoding) on the CPU, binary gates at
        inference, no fallback outputs, and the block's o_proj still the plain nn.Linear whose forward is ours."""
        return (
            per_head.shape[0] * per_head.shape[1] == 1
            and per_head.device.type == "cpu"
            and self.gate_mode == "binary"
            and not self.training
            and not self.record_routing
            and not self.is_dense
            and not torch.is_grad_enabled()
            and (self.head_fallback is None or not self.fallback_in_use())
            and self.attention_block.o_proj is self.output_projection
        )

    def kept_head_columns(self, head_dim: int) -> torch.Tensor:
        """The o_proj input columns [kept_heads * head_dim] (long) of the heads one token keeps: its shared heads and
        its top-K routed heads by raw router score (the same heads as the probabilities': see
        `binary_gates_for_inference`). Routes with the inputs the hooks kept during this attention forward."""
        pending = self.pending
        hidden_states, queries = pending.hidden_states, pending.queries
        pending.hidden_states = pending.queries = None
        key = ("columns", head_dim)
        if key not in self._index_cache:
            # [num_heads, head_dim]: row h holds head h's columns of o_proj's input; and the static layers' columns.
            columns = torch.arange(self.num_heads * head_dim).view(self.num_heads, head_dim)
            static = columns.index_select(0, self._head_index("shared", columns.device)).view(-1)
            self._index_cache[key] = (columns, static)
        columns, static_columns = self._index_cache[key]
        if self.is_static:
            return static_columns
        if self.router_uses_query:
            norms = torch.linalg.vector_norm(queries.reshape(self.num_heads, -1), dim=-1, dtype=torch.float32)
            scores = norms + self._head_index("shared-protection", queries.device)
        else:
            weight, bias = self.scores_over_all_heads(hidden_states)
            scores = F.linear(hidden_states.view(-1), weight, bias)
        kept = scores.topk(len(self.shared_heads) + self.routed_top_k).indices  # shared heads score +inf
        return columns.index_select(0, kept).view(-1)

    def project_kept_heads(self, attn_output: torch.Tensor) -> torch.Tensor:
        """o_proj's forward on the sparse path. When decoding on the CPU (`pending.output_columns` set by the
        attention function), the product of the kept heads' columns only: one embedding_bag over the rows of the
        transposed weight (a weighted sum of the rows the token's kept heads select), which reads
        kept / num_heads of the weight where the dense product reads all of it. Decoding is bound by reading
        weights, and o_proj is about a tenth of a LLaMA layer's. Costs one transposed copy of the weight per layer
        (built at the first decoded token; e.g. +7% memory for SmolLM2-135M in float32). Otherwise: the plain
        linear layer."""
        linear = self.output_projection
        columns = self.pending.output_columns
        if columns is None:
            return F.linear(attn_output, linear.weight, linear.bias)
        self.pending.output_columns = None
        weight = linear.weight
        cached = self._transposed_output_weight
        if cached is None or cached[0] is not weight or cached[1] != weight._version or cached[2] != weight.data_ptr():
            cached = self._transposed_output_weight = (weight, weight._version, weight.data_ptr(), weight.t().contiguous())
        offsets = self._head_index("zero-offset", attn_output.device)
        projected = F.embedding_bag(
            columns, cached[3], offsets, mode="sum", per_sample_weights=attn_output.reshape(-1).take(columns)
        )
        if linear.bias is not None:
            projected = projected + linear.bias
        return projected.view(*attn_output.shape[:-1], -1)

    def gate_attention_output(self, attn_output: torch.Tensor) -> torch.Tensor:
        """The masked path's o_proj pre-hook: attn_output is o_proj's input [batch, seq, num_heads * head_dim]."""
        batch, seq = attn_output.shape[:2]
        return self.gate_heads(attn_output.view(batch, seq, self.num_heads, -1)).view_as(attn_output)

    def gate_heads(self, per_head: torch.Tensor) -> torch.Tensor:
        """per_head: every head's attention output [batch, seq, num_heads, head_dim]; returns it gated (routing with
        the inputs the hooks kept during this attention forward)."""
        pending = self.pending
        if self.is_dense and not self.record_routing:
            pending.hidden_states = pending.queries = None
            return per_head
        if self.gate_mode == "binary" and not self.training and not self.record_routing:
            hidden_states, queries = pending.hidden_states, pending.queries
            pending.hidden_states = pending.queries = None
            if queries is not None:
                queries = queries.view(*per_head.shape[:2], self.num_heads, -1)
            return self.drop_unselected_heads(per_head, hidden_states, queries)
        gates, routed_mask = self.route_pending_inputs(*per_head.shape[:2])
        if self.is_dense:  # recording statistics only: leave the output bit-exact
            return per_head
        return self.gate_head_outputs(per_head, gates, routed_mask)

    def drop_unselected_heads(self, per_head: torch.Tensor, hidden_states, queries) -> torch.Tensor:
        """Inference with binary gates over every head's output per_head [batch, seq, num_heads, head_dim]: the
        routed heads a token did not select are overwritten with zero (or their fallback). The losers are the
        lowest raw router scores (query norms with the shared heads at +inf, or learned logits): the router's
        normalisations keep the order, so they are the same heads as the probabilities'. Every tensor op here costs
        ~10 us when decoding one token (cold caches between the weight-bound matrix products), on every layer, so
        this takes four or five of them where building and applying gates takes about ten."""
        # (head_fallback first: most models have none, and this runs on every layer of every decoded token.)
        uses_fallback = self.head_fallback is not None and self.fallback_in_use()
        if self.is_static and not uses_fallback:
            # Every routed head is dropped for every token: no router call.
            routed_index = self._head_index("routed", per_head.device)
            if torch.is_grad_enabled():
                return per_head.index_fill(2, routed_index, 0.0)
            return per_head.index_fill_(2, routed_index, 0.0)
        num_dropped = len(self.routed_heads) - self.routed_top_k
        if self.router_uses_query:
            norms = torch.linalg.vector_norm(queries, dim=-1, dtype=torch.float32)  # [batch, seq, num_heads]
            scores = norms + self._head_index("shared-protection", queries.device)
        else:
            # One product gives scores over every head, +inf at the shared ones: top-K of the lowest are head ids.
            weight, bias = self.scores_over_all_heads(hidden_states)
            scores = F.linear(hidden_states, weight, bias)
        dropped = scores.topk(num_dropped, dim=-1, largest=False).indices  # [batch, seq, num_dropped] head ids
        if uses_fallback:
            # [batch, seq, num_dropped, head_dim]: each dropped head's id along head_dim (scatter's index)
            index = F.embedding(dropped, self._head_rows(per_head.shape[-1], per_head.device))
            replacement = F.embedding(dropped, self.head_fallback).to(per_head.dtype)
            return per_head.scatter(2, index, replacement) if torch.is_grad_enabled() else per_head.scatter_(2, index, replacement)
        # In place unless autograd is recording (the kernel may have saved this very tensor for its backward).
        if torch.is_grad_enabled():
            return per_head * per_head.new_ones(*dropped.shape[:2], self.num_heads, 1).scatter_(2, dropped.unsqueeze(-1), 0.0)
        if dropped.shape[0] * dropped.shape[1] == 1 and per_head.is_contiguous():
            # One token (decoding one sequence): one op on the [num_heads, head_dim] view.
            per_head.view(self.num_heads, -1).index_fill_(0, dropped.view(-1), 0.0)
            return per_head
        # Zero gates for the dropped heads, [batch, seq, num_heads, 1]: small, then one pass over per_head.
        keep = per_head.new_ones(*dropped.shape[:2], self.num_heads, 1).scatter_(2, dropped.unsqueeze(-1), 0.0)
        return per_head.mul_(keep)

    def scores_over_all_heads(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned router's projection widened to every head, for `drop_unselected_heads`: weight [num_heads,
        hidden] (routed heads' rows; zeros at shared heads) and bias [num_heads] (+inf at shared heads, so that they
        are never among the lowest scores). Rebuilt when the router's tensors change (training bumps their version)."""
        projection = self.router.routed_proj
        weight, bias = projection.weight, projection.bias
        # Identity (not equality) of the router's tensors, their versions and the compute dtype. Compared item by item
        # with cheap checks first: this runs on every layer of every decoded token.
        cached = self._index_cache.get("all-heads")
        if (
            cached is not None
            and cached[0][0] is weight
            and cached[0][1] == weight._version
            and cached[0][2] is hidden_states.dtype
            and (bias is None or (cached[0][4] is bias and cached[0][5] == bias._version))
            and cached[0][3] == weight.data_ptr()  # `weight.data = ...` keeps the object and its version
            and cached[1].device == hidden_states.device
        ):
            return cached[1], cached[2]
        key = (weight, weight._version, hidden_states.dtype, weight.data_ptr(), bias,
               None if bias is None else bias._version)
        routed_index = self._head_index("routed", hidden_states.device)
        full_weight = weight.new_zeros(self.num_heads, projection.in_features)
        full_weight = full_weight.index_copy(0, routed_index, weight.detach()).to(hidden_states.dtype)
        full_bias = self._head_index("shared-protection", hidden_states.device).clone()
        if bias is not None:
            full_bias = full_bias.index_copy(0, routed_index, bias.detach().float())
        cached = self._index_cache["all-heads"] = (key, full_weight, full_bias.to(hidden_states.dtype))
        return cached[1], cached[2]

    def gate_head_outputs(
        self, per_head: torch.Tensor, gates: torch.Tensor, routed_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """per_head [batch, seq, num_heads, head_dim] times gates [batch, seq, num_heads, 1], plus the fallback of
        skipped routed heads."""
        gated = per_head * gates.to(per_head.dtype)
        if self.fallback_in_use():
            # Routed heads the token skipped output their stored mean instead of zero.
            skipped = (1.0 - self.routed_part(gates, routed_mask)).to(per_head.dtype).unsqueeze(-1)
            routed_index = self._head_index("routed", per_head.device)
            fallback = skipped * self.head_fallback.index_select(0, routed_index).to(per_head.dtype)
            gated = gated.index_add(2, routed_index, fallback)
        return gated

    def fallback_in_use(self) -> bool:
        """Whether skipped heads output anything but zero. Calibration with the zero fallback stores zeros; they are
        checked once (again only when the parameter is replaced or changed in place, which bumps its version), so
        such models skip the fallback's ops on every token."""
        fallback = self.head_fallback
        if fallback is None:
            return False
        checked = self._fallback_checked
        if checked is None or checked[0] is not fallback or checked[1] != fallback._version:
            checked = self._fallback_checked = (fallback, fallback._version, bool(fallback.detach().any()))
        return checked[2]


# ----------------------------------------------------------------------------------------------------------------
# Head-sparse attention kernel ("sparse" attention path)
# ----------------------------------------------------------------------------------------------------------------

# A model whose text_config._attn_implementation is "moh_sparse_<base>" runs `moh_attention_forward`, with the
# attention masks of <base> ("sdpa": boolean or None, "eager": additive float). Flash-attention bases keep the masked
# path: their masks are not per-query matrices the sparse kernel could cut rows from.
SPARSE_ATTENTION_PREFIX = "moh_sparse_"
SPARSE_BASE_IMPLEMENTATIONS = ("sdpa", "eager")
# Routed queries are processed in chunks of this many (token, head) rows, sorted by token: one chunk attends the keys
# before its first token unmasked and its own span of tokens under a causal mask, so each row wastes at most one
# chunk's span of scores while every chunk costs two kernel calls and a merge. 384 rows is six of the CPU kernel's
# 64-row query splits (it uses them from 192 rows on), an even share for 2 threads; measured on SmolLM2-135M at 4096
# tokens, 384 beat 128, 256, 512 and 1024 rows.
ROUTED_ROWS_PER_CALL = 384
# The CPU rows path's cost model (`MoHHeadRouting.rows_path_pays`): a routed (token, head) row costs
# 1 + ROWS_PATH_CHUNK_TOKENS / q_len times a dense row of the dense kernel (each chunk's two kernel calls, merge and
# span mask are amortised over more keys in longer prefills). Fitted on SmolLM2-135M's attention shape (9 heads, 3
# key/value heads, head_dim 64, 2 CPU threads): top-6 of 9 routed costs 1.43x dense attention at 1024 tokens, 1.15x
# at 2048, 0.89-0.93x at 4096.
ROWS_PATH_CHUNK_TOKENS = 1600


def base_attention_function(module: nn.Module):
    """The attention kernel the source model would use: sdpa from the registry, or the family's own eager function
    (gemma2's applies logit soft-capping)."""
    name = module.config._attn_implementation.removeprefix(SPARSE_ATTENTION_PREFIX)
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def attend(query, key, value, mask, is_causal, scaling, softcap):
    """Attention of query heads over one shared key/value head, or over one each. query [b, n, q, d]; key, value
    [b, 1 or n, kv, d]; mask None, boolean (True = attend) or additive float, broadcastable to [b, n, q, kv].
    Returns [b, n, q, d]."""
    if is_causal and key.shape[2] > query.shape[2]:
        # No mask and more keys than queries: an empty static cache's unused slots (sdpa's upper-left convention).
        key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    if softcap is None:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=is_causal, scale=scaling, enable_gqa=query.shape[1] > 1
        )
    # Logit soft-capping (gemma2) has no SDPA kernel: the eager computation, as the family's own eager function.
    if key.shape[1] not in (1, query.shape[1]):  # GQA groups (shared heads that are whole groups)
        repeats = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeats, 1), value.repeat_interleave(repeats, 1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    min_value = torch.finfo(scores.dtype).min
    if is_causal:
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, min_value)
    if mask is not None:
        scores = scores.masked_fill(~mask, min_value) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value)


# The CPU flash-attention kernel also returns each query's log-sum-exp, which lets two partial attentions over
# disjoint key ranges be merged exactly (used for routed chunks, see attend_causal_rows).
FLASH_ATTENTION_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attend_causal_rows(rows, tokens, key, value, first, last, positions, scaling, softcap):
    """Causal attention of query rows [m, d] at sorted positions `tokens` (no model mask), whose tokens lie in
    [first, last): every key before `first` is visible to all of them, keys in [first, last) only up to each row's
    own token. key, value: [1, 1, kv, d]; positions: arange over the keys. Returns [m, d]."""
    query = rows[None, None]
    min_value = torch.finfo(rows.dtype).min
    # Additive mask of the chunk's own span: min_value where the key lies after the row's token.
    span_mask = (positions[first:last][None, :] > tokens[:, None]).to(rows.dtype).mul_(min_value)
    if FLASH_ATTENTION_WITH_LSE is not None and softcap is None and first > 0 and rows.device.type == "cpu":
        # Two kernel calls merged by their log-sum-exp: the long prefix runs unmasked (an additive mask costs the
        # CPU kernel 20-30% more), only the short span carries a mask. The prefix's share of the softmax
        # mass is sigmoid(lse_prefix - lse_span), so the merge is one lerp.
        prefix, prefix_lse = FLASH_ATTENTION_WITH_LSE(query, key[:, :, :first], value[:, :, :first], scale=scaling)
        span, span_lse = FLASH_ATTENTION_WITH_LSE(
            query, key[:, :, first:last], value[:, :, first:last], attn_mask=span_mask[None, None], scale=scaling
        )
        prefix_share = torch.sigmoid(prefix_lse - span_lse).unsqueeze(-1)
        return torch.lerp(span[0, 0].float(), prefix[0, 0].float(), prefix_share[0, 0]).to(rows.dtype)
    mask = F.pad(span_mask, (first, 0))
    return attend(query, key[:, :, :last], value[:, :, :last], mask[None, None], False, scaling, softcap)[0, 0]


def masked_block_rows(attention_mask, batch_row, tokens, dtype):
    """The model's mask rows for the selected query `tokens` of one chunk (padding, sliding window and cache offsets
    are all in it), cut to the key range [lo, hi) that any of them may attend. Returns (mask, lo, hi)."""
    rows = attention_mask[batch_row, 0].index_select(0, tokens)  # [m, kv]
    min_value = torch.finfo(dtype).min
    allowed = rows if rows.dtype == torch.bool else rows > min_value / 2
    if not allowed.any(dim=1).all():
        # A query that attends nothing (left padding): keep every key and the model's own mask, so the kernel does
        # what the source kernel does with such a row (sdpa: zeros; eager: uniform weights).
        return rows, 0, rows.shape[1]
    columns = allowed.any(dim=0).nonzero()
    lo, hi = columns[0, 0].item(), columns[-1, 0].item() + 1
    if rows.dtype == torch.bool:  # additive, as SDPA converts boolean masks anyway
        additive = torch.zeros((rows.shape[0], hi - lo), dtype=dtype, device=rows.device)
        return additive.masked_fill_(~rows[:, lo:hi], min_value), lo, hi
    return rows[:, lo:hi], lo, hi


def head_sparse_attention(
    routing, query, key, value, attention_mask, scaling, softcap, routed_mask, kernel="rows", dense_routed=()
):
    """Attention of the shared heads for every token and of each routed head for the tokens that selected it.

    query [b, heads, q, d]; key, value [b, kv_heads, kv, d] (after the cache update); routed_mask [b, q, routed]
    (1 where selected; None for a static layer, whose routed heads are never selected); dense_routed: positions in
    `routing.routed_heads` of routed heads to compute for every token in the shared heads' call, then zero where
    unselected (see `MoHHeadRouting.densely_computed_routed_heads`). Returns [b, q, heads, d] with zeros for
    unselected (token, head) pairs.
    Routed heads use a "varying number of queries per head" layout: per batch row and key/value head, the selected
    (token, head) pairs of all routed heads reading that key/value head are gathered as query rows (sorted by
    position) and cut into chunks of ROUTED_ROWS_PER_CALL rows; each chunk attends the keys up to its last token,
    causally (mask built from positions) or under rows cut from the model's mask (padding, sliding windows, cache
    offsets). kernel "triton" computes the routed heads with the Triton kernel instead (`triton_routed_attention`:
    no mask, no soft-capping; see `sparse_kernel_for`)."""
    batch, num_heads, q_len, head_dim = query.shape
    group_size = num_heads // key.shape[1]
    output = query.new_zeros(batch, q_len, num_heads, head_dim)
    shared_layout, routed_layout, zeroed = routing.heads_by_key_value_head(group_size, query.device, dense_routed)
    # sdpa's convention: no mask means plain causal attention (several queries) or every key (one query).
    is_causal = attention_mask is None and q_len > 1

    if shared_layout is not None:
        # Every shared head in one kernel call, each with its own copy of its key/value head. The CPU kernel splits
        # its work statically over (batch, head, query block); a causal call with one or two heads gives the thread
        # holding the late query blocks most of the work while the other one waits.
        heads, kv_heads = shared_layout
        # (Indexing, not index_select: index_select copies the whole strided query before picking heads.)
        shared_output = attend(
            query[:, heads], key[:, kv_heads], value[:, kv_heads],
            attention_mask, is_causal, scaling, softcap,
        )
        output[:, :, heads] = shared_output.transpose(1, 2)
        if zeroed is not None:
            # Routed heads computed for every token: zero the tokens that did not select them.
            zeroed_heads, zeroed_columns = zeroed
            output[:, :, zeroed_heads] *= routed_mask.index_select(-1, zeroed_columns).unsqueeze(-1).to(output.dtype)

    if routed_mask is None:
        return output
    if kernel == "triton":
        triton_routed_attention(routing, query, key, value, output, routed_mask, scaling)
        return output
    positions = torch.arange(key.shape[2], device=query.device) if attention_mask is None else None
    selected = routed_mask.bool()
    for kv_head, routed_positions, heads in routed_layout:
        for batch_row in range(batch):
            pairs = selected[batch_row].index_select(1, routed_positions).nonzero()  # [m, 2]: (token, j) by token
            if pairs.numel() == 0:
                continue
            tokens, pair_heads = pairs[:, 0], heads[pairs[:, 1]]
            rows = query[batch_row, pair_heads, tokens]  # [m, d]
            key_row = key[batch_row : batch_row + 1, kv_head : kv_head + 1]
            value_row = value[batch_row : batch_row + 1, kv_head : kv_head + 1]
            starts = range(0, tokens.shape[0], ROUTED_ROWS_PER_CALL)
            if attention_mask is None:
                # Each chunk's first token and last token + 1: the bounds of its span.
                ends = [min(start + ROUTED_ROWS_PER_CALL, tokens.shape[0]) for start in starts]
                bounds = torch.stack([tokens[list(starts)], tokens[[end - 1 for end in ends]] + 1]).tolist()
            chunk_outputs = []
            for index, start in enumerate(starts):
                chunk = slice(start, start + ROUTED_ROWS_PER_CALL)
                if attention_mask is None:
                    chunk_outputs.append(attend_causal_rows(
                        rows[chunk], tokens[chunk], key_row, value_row, bounds[0][index], bounds[1][index],
                        positions, scaling, softcap,
                    ))
                else:
                    mask, lo, hi = masked_block_rows(attention_mask, batch_row, tokens[chunk], query.dtype)
                    chunk_outputs.append(attend(
                        rows[chunk][None, None], key_row[:, :, lo:hi], value_row[:, :, lo:hi],
                        mask[None, None], False, scaling, softcap,
                    )[0, 0])
            output[batch_row, tokens, pair_heads] = torch.cat(chunk_outputs)
    return output


# ----------------------------------------------------------------------------------------------------------------
# Head-sparse attention on CUDA: a Triton kernel for the routed heads
# ----------------------------------------------------------------------------------------------------------------

# Triton comes with PyTorch's CUDA builds (torch.compile uses it). It is imported only when the kernel is first
# needed (a CUDA tensor, or a test running Triton's interpreter with TRITON_INTERPRET=1 on CPU tensors), so this
# file still loads with torch and transformers alone.
SPARSE_KERNELS = ("auto", "triton", "rows")
_TRITON_KERNELS: dict = {}  # interpret mode (bool) -> the jitted kernel (the interpreter is chosen when defined);
# "available" -> whether triton imports


def triton_is_available() -> bool:
    if "available" not in _TRITON_KERNELS:
        try:
            import triton  # noqa: F401
        except ImportError:
            _TRITON_KERNELS["available"] = False
        else:
            _TRITON_KERNELS["available"] = True
    return _TRITON_KERNELS["available"]


def sparse_kernel_for(query: torch.Tensor, attention_mask, softcap, requested: str = "auto") -> str:
    """Which kernel computes the routed heads of one prefill call: "triton" (CUDA: causal attention without a mask
    tensor, no soft-capping), "rows" (the CPU path: chunks of rows through PyTorch's kernels, every mask) or
    "dense" (the source kernel for every head, then gates: CUDA calls the Triton kernel does not cover, i.e. padding
    or sliding-window masks, soft-capping, head_dim over 256, or no Triton; the rows path's Python loop is no GPU
    design). `requested` ("auto", "triton", "rows"; `MoHForCausalLM.set_sparse_kernel`) forces one where it can run;
    "triton" on CPU tensors needs TRITON_INTERPRET=1 (tests)."""
    triton_fits = attention_mask is None and softcap is None and query.shape[-1] <= 256 and triton_is_available()
    if requested == "rows":
        return "rows"
    if requested == "triton":
        return "triton" if triton_fits else ("dense" if query.device.type == "cuda" else "rows")
    if query.device.type != "cuda":
        return "rows"
    return "triton" if triton_fits else "dense"


def _routed_rows_kernel():
    """The Triton kernel, defined on first use (TRITON_INTERPRET is read when a kernel is defined)."""
    import os

    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if interpret in _TRITON_KERNELS:
        return _TRITON_KERNELS[interpret]
    import triton
    import triton.language as tl

    @triton.jit
    def attend_key_tile(
        acc, row_max, row_sum, q, k_ptrs, v_ptrs, n0, last, tokens, dim_ok, scale_log2,
        BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, EVEN_DIM: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # One key tile [n0, n0 + BLOCK_N) folded into the rows' online softmax (FlashAttention-2). k_ptrs [d, n] and
        # v_ptrs [n, d] already point at this tile.
        keys = n0 + tl.arange(0, BLOCK_N)
        if CAUSAL:
            key_ok = keys <= last  # the tile may reach past the last row's token, even past the last key
            if EVEN_DIM:
                k = tl.load(k_ptrs, mask=key_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs, mask=key_ok[None, :] & dim_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        else:
            if EVEN_DIM:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=dim_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=dim_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's tl.dot mishandles bfloat16 (Triton 3.9): compute in float32 there
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            scores = tl.dot(q, k, input_precision="ieee")
        else:
            scores = tl.dot(q, k)
        scores = scores * scale_log2
        if CAUSAL:
            scores = tl.where(keys[None, :] <= tokens[:, None], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        probs = tl.math.exp2(scores - new_max[:, None])
        rescale = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        if IEEE:
            acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v)
        return acc, new_max, row_sum

    # Triton resolves the functions a kernel calls among its module's globals (not a closure's variables).
    globals()["_triton_attend_key_tile"] = attend_key_tile

    @triton.jit
    def routed_rows_attention_kernel(
        Q, K, V, Out, RowToken, RowHead, TileGroup, TileStart, TileEnd,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
        stride_ob, stride_ot, stride_oh, num_kv_heads, head_dim, scale_log2,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_DIM: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # One program = one tile of up to BLOCK_M query rows (token, head) of one (batch row, key/value head),
        # sorted by token: every row of the tile reads the same key/value tiles (the GQA saving), and the tile's
        # first and last tokens bound the keys it needs. Tiles come longest first (see triton_routed_attention).
        tile = tl.program_id(0)
        group = tl.load(TileGroup + tile)
        batch_row = (group // num_kv_heads).to(tl.int64)
        kv_head = (group % num_kv_heads).to(tl.int64)
        start = tl.load(TileStart + tile)
        end = tl.load(TileEnd + tile)
        rows = start + tl.arange(0, BLOCK_M)
        live = rows < end
        tokens = tl.load(RowToken + rows, mask=live, other=0)
        heads = tl.load(RowHead + rows, mask=live, other=0)
        dims = tl.arange(0, HEAD_DIM)
        dim_ok = dims < head_dim
        q_ptrs = Q + batch_row * stride_qb + heads[:, None].to(tl.int64) * stride_qh \
            + tokens[:, None].to(tl.int64) * stride_qt + dims[None, :]
        q = tl.load(q_ptrs, mask=live[:, None] & dim_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        # Rows are sorted by token. An empty tile (the launch covers the most tiles any routing could need) reads
        # nothing: both loops below run zero times and the store is fully masked.
        nonempty = start < end
        first = tl.load(RowToken + start, mask=nonempty, other=0)
        last = tl.load(RowToken + end - 1, mask=nonempty, other=-1)
        offs_n = tl.arange(0, BLOCK_N)
        # Pointers of the first key tile, moved on by one tile per step (no per-element address arithmetic).
        k_ptrs = K + batch_row * stride_kb + kv_head * stride_kh + offs_n[None, :] * stride_kt + dims[:, None]
        v_ptrs = V + batch_row * stride_vb + kv_head * stride_vh + offs_n[:, None] * stride_vt + dims[None, :]
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        # Stage 1: key tiles that end at or before the tile's first token: visible to every row, no causal test.
        visible_to_all = (first + 1) // BLOCK_N * BLOCK_N
        for n0 in range(0, visible_to_all, BLOCK_N):
            acc, row_max, row_sum = _triton_attend_key_tile(
                acc, row_max, row_sum, q, k_ptrs, v_ptrs, n0, last, tokens, dim_ok, scale_log2,
                BLOCK_N, False, EVEN_DIM, IEEE, UPCAST,
            )
            k_ptrs += BLOCK_N * stride_kt
            v_ptrs += BLOCK_N * stride_vt
        # Stage 2: the key tiles up to the tile's last token, with the causal test per (row, key). Key tiles after
        # the last token are never read.
        for n0 in range(visible_to_all, last + 1, BLOCK_N):
            acc, row_max, row_sum = _triton_attend_key_tile(
                acc, row_max, row_sum, q, k_ptrs, v_ptrs, n0, last, tokens, dim_ok, scale_log2,
                BLOCK_N, True, EVEN_DIM, IEEE, UPCAST,
            )
            k_ptrs += BLOCK_N * stride_kt
            v_ptrs += BLOCK_N * stride_vt
        out = acc / tl.where(live, row_sum, 1.0)[:, None]  # rows past the tile's end have seen no key
        o_ptrs = Out + batch_row * stride_ob + tokens[:, None].to(tl.int64) * stride_ot \
            + heads[:, None].to(tl.int64) * stride_oh + dims[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=live[:, None] & dim_ok[None, :])

    _TRITON_KERNELS[interpret] = routed_rows_attention_kernel
    return routed_rows_attention_kernel


def triton_block_sizes(query: torch.Tensor) -> tuple[int, int, int, int]:
    """(BLOCK_M rows, BLOCK_N keys, warps, pipeline stages) for the routed-rows kernel. On CPU tensors (the
    interpreter, for tests) small tiles, so that a short sequence spans several of them."""
    if query.device.type != "cuda":
        return 16, 16, 4, 1
    head_dim = query.shape[-1]
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:
        return 128, 64, 8, 3
    return 64, 32, 8, 2


def routed_rows_layout(routing, routed_mask: torch.Tensor, num_kv_heads: int, block_m: int):
    """The packed rows of the routed (token, head) pairs selected in routed_mask [b, q, routed]: grouped by (batch
    row, key/value head), sorted by token within a group, as (row_token, row_head) int32 [max rows], and tiles of at
    most block_m rows that never cross a group, as (tile_group, tile_start, tile_end) int32 [max tiles], the tiles
    with the latest last token first. Sizes are upper bounds known without reading the mask (every routed pair
    selected), so on a GPU nothing here waits for the device; rows past the selected ones are padding that no tile
    covers, and tiles past the real ones are empty (start == end)."""
    batch, q_len, num_routed = routed_mask.shape
    device = routed_mask.device
    slot_columns, slot_heads = routing.routed_slots(num_kv_heads, device)
    # [b, q, kv, slots] -> [b, kv, q, slots]: nonzero lists the pairs in exactly the packed order.
    selected = F.pad(routed_mask.bool(), (0, 1))[:, :, slot_columns].permute(0, 2, 1, 3)
    max_rows = batch * q_len * num_routed
    try:
        pairs = torch.nonzero_static(selected, size=max_rows)  # padded with -1 rows at the end
    except (NotImplementedError, RuntimeError):  # a build without it for this device: the same rows, one sync
        pairs = selected.nonzero()
        pairs = torch.cat([pairs, pairs.new_full((max_rows - pairs.shape[0], 4), -1)])
    row_token = pairs[:, 2].to(torch.int32)
    row_head = slot_heads[pairs[:, 1], pairs[:, 3]].to(torch.int32)
    counts = selected.sum(dim=(2, 3)).flatten()  # rows per (batch row, key/value head) group
    tiles_per_group = (counts + block_m - 1) // block_m
    tiles_end = tiles_per_group.cumsum(0)
    max_tiles = max_rows // block_m + counts.numel()  # >= the sum of ceil(count / block_m)
    tile = torch.arange(max_tiles, device=device)
    tile_group = torch.searchsorted(tiles_end, tile, right=True).clamp_(max=counts.numel() - 1)
    group_end = counts.cumsum(0)
    tile_start = (group_end - counts)[tile_group] + (tile - (tiles_end - tiles_per_group)[tile_group]) * block_m
    real = tile < tiles_end[-1]
    tile_start = torch.where(real, tile_start, 0)
    tile_end = torch.where(real, torch.minimum(tile_start + block_m, group_end[tile_group]), 0)
    # Longest first: a tile's work grows with its last token (causal), and the GPU schedules programs in launch
    # order, so short tiles fill in at the end instead of one long tile running alone.
    last_token = torch.where(real, row_token[(tile_end - 1).clamp(min=0)], -1)
    order = last_token.argsort(descending=True, stable=True)
    tile_group, tile_start, tile_end = tile_group[order], tile_start[order], tile_end[order]
    return row_token, row_head, tile_group.to(torch.int32), tile_start.to(torch.int32), tile_end.to(torch.int32)


def triton_routed_attention(routing, query, key, value, output, routed_mask, scaling) -> None:
    """Causal attention of the routed (token, head) pairs selected in routed_mask [b, q, routed], written into
    output [b, q, heads, d] (other pairs untouched). query [b, heads, q, d]; key, value [b, kv_heads, kv, d]. Keys
    follow sdpa's is_causal convention for a call without a mask: row t sees keys 0..t. Float32 accumulation."""
    block_m, block_n, num_warps, num_stages = triton_block_sizes(query)
    num_kv_heads = key.shape[1]
    row_token, row_head, tile_group, tile_start, tile_end = routed_rows_layout(
        routing, routed_mask, num_kv_heads, block_m
    )
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    head_dim = query.shape[-1]
    padded_head_dim = max(16, 1 << (head_dim - 1).bit_length())  # tl.arange needs a power of two, tl.dot >= 16
    interpreting = query.device.type != "cuda"  # CPU tensors reach the kernel only under TRITON_INTERPRET=1
    launch_options = {} if interpreting else {"num_warps": num_warps, "num_stages": num_stages}
    _routed_rows_kernel()[(tile_group.numel(),)](
        query, key, value, output, row_token, row_head, tile_group, tile_start, tile_end,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), output.stride(0), output.stride(1), output.stride(2),
        num_kv_heads, head_dim, scaling * 1.4426950408889634,  # log2(e): the kernel uses exp2
        HEAD_DIM=padded_head_dim, BLOCK_M=block_m, BLOCK_N=block_n, EVEN_DIM=padded_head_dim == head_dim,
        IEEE=query.dtype == torch.float32 or interpreting, UPCAST=interpreting and query.dtype != torch.float32,
        **launch_options,
    )


def moh_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """The attention function registered as "moh_sparse_sdpa" / "moh_sparse_eager" (same signature as
    transformers' attention functions). The registry is global and every copy of this file (the package's, each
    downloaded model's) registers the same names, so this stays a thin dispatcher into the attention block's own
    `moh` module: each model runs the kernel of its own modeling file."""
    routing = getattr(module, "moh", None)
    if routing is None:
        return base_attention_function(module)(module, query, key, value, attention_mask, **kwargs)
    return routing.attention(module, query, key, value, attention_mask, **kwargs)


for _base in SPARSE_BASE_IMPLEMENTATIONS:
    # New names only: no existing attention function or mask is changed for other models.
    AttentionInterface.register(SPARSE_ATTENTION_PREFIX + _base, moh_attention_forward)
    AttentionMaskInterface.register(SPARSE_ATTENTION_PREFIX + _base, ALL_MASK_ATTENTION_FUNCTIONS[_base])


def _query_projection(attention: nn.Module) -> tuple[nn.Module, bool]:
    """The module whose output holds the queries, and whether it is a fused qkv projection (phi3)."""
    if hasattr(attention, "q_proj"):
        return attention.q_proj, False
    if hasattr(attention, "qkv_proj"):
        return attention.qkv_proj, True
    raise ValueError(f"{type(attention).__name__} has neither q_proj nor qkv_proj; MoH cannot route its heads")


def routing_modules(model: nn.Module) -> list[MoHHeadRouting]:
    """The routing module of every attention block of `model` (also when wrapped, e.g. by peft), in layer order;
    empty for a dense model."""
    return [module for module in model.modules() if isinstance(module, MoHHeadRouting)]


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
            MoHHeadRouting.attach_to(layer.self_attn, config, layer_idx) for layer_idx, layer in enumerate(self.model.layers)
        ]
        self.set_attention_path(config.attention_path)
        self.post_init()

    def set_attention_path(self, attention_path: str):
        """Choose how gated attention is computed at inference: "sparse" (only selected (token, head) pairs) or
        "masked" (every head, then gates; the reference). Training always runs the masked path. The sparse kernel is
        installed as text_config's attention implementation "moh_sparse_<base>" when the base kernel is sdpa or
        eager and some layer routes heads; otherwise the base kernel stays (the masked path)."""
        if attention_path not in ATTENTION_PATHS:
            raise ValueError(f"attention_path must be one of {', '.join(ATTENTION_PATHS)}, got {attention_path!r}")
        self.config.attention_path = attention_path
        text_config = self.config.text_config
        base = (text_config._attn_implementation or "eager").removeprefix(SPARSE_ATTENTION_PREFIX)
        use_sparse = (
            attention_path == "sparse"
            and base in SPARSE_BASE_IMPLEMENTATIONS
            and not all(routing.is_dense for routing in self.head_routing)
        )
        # The internal attribute, not the setter: only the source model's config changes; `config._attn_implementation`
        # keeps naming the base kernel the user asked for.
        text_config._attn_implementation_internal = SPARSE_ATTENTION_PREFIX + base if use_sparse else base
        for routing in self.head_routing:
            # The sparse path's attention function gates the heads itself: one o_proj hook call per layer fewer.
            routing.use_output_gate_hook(not use_sparse)
        return self

    def set_sparse_kernel(self, kernel: str):
        """Which kernel the sparse path uses for routed heads at prefill: "auto" (Triton on CUDA where it applies,
        else the CPU rows path or, on CUDA, the dense kernel then gates), "triton" or "rows" (see
        `sparse_kernel_for`)."""
        if kernel not in SPARSE_KERNELS:
            raise ValueError(f"sparse kernel must be one of {', '.join(SPARSE_KERNELS)}, got {kernel!r}")
        for routing in self.head_routing:
            routing.sparse_kernel = kernel
        return self

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        super().set_attn_implementation(attn_implementation, *args, **kwargs)
        self.set_attention_path(self.config.attention_path)

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
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        # The cache travels in kwargs under whichever name this transformers version uses (`cache` from 5.25,
        # `past_key_values` before): naming one here would pass both, or pass a deprecated one.
        outputs = self.source_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        return outputs


__all__ = ["MoHConfig", "MoHForCausalLM", "MoHPreTrainedModel"]
