"""The README.md model card written into every MoH model folder."""
from pathlib import Path

import yaml

from .modeling.configuration_moh import MoHConfig


def describe_shared_heads(config: MoHConfig) -> str:
    """'heads 0, 1, 2 in every layer' or one line per layer when layers differ."""
    layers = config.shared_heads
    if all(layer == layers[0] for layer in layers):
        heads = ", ".join(map(str, layers[0])) or "none"
        return f"heads {heads} in every layer"
    return "; ".join(f"layer {index}: {', '.join(map(str, heads)) or 'none'}" for index, heads in enumerate(layers))


def card_metadata(config: MoHConfig, base_model: str | None, license: str | None = None) -> dict:
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["moh", "mixture-of-heads", "moh_convert", config.source_model_type],
    }
    if base_model:
        metadata["base_model"] = base_model
        metadata["base_model_relation"] = "finetune"
    if license:
        metadata["license"] = license
    return metadata


def conversion_section(config: MoHConfig, source_name: str) -> str:
    num_shared = len(config.shared_heads[0])
    active = num_shared + config.routed_top_k
    rows = [
        ("source", f"`{source_name}` ({config.source_model_type}, {config.num_layers} layers)"),
        ("attention heads per layer", str(config.num_heads)),
        ("active heads per token", f"{active} of {config.num_heads} ({active / config.num_heads:.0%})"),
        ("shared (always-on) heads", describe_shared_heads(config)),
        ("routed heads per token (top-K)", str(config.routed_top_k)),
        ("router", config.router),
        ("gates", config.gate_mode),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"## Conversion\n\n| setting | value |\n| --- | --- |\n{table}\n"


def write_model_card(
    folder: Path,
    config: MoHConfig,
    source_name: str,
    base_model: str | None = None,
    extra_sections: list[str] = (),
) -> Path:
    metadata = card_metadata(config, base_model)
    usage = (
        "## Usage\n\n"
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{folder.name}", trust_remote_code=True)\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{folder.name}")\n'
        "```\n\n"
        "The modeling code (`modeling_moh.py`, `configuration_moh.py`) ships in this folder and needs only torch "
        "and transformers; with `import moh_convert` the model also loads without `trust_remote_code`.\n"
    )
    body = [
        f"# {folder.name}\n",
        f"Mixture-of-Head (MoH) attention version of `{source_name}`, made with "
        "`moh_convert`. Each token uses only some attention heads: "
        "a few shared heads are always on and a router picks the rest "
        "([MoH, Jin et al. 2024](https://arxiv.org/abs/2410.11842)). The source model's tensors are unchanged.\n",
        conversion_section(config, source_name),
        *extra_sections,
        usage,
    ]
    text = "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n\n" + "\n".join(body)
    path = folder / "README.md"
    path.write_text(text)
    return path
