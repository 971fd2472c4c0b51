"""The model card: metadata the Hub reads (checked by parsing with huggingface_hub's ModelCard), conversion settings
from config.json, calibration/training reports, `moh eval` results with model-index, and a refresh that keeps
what the user wrote and gives the same text when run twice."""
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import ModelCard

from moh_convert import MoHError, convert
from moh_convert.card_evaluation import load_evaluation
from moh_convert.model_card import (
    read_moh_config,
    render_updated_card,
    source_license,
    update_model_card,
)

from .test_hub import moh_folder, tiny_moh_template, write_eval_dir  # noqa: F401 (fixtures)


def section_titles(card_text: str) -> list[str]:
    titles, in_code = [], False
    for line in card_text.splitlines():
        in_code = not in_code if line.startswith("```") else in_code
        if line.startswith("## ") and not in_code:
            titles.append(line[3:])
    return titles


def test_converted_card_has_the_metadata_the_hub_reads(tiny_moh_template):
    card = ModelCard((tiny_moh_template / "README.md").read_text())
    assert card.data.base_model == "someone/tiny-llama"
    assert card.data.base_model_relation == "finetune"
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert {"mixture-of-heads", "moh", "llama"} <= set(card.data.tags)
    assert section_titles(str(card)) == ["Conversion", "Usage"]
    assert "| active heads per token | 3 of 4 (75%) |" in card.text


def test_license_is_inherited_from_a_local_source_card(tiny_checkpoints, tmp_path):
    source = Path(shutil.copytree(tiny_checkpoints["llama"], tmp_path / "source"))
    (source / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n\n# Source model\n")
    out = convert(source, tmp_path / "out", no_calibration=True)
    assert ModelCard((out / "README.md").read_text()).data.license == "mit"


def test_license_is_read_from_a_hub_card_in_the_cache(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--someone--tiny-llama" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    (tmp_path / "hub" / "models--someone--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-llama" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert source_license("someone/tiny-llama") == "apache-2.0"
    assert source_license("someone/not-cached") is None
    assert source_license("model.Q4_1.gguf") is None


def test_eval_results_become_a_table_and_model_index(moh_folder, tmp_path):
    evaluation = load_evaluation(write_eval_dir(tmp_path / "eval"))
    text = render_updated_card(moh_folder, read_moh_config(moh_folder), "me/tiny-moh", evaluation)

    card = ModelCard(text)
    assert card.data.model_name == "tiny-moh"
    results = {(entry.dataset_type, entry.metric_type): entry for entry in card.data.eval_results}
    assert set(results) == {("hellaswag", "acc_norm"), ("arc_easy", "acc")}
    assert results["hellaswag", "acc_norm"].metric_value == 41.2
    assert results["hellaswag", "acc_norm"].dataset_args == {"num_few_shot": 10}
    assert results["hellaswag", "acc_norm"].task_type == "text-generation"
    # The raw YAML carries the model-index block the Hub's leaderboard widgets read.
    assert "\nmodel-index:\n- name: tiny-moh\n" in text
    assert "with 75% of attention heads active per token; baseline: `someone/tiny-llama`" in card.text
    assert "| arc_easy | acc | 0 | 56.0 | 55.0 | -1.0 |" in card.text
    assert "Scores in percent (lm-eval); first 100 documents of each task" in card.text
    assert "# moh eval" not in text  # the eval document's own title would be a second page title
    assert section_titles(text) == ["Conversion", "Evaluation", "Usage"]
    assert "# tiny-moh\n" in text and 'from_pretrained("me/tiny-moh", trust_remote_code=True)' in text


def test_reports_render_as_tables_in_card_order(moh_folder):
    (moh_folder / "calibration_report.json").write_text(json.dumps({
        "tokens": 24000, "shared_heads": {"method": "output-norm", "layers_changed": 2},
        "per_layer_error": [0.125 * i for i in range(20)], "note": "a|b",
        "layers": [{"shared_heads": [0, 1]}, {"shared_heads": [1, 2]}],
    }))
    (moh_folder / "training_summary.json").write_text(json.dumps({"steps": 300, "final_loss": 2.3456789}))
    path = update_model_card(moh_folder)

    text = path.read_text()
    assert section_titles(text) == ["Conversion", "Calibration", "Training", "Usage"]
    assert "| tokens | 24000 |" in text
    assert "| shared_heads.method | output-norm |" in text and "| shared_heads.layers_changed | 2 |" in text
    assert "| per_layer_error | [0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1, 1.125, 1.25, 1.375, ... (20 values)] |" in text
    assert "| note | a\\|b |" in text  # a pipe would have split the cell
    assert "| layers | 2 entries (see the JSON file) |" in text
    assert "| final_loss | 2.346 |" in text


def test_a_stage_written_report_section_is_kept_and_a_generic_one_refreshed(moh_folder):
    # `moh calibrate` writes its own Calibration section; the generic table must not replace it.
    card_path = moh_folder / "README.md"
    curated = "## Calibration\n\nRouters fitted on 24,000 tokens; perplexity 31.2 (dense 29.6).\n"
    card_path.write_text(card_path.read_text().replace("## Usage", curated + "\n## Usage"))
    (moh_folder / "calibration_report.json").write_text(json.dumps({"tokens": 24000}))
    (moh_folder / "training_summary.json").write_text(json.dumps({"steps": 10}))
    text = update_model_card(moh_folder).read_text()
    assert "Routers fitted on 24,000 tokens" in text and "| tokens | 24000 |" not in text
    assert "| steps | 10 |" in text
    # A generic section follows its report when the report changes.
    (moh_folder / "training_summary.json").write_text(json.dumps({"steps": 20}))
    text = update_model_card(moh_folder).read_text()
    assert "| steps | 20 |" in text and "| steps | 10 |" not in text
    assert section_titles(text) == ["Conversion", "Calibration", "Training", "Usage"]


def test_refresh_keeps_user_text_and_is_stable(moh_folder):
    card_path = moh_folder / "README.md"
    card = ModelCard(card_path.read_text())
    card.data.license = "mit"
    card.data.tags = ["my-tag"]
    card.text += (
        "\n## Citation\n\nPlease cite us.\n\n## Notes\n\n```text\n## not a heading, inside a code block\n```\n"
    )
    card_path.write_text(str(card))
    (moh_folder / "training_summary.json").write_text(json.dumps({"steps": 10}))

    first = update_model_card(moh_folder).read_text()
    second = update_model_card(moh_folder).read_text()

    assert first == second
    assert section_titles(first) == ["Conversion", "Training", "Usage", "Citation", "Notes"]
    assert "## not a heading, inside a code block" in first and "Please cite us." in first
    refreshed = ModelCard(first)
    assert refreshed.data.license == "mit"  # what the user set is kept ...
    assert refreshed.data.tags[0] == "my-tag" and "mixture-of-heads" in refreshed.data.tags  # ... and completed


def test_conversion_section_follows_config_and_keeps_the_source(moh_folder):
    # As after calibration picked different shared heads per layer.
    config = json.loads((moh_folder / "config.json").read_text())
    config["shared_heads"] = [[0], [0, 1]]
    (moh_folder / "config.json").write_text(json.dumps(config))
    text = update_model_card(moh_folder).read_text()
    assert "| shared (always-on) heads | layer 0: 0; layer 1: 0, 1 |" in text
    assert "| active heads per token | per layer: 2, 3 |" in text
    assert "| source | `" in text and "(llama, 2 layers) |" in text


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda comparison: comparison.pop("tasks"), "comparison.json does not match the `moh eval` schema (tasks: Field required)"),
        (lambda comparison: comparison["tasks"][0].update(moh="n/a"), "tasks.0.moh"),
        (lambda comparison: comparison.update(tasks=[]), "lists no tasks"),
    ],
)
def test_bad_comparison_json_is_refused(tmp_path, change, message):
    eval_dir = write_eval_dir(tmp_path / "eval")
    comparison = json.loads((eval_dir / "comparison.json").read_text())
    change(comparison)
    (eval_dir / "comparison.json").write_text(json.dumps(comparison))
    with pytest.raises(MoHError, match="comparison.json") as raised:
        load_evaluation(eval_dir)
    assert message in str(raised.value)


def test_unreadable_report_is_refused_naming_it(moh_folder):
    (moh_folder / "calibration_report.json").write_text("{not json")
    with pytest.raises(MoHError, match="calibration_report.json is not valid JSON"):
        update_model_card(moh_folder)
    (moh_folder / "calibration_report.json").write_text("[1, 2]")
    with pytest.raises(MoHError, match="calibration_report.json must hold a JSON object"):
        update_model_card(moh_folder)
