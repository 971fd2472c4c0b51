"""`moh heads`: routed-head densities per task and layer (sum to top-K, padding not counted) and the figure."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

import moh_convert
from moh_convert.analysis import count_head_selections, head_load, head_load_figure, prepare_padding
from moh_convert.cli import main

from .test_evaluate import REAL_EVAL_DATA, hf_layout_dir, tiny_models  # noqa: F401 (fixtures)

TEXTS = [
    "Question: Which tool measures mass?\nAnswer: a balance",
    "Hi",
    "The trophy doesn't fit into the suitcase because the trophy is too large.",
    "A much longer document than the others, so that a batch of them needs a lot of padding tokens at the end.",
    "Short one.",
]


def load_tiny(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prepare_padding(tokenizer)
    return model, tokenizer


def test_padding_tokens_are_not_counted(tiny_models):
    model, tokenizer = load_tiny(tiny_models["moh_3of4"])
    one_by_one, tokens_one_by_one = count_head_selections(model, tokenizer, TEXTS, batch_size=1)
    padded, tokens_padded = count_head_selections(model, tokenizer, TEXTS, batch_size=5)
    assert tokens_padded == tokens_one_by_one == sum(len(tokenizer(text)["input_ids"]) for text in TEXTS)
    for layer_one_by_one, layer_padded in zip(one_by_one, padded):
        assert layer_padded == pytest.approx(layer_one_by_one)
    # Every real token selects exactly top-K (= 2 of the 3 routed heads) in every layer.
    assert all(sum(layer) == pytest.approx(2 * tokens_padded) for layer in padded)
    assert all(routing.record_routing is False and routing.last_routed_mask is None for routing in model.head_routing)


def test_counts_are_the_routers_selections(tiny_models):
    model, tokenizer = load_tiny(tiny_models["moh_3of4"])
    counts, _ = count_head_selections(model, tokenizer, TEXTS[:1], batch_size=1)
    for routing in model.head_routing:
        routing.record_routing = True
    with torch.no_grad():
        model(**tokenizer(TEXTS[:1], return_tensors="pt"))
    for layer_counts, routing in zip(counts, model.head_routing):
        assert layer_counts == routing.last_routed_mask[0].sum(dim=0).tolist()


def test_heads_writes_one_panel_per_task_and_densities_summing_to_top_k(tiny_models, hf_layout_dir, tmp_path):
    output = tmp_path / "figures" / "heads.png"
    data = head_load(tiny_models["moh_3of4"], tasks="arc_easy,piqa,winogrande", data_dir=str(hf_layout_dir),
                     limit=3, output=str(output))
    assert json.loads(output.with_suffix(".json").read_text()) == data
    assert list(data["tasks"]) == ["arc_easy", "piqa", "winogrande"]
    assert data["routed_top_k"] == [2, 2] and data["plotted_layer"] == 1  # the last of 2 layers
    for task in data["tasks"].values():
        assert task["documents"] == 3 and task["tokens"] > 0
        assert [layer["layer"] for layer in task["layers"]] == [0, 1]
        for layer in task["layers"]:
            assert layer["routed_heads"] == [1, 2, 3]
            assert sum(layer["density"]) == pytest.approx(2.0)
            assert all(0.0 <= density <= 1.0 for density in layer["density"])
    with Image.open(output) as image:
        assert image.format == "PNG" and image.width > 600
    figure = head_load_figure(data, layer=1)
    visible = [axis for axis in figure.axes if axis.get_visible()]
    assert [axis.get_title().split(" ")[0] for axis in visible] == ["arc_easy", "piqa", "winogrande"]
    assert all(len(axis.patches) == 3 for axis in visible)  # one bar per routed head


def test_densities_sum_to_each_layers_own_top_k(tiny_models, hf_layout_dir, tmp_path):
    # Calibrated models keep a different number of routed heads per layer.
    import shutil

    folder = tmp_path / "per-layer-k"
    shutil.copytree(tiny_models["moh_3of4"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["routed_top_k"] = [1, 3]
    (folder / "config.json").write_text(json.dumps(config))
    data = head_load(folder, tasks="piqa", data_dir=str(hf_layout_dir), limit=3, output=str(tmp_path / "heads.png"))
    assert data["routed_top_k"] == [1, 3]
    layers = data["tasks"]["piqa"]["layers"]
    assert [layer["routed_top_k"] for layer in layers] == [1, 3]
    assert [sum(layer["density"]) for layer in layers] == [pytest.approx(1.0), pytest.approx(3.0)]
    assert layers[1]["density"] == [pytest.approx(1.0)] * 3  # top-3 of 3: every token selects every routed head


def test_heads_cli_layer_choice_and_errors(tiny_models, hf_layout_dir, tmp_path, capsys):
    code = main(["heads", str(tiny_models["moh_3of4"]), "--tasks", "piqa", "--data-dir", str(hf_layout_dir),
                 "--layer", "0", "--limit", "2", "--output", str(tmp_path / "heads.png")])
    assert code == 0 and (tmp_path / "heads.png").is_file()
    assert json.loads((tmp_path / "heads.json").read_text())["plotted_layer"] == 0
    assert "head load of layer 0 for piqa" in capsys.readouterr().out

    code = main(["heads", str(tiny_models["moh_3of4"]), "--tasks", "piqa", "--data-dir", str(hf_layout_dir),
                 "--layer", "5", "--output", str(tmp_path / "bad.png")])
    assert code == 2 and "--layer 5 is out of range: the model has 2 layers" in capsys.readouterr().err

    code = main(["heads", str(tiny_models["dense"]), "--tasks", "piqa", "--data-dir", str(hf_layout_dir),
                 "--output", str(tmp_path / "dense.png")])
    assert code == 2 and "not a MoH model" in capsys.readouterr().err


@pytest.mark.slow
def test_heads_on_converted_smollm2(smollm2_folder, tmp_path):
    moh = moh_convert.convert(smollm2_folder, tmp_path / "moh-6of9", active_heads=6, shared_heads=3, no_calibration=True)
    output = tmp_path / "heads.png"
    result = subprocess.run(
        [sys.executable, "-m", "moh_convert", "heads", str(moh), "--tasks", "arc_easy,lambada_openai",
         "--data-dir", str(REAL_EVAL_DATA), "--limit", "10", "--output", str(output)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(output.with_suffix(".json").read_text())
    assert data["plotted_layer"] == 29 and data["routed_top_k"] == [3] * 30
    for task in data["tasks"].values():
        assert len(task["layers"]) == 30 and task["documents"] == 10
        for layer in task["layers"]:
            assert len(layer["density"]) == 6 and sum(layer["density"]) == pytest.approx(3.0)
    with Image.open(output) as image:
        assert image.format == "PNG"
