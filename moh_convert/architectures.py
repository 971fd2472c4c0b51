"""Which source architectures MoH conversion supports, and how their attention heads are laid out."""
from .errors import MoHError

# model_type -> how queries are produced. Every family here has per-head o_proj input slices, which is all MoH
# needs; "fused" means one qkv_proj whose first num_heads * head_dim outputs are the queries.
SUPPORTED_ARCHITECTURES = {
    "llama": "separate",
    "mistral": "separate",
    "qwen2": "separate",
    "qwen3": "separate",
    "gemma2": "separate",
    "gemma3_text": "separate",
    "phi3": "fused",
    "olmo2": "separate",
    "granite": "separate",
}


def check_supported(config) -> None:
    """Raise MoHError for configs MoH cannot convert: unknown families or multimodal wrappers."""
    model_type = getattr(config, "model_type", None)
    if model_type == "gemma3" and getattr(config, "text_config", None) is not None:
        raise MoHError(
            "source is a multimodal Gemma 3 (model_type 'gemma3'); convert its text-only checkpoint "
            "(model_type 'gemma3_text', e.g. gemma-3-270m or gemma-3-1b)"
        )
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise MoHError(
            f"unsupported architecture {model_type!r}; supported model types: "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )


def attention_tensor_names(config, layer_idx: int) -> list[str]:
    """Tensor names that must exist in a source checkpoint for layer `layer_idx`'s attention."""
    prefix = f"model.layers.{layer_idx}.self_attn"
    if SUPPORTED_ARCHITECTURES[config.model_type] == "fused":
        return [f"{prefix}.qkv_proj.weight", f"{prefix}.o_proj.weight"]
    return [f"{prefix}.q_proj.weight", f"{prefix}.o_proj.weight"]
