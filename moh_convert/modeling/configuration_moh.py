# Configuration of a Mixture-of-Head (MoH) attention model.
#
# This file is copied into every converted model folder next to `modeling_moh.py`, so it imports only
# transformers. A MoH model wraps a source decoder architecture: `text_config` is the source model's own
# config (LlamaConfig, Qwen3Config, ...), untouched; the fields below say how attention heads are routed.
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

ROUTERS = ("query-norm", "learned")
# binary: selected heads get gate 1, others 0 (paper's conversion of pretrained models; straight-through
#         estimator in training). two-stage: the paper's learned routing for from-scratch training, rescaled
#         so uniform routing keeps the dense output scale. softmax: MoA-style raw softmax weights.
GATE_MODES = ("binary", "two-stage", "softmax")
# sparse: at inference, attention is computed only for the (token, head) pairs a token selected (see modeling_moh.py).
# masked: every head is computed and unselected heads are multiplied by 0 (the reference; training always uses it).
ATTENTION_PATHS = ("sparse", "masked")


class MoHConfig(PreTrainedConfig):
    r"""
    Args:
        text_config (`dict` or `PreTrainedConfig`):
            The source architecture's config. Its model is built unchanged; every attention block gets a router.
        shared_heads (`list[list[int]]`):
            Per decoder layer, the indices of the query heads that are always active.
        routed_top_k (`int` or `list[int]`):
            How many of the remaining (routed) heads each token selects: one number for every layer, or one per layer
            (calibration shares a different number of heads per layer and keeps shared + top-K constant).
        router (`str`):
            `"query-norm"` (parameter-free: L2 norm of each routed head's query) or `"learned"` (a linear router on
            the attention block's input).
        gate_mode (`str`):
            `"binary"`, `"two-stage"` or `"softmax"` (see `GATE_MODES`).
        router_bias (`bool`):
            Whether learned routers have a bias.
        load_balance_coef (`float`):
            Weight of the load-balance loss on routed heads during training (paper: 0.01).
        router_z_loss_coef (`float`):
            Weight of the router z-loss (MoA preset: 0.001; 0 disables it).
        head_fallback (`bool`):
            If True, a head a token did not select outputs a stored constant (`moh.head_fallback`, its mean output
            on calibration text) instead of zero; it costs no attention compute and keeps the layer's output mean.
        attention_path (`str`):
            `"sparse"` (default): at inference the attention of a head is computed only for the tokens that selected
            it. `"masked"`: every head is computed and multiplied by its gate, as in training (the reference path).
            Same results either way (up to float rounding); change it on a loaded model with
            `model.set_attention_path(...)`.
        source_model_type (`str`):
            `model_type` of the source architecture (kept for humans and tools; `text_config` is authoritative).
        source_model (`str`, *optional*):
            What the model was converted from, as given to `moh convert` (Hub id, or the absolute path of a local
            folder or GGUF file). `moh train` distils from it by default.
    """

    model_type = "moh"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    shared_heads: list | None = None
    routed_top_k: int | list = 0
    router: str = "query-norm"
    gate_mode: str = "binary"
    router_bias: bool = False
    load_balance_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    head_fallback: bool = False
    attention_path: str = "sparse"
    source_model_type: str | None = None
    source_model: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        text_config = self.text_config
        self.source_model_type = text_config.model_type
        # Tying lives in the source config; the wrapper must agree with it or transformers unties the weights.
        self.tie_word_embeddings = bool(getattr(text_config, "tie_word_embeddings", False))
        if self.shared_heads is None:
            self.shared_heads = [[] for _ in range(text_config.num_hidden_layers)]
        self.shared_heads = [sorted(int(head) for head in layer) for layer in self.shared_heads]
        self.validate_heads()

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    def routed_heads(self, layer_idx: int) -> list[int]:
        shared = set(self.shared_heads[layer_idx])
        return [head for head in range(self.num_heads) if head not in shared]

    def layer_top_k(self, layer_idx: int) -> int:
        """Routed heads each token selects in layer `layer_idx`."""
        if isinstance(self.routed_top_k, int):
            return self.routed_top_k
        return self.routed_top_k[layer_idx]

    def active_heads(self, layer_idx: int) -> int:
        return len(self.shared_heads[layer_idx]) + self.layer_top_k(layer_idx)

    def validate_heads(self):
        """Raise ValueError with the fix when the head split cannot work."""
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if self.attention_path not in ATTENTION_PATHS:
            raise ValueError(
                f"attention_path must be one of {', '.join(ATTENTION_PATHS)}, got {self.attention_path!r}"
            )
        if self.gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode must be one of {', '.join(GATE_MODES)}, got {self.gate_mode!r}")
        if self.gate_mode == "two-stage" and self.router != "learned":
            raise ValueError("gate_mode 'two-stage' needs router 'learned' (it has learned shared/routed weights)")
        if len(self.shared_heads) != self.num_layers:
            raise ValueError(
                f"shared_heads lists {len(self.shared_heads)} layers but the model has {self.num_layers}"
            )
        if not isinstance(self.routed_top_k, int) and len(self.routed_top_k) != self.num_layers:
            raise ValueError(f"routed_top_k lists {len(self.routed_top_k)} layers but the model has {self.num_layers}")
        for layer_idx, shared in enumerate(self.shared_heads):
            top_k = self.layer_top_k(layer_idx)
            if top_k < 0:
                raise ValueError(f"layer {layer_idx}: routed_top_k must be >= 0, got {top_k}")
            if len(set(shared)) != len(shared) or any(not 0 <= head < self.num_heads for head in shared):
                raise ValueError(
                    f"layer {layer_idx}: shared heads {shared} must be distinct indices in 0..{self.num_heads - 1}"
                )
            num_routed = self.num_heads - len(shared)
            if top_k > num_routed:
                raise ValueError(
                    f"layer {layer_idx}: routed_top_k={top_k} but only {num_routed} heads are routed "
                    f"({len(shared)} of {self.num_heads} are shared); lower the active heads or share fewer heads"
                )
            if len(shared) + top_k == 0:
                raise ValueError(f"layer {layer_idx}: no head would be active; use at least one active head")


__all__ = ["MoHConfig"]
