"""The README.md model card of a MoH model folder.

`moh convert` writes it; `moh push` (and any stage that leaves a report in the folder) refreshes it, so the card the
Hub shows always describes the folder as it is: conversion settings read from config.json, the calibration report
and training summary when present, and `moh eval` results (table + model-index metadata) when given.
"""
import json
import re
from pathlib import Path

import yaml

from .card_evaluation import Evaluation, eval_results, evaluation_section
from .errors import MoHError
from .model_folder import read_json_object
from .modeling.configuration_moh import MoHConfig

CARD_NAME = "README.md"
CALIBRATION_REPORT = "calibration_report.json"
TRAINING_SUMMARY = "training_summary.json"
REQUIRED_TAGS = ("moh", "mixture-of-heads", "moh_convert")
# A converted model keeps every source tensor and adds routers: the Hub's closest relation is a fine-tune.
BASE_MODEL_RELATION = "finetune"
# The `## ` sections this module writes, in card order. Sections a user added stay where they are.
SECTION_ORDER = ("Conversion", "Calibration", "Training", "Evaluation", "Usage")
# Longer lists in reports (per-layer values of a deep model) are shortened so the table stays readable.
MAX_LIST_ITEMS = 12


# ---------------------------------------------------------------- sections written at conversion time


def describe_shared_heads(config: MoHConfig) -> str:
    """'heads 0, 1, 2 in every layer' or one line per layer when layers differ."""
    layers = config.shared_heads
    if all(layer == layers[0] for layer in layers):
        return f"heads {', '.join(map(str, layers[0]))} in every layer" if layers[0] else "none"
    return "; ".join(f"layer {index}: {', '.join(map(str, heads)) or 'none'}" for index, heads in enumerate(layers))


def card_metadata(config: MoHConfig, base_model: str | None, license: str | None = None) -> dict:
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": [*REQUIRED_TAGS, config.source_model_type],
    }
    if base_model:
        metadata["base_model"] = base_model
        metadata["base_model_relation"] = BASE_MODEL_RELATION
    if license:
        metadata["license"] = license
    return metadata


def describe_source(config: MoHConfig, source_name: str) -> str:
    return f"`{source_name}` ({config.source_model_type}, {config.num_layers} layers)"


def routed_top_k(config: MoHConfig, layer_idx: int) -> int:
    """routed_top_k is one number for every layer, or one per layer (calibration can vary the split by layer)."""
    top_k = config.routed_top_k
    return top_k if isinstance(top_k, int) else top_k[layer_idx]


def per_layer(values: list) -> str:
    """'6' when every layer has the same value, else 'per layer: 5, 6, 6, ...'."""
    if all(value == values[0] for value in values):
        return str(values[0])
    return "per layer: " + ", ".join(map(str, values))


def static_layers(config: MoHConfig) -> str:
    """Layers whose routed heads are never selected: they run their shared heads only (cheapest; no router)."""
    layers = [layer for layer in range(config.num_layers)
              if routed_top_k(config, layer) == 0 and len(config.shared_heads[layer]) < config.num_heads]
    return f"{len(layers)} of {config.num_layers}" + (f" ({', '.join(map(str, layers))})" if layers else "")


def conversion_table(config: MoHConfig, source_description: str) -> str:
    layers = range(config.num_layers)
    active = [len(config.shared_heads[layer]) + routed_top_k(config, layer) for layer in layers]
    active_text = per_layer(active)
    if len(set(active)) == 1:
        active_text = f"{active[0]} of {config.num_heads} ({active[0] / config.num_heads:.0%})"
    rows = [
        ("source", source_description),
        ("attention heads per layer", str(config.num_heads)),
        ("active heads per token", active_text),
        ("shared (always-on) heads", describe_shared_heads(config)),
        ("routed heads per token (top-K)", per_layer([routed_top_k(config, layer) for layer in layers])),
        ("static layers (fixed heads, no router)", static_layers(config)),
        ("router", config.router),
        ("gates", config.gate_mode),
    ]
    if getattr(config, "head_fallback", False):
        rows.append(("unselected heads output", "their stored mean output (head fallback), not zero"))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"## Conversion\n\n| setting | value |\n| --- | --- |\n{table}\n"


def conversion_section(config: MoHConfig, source_name: str) -> str:
    return conversion_table(config, describe_source(config, source_name))


def usage_section(model_id: str) -> str:
    return (
        "## Usage\n\n"
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{model_id}", trust_remote_code=True)\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{model_id}", trust_remote_code=True)\n'
        "```\n\n"
        "The modeling code (`modeling_moh.py`, `configuration_moh.py`) ships with the model and needs only torch "
        "and transformers; with `import moh_convert` the model also loads without `trust_remote_code`.\n"
    )


def write_model_card(
    folder: Path,
    config: MoHConfig,
    source_name: str,
    base_model: str | None = None,
    extra_sections: list[str] = (),
    license: str | None = None,
) -> Path:
    """Write FOLDER/README.md for a freshly converted model. The license is the source's when its card is on disk."""
    metadata = card_metadata(config, base_model, license or source_license(source_name))
    body = [
        f"# {folder.name}\n",
        f"Mixture-of-Head (MoH) attention version of `{source_name}`, made with "
        "`moh_convert`. Each token uses only some attention heads: "
        "a few shared heads are always on and a router picks the rest "
        "([MoH, Jin et al. 2024](https://arxiv.org/abs/2410.11842)). The source model's tensors are unchanged.\n",
        conversion_section(config, source_name),
        *report_sections(folder).values(),
        *extra_sections,
        usage_section(folder.name),
    ]
    text = "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n\n" + "\n".join(body)
    path = folder / CARD_NAME
    path.write_text(text)
    return path


# ---------------------------------------------------------------- license of the source model


def license_in_card_text(text: str) -> str | None:
    from huggingface_hub import ModelCard

    try:
        license = ModelCard(text, ignore_metadata_errors=True).data.license
    except (ValueError, yaml.YAMLError):
        return None
    return license if isinstance(license, str) else None


def source_license(source_name: str) -> str | None:
    """The license declared in the source model's own card, when that card is on disk: a local checkpoint folder,
    or a Hub model whose README.md is in the Hugging Face cache. None otherwise (GGUF files carry no card)."""
    from huggingface_hub import try_to_load_from_cache

    local_card = Path(source_name).expanduser() / CARD_NAME
    if local_card.is_file():
        return license_in_card_text(local_card.read_text(errors="replace"))
    if source_name.count("/") != 1 or Path(source_name).exists():
        return None
    try:
        cached_card = try_to_load_from_cache(source_name, CARD_NAME)
    except ValueError:  # not a valid repo id after all
        return None
    if isinstance(cached_card, str):
        return license_in_card_text(Path(cached_card).read_text(errors="replace"))
    return None


# ---------------------------------------------------------------- calibration / training reports (generic tables)


def format_report_value(value) -> str:
    if isinstance(value, bool) or value is None:
        text = json.dumps(value)
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        text = f"{len(value)} entries (see the JSON file)"  # per-layer records: too wide for one cell
    elif isinstance(value, list):
        shown = ", ".join(format_report_value(item) for item in value[:MAX_LIST_ITEMS])
        more = f", ... ({len(value)} values)" if len(value) > MAX_LIST_ITEMS else ""
        text = f"[{shown}{more}]"
    elif isinstance(value, dict):
        text = json.dumps(value, separators=(", ", ": "))
    else:
        text = str(value)
    # A pipe would end the table cell and a newline the row.
    return text.replace("|", "\\|").replace("\n", " ")


def flatten_report(data: dict, prefix: str = "") -> list[tuple[str, str]]:
    """{'a': {'b': 1}, 'c': [1, 2]} -> [('a.b', '1'), ('c', '[1, 2]')]: one table row per leaf value."""
    rows = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(flatten_report(value, prefix=f"{name}."))
        else:
            rows.append((name.replace("|", "\\|"), format_report_value(value)))
    return rows


def read_report(path: Path) -> dict:
    return read_json_object(path, "fix or delete it")


def generic_report_line(file_name: str) -> str:
    """First line of a generic report section: it marks the section as generated here, so it may be replaced."""
    return f"From `{file_name}`:"


def report_section(title: str, path: Path) -> str:
    rows = flatten_report(read_report(path))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows) or "| (empty) | |"
    return f"## {title}\n\n{generic_report_line(path.name)}\n\n| key | value |\n| --- | --- |\n{table}\n"


REPORTS = (("Calibration", CALIBRATION_REPORT), ("Training", TRAINING_SUMMARY))


def report_sections(folder: Path) -> dict[str, str]:
    """Section title -> generic key/value section, for each report other stages left in FOLDER."""
    return {title: report_section(title, folder / name) for title, name in REPORTS if (folder / name).is_file()}


# ---------------------------------------------------------------- refreshing an existing card


def read_model_card(folder: Path):
    """FOLDER/README.md as a huggingface_hub ModelCard; a missing card or unreadable metadata is a MoHError."""
    from huggingface_hub import ModelCard

    path = folder / CARD_NAME
    if not path.is_file():
        raise MoHError(f"{folder} has no model card ({CARD_NAME}); re-run `moh convert` or write one")
    try:
        return ModelCard(path.read_text())
    except (ValueError, yaml.YAMLError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise MoHError(f"the metadata block of {path} is not valid YAML ({first_line}); fix it") from None


def split_sections(body: str) -> tuple[str, list[tuple[str, str]]]:
    """Markdown body -> (text before the first `## ` heading, [(title, section text)]); `## ` lines inside code
    fences are code, not headings."""
    preamble: list[str] = []
    sections: list[tuple[str, list[str]]] = []
    in_fence = False
    for line in body.splitlines(keepends=True):
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        if not in_fence and line.startswith("## "):
            sections.append((line[3:].strip(), [line]))
        elif sections:
            sections[-1][1].append(line)
        else:
            preamble.append(line)
    return "".join(preamble), [(title, "".join(lines)) for title, lines in sections]


def join_sections(preamble: str, sections: list[tuple[str, str]]) -> str:
    parts = [part.strip() for part in (preamble, *(text for _, text in sections)) if part.strip()]
    return "\n" + "\n\n".join(parts) + "\n"


def set_section(sections: list[tuple[str, str]], title: str, text: str) -> list[tuple[str, str]]:
    """Replace the section called TITLE, or insert it before the first section that SECTION_ORDER puts after it."""
    titles = [existing for existing, _ in sections]
    if title in titles:
        return [(existing, text if existing == title else old) for existing, old in sections]
    later = SECTION_ORDER[SECTION_ORDER.index(title) + 1 :]
    position = next((index for index, existing in enumerate(titles) if existing in later), len(sections))
    return [*sections[:position], (title, text), *sections[position:]]


def source_row(sections: list[tuple[str, str]]) -> str | None:
    """The `| source | ... |` cell of an existing Conversion section: only `moh convert` knew the source's name."""
    for title, text in sections:
        if title == "Conversion":
            match = re.search(r"^\| source \| (.+) \|$", text, flags=re.MULTILINE)
            if match:
                return match.group(1)
    return None


def is_replaceable(sections: list[tuple[str, str]], title: str) -> bool:
    """A report section may be (re)written unless the stage that made the report wrote its own, richer one."""
    file_name = dict(REPORTS)[title]
    existing = [text for existing_title, text in sections if existing_title == title]
    return not existing or generic_report_line(file_name) in existing[0]


def rename_title(preamble: str, old_title: str, new_title: str) -> str:
    return re.sub(rf"^# {re.escape(old_title)}$", f"# {new_title}", preamble, count=1, flags=re.MULTILINE)


def update_metadata(data, license: str | None, model_name: str, evaluation: Evaluation | None) -> None:
    """Fill in what the Hub reads, keeping what the user set: library, pipeline, tags, relation, license, results."""
    data.library_name = data.library_name or "transformers"
    data.pipeline_tag = data.pipeline_tag or "text-generation"
    tags = list(data.tags or [])
    data.tags = tags + [tag for tag in REQUIRED_TAGS if tag not in tags]
    if data.base_model and not data.get("base_model_relation"):
        data.base_model_relation = BASE_MODEL_RELATION
    if license and not data.license:
        data.license = license
    if evaluation is not None:
        data.model_name = model_name
        data.eval_results = eval_results(evaluation)


def render_updated_card(
    folder: Path,
    config: MoHConfig,
    model_id: str,
    evaluation: Evaluation | None = None,
    license: str | None = None,
) -> str:
    """FOLDER's card brought up to date for MODEL_ID (a Hub repo id, or the folder name when updated in place).

    The Conversion section is rebuilt from config.json (calibration may have changed the shared heads), report and
    evaluation sections are added or replaced, the usage snippet names MODEL_ID; everything else is kept.
    Rendering the result again gives the same text.
    """
    card = read_model_card(folder)
    model_name = model_id.split("/")[-1]
    update_metadata(card.data, license, model_name, evaluation)
    preamble, sections = split_sections(card.text)
    source = source_row(sections) or describe_source(config, getattr(config.text_config, "_name_or_path", "") or "unknown")
    sections = set_section(sections, "Conversion", conversion_table(config, source))
    for title, text in report_sections(folder).items():
        if is_replaceable(sections, title):
            sections = set_section(sections, title, text)
    if evaluation is not None:
        sections = set_section(sections, "Evaluation", evaluation_section(evaluation))
    sections = set_section(sections, "Usage", usage_section(model_id))
    card.text = join_sections(rename_title(preamble, folder.name, model_name), sections)
    return str(card)


def set_card_section(folder: Path, title: str, text: str) -> None:
    """Replace or insert the `## TITLE` section of FOLDER/README.md (where SECTION_ORDER puts it), keeping the rest;
    nothing happens without a card. The file is unlinked before it is rewritten: a staging copy may hard-link it to
    the original model's card."""
    path = folder / CARD_NAME
    if not path.is_file():
        return
    card = path.read_text()
    metadata, body = "", card
    if card.startswith("---\n") and "\n---\n" in card[4:]:
        end = card.index("\n---\n", 4) + len("\n---\n")
        metadata, body = card[:end], card[end:]
    preamble, sections = split_sections(body)
    path.unlink()
    path.write_text(metadata + join_sections(preamble, set_section(sections, title, text)))


def refresh_conversion_section(folder: Path, config: MoHConfig) -> None:
    """Rebuild the card's Conversion section from `config` (calibration changes the per-layer split), keeping its
    source row; nothing happens without a card."""
    if not (folder / CARD_NAME).is_file():
        return
    _, sections = split_sections(read_model_card(folder).text)
    source = source_row(sections) or describe_source(config, config.source_model or "unknown")
    set_card_section(folder, "Conversion", conversion_table(config, source))


def update_model_card(folder: str | Path, evaluation: Evaluation | None = None) -> Path:
    """Refresh FOLDER/README.md in place, e.g. after a stage wrote calibration_report.json or training_summary.json."""
    folder = Path(folder)
    path = folder / CARD_NAME
    path.write_text(render_updated_card(folder, read_moh_config(folder), folder.name, evaluation))
    return path


def read_moh_config(folder: Path) -> MoHConfig:
    """FOLDER/config.json as a MoHConfig; anything else (another model type, impossible head split) is a MoHError."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise MoHError(f"{folder} has no config.json; it is not a model folder")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (ValueError, AttributeError) as error:
        raise MoHError(f"{config_path} is not a valid JSON object ({error}); re-run `moh convert`") from None
    if model_type != MoHConfig.model_type:
        raise MoHError(f"{config_path} has model_type {model_type!r}, not 'moh': {folder} is not a MoH model folder")
    try:
        return MoHConfig.from_pretrained(folder)
    except (ValueError, KeyError, TypeError) as error:
        raise MoHError(f"cannot read {config_path} as a MoH config: {error}") from None
