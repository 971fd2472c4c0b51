"""`moh train` recipes: keys and types, `--set` overrides, and every check that must fail before a model loads."""
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from moh_convert import train as moh_train
from moh_convert.errors import MoHError

from .train_helpers import tiny_moh_models, tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def tiny_moh(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    return tiny_moh_models(tiny_checkpoints, tmp_path_factory.mktemp("train-tiny"))


@pytest.fixture
def no_model_loading(monkeypatch):
    """Recipe errors must come before any model is loaded: loading now fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the recipe was validated")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize(
    "changes, key, words",
    [
        ({"learning_rte": 1e-4}, "learning_rte", "valid keys: model, output_dir, data"),
        ({"data": {"path": "x.txt", "colum": "text"}}, "data.colum", "valid keys: path, dataset"),
        ({"data": {"path": "no-such-file.txt"}}, "data.path", "not found"),
        ({"data": {}}, "data", "exactly one of `path`"),
        ({"data": []}, "data", "at least one source"),
        ({"data": [{"generate": "default"}, {"path": "no-such-file.txt", "weight": 2}]}, "data.1.path", "not found"),
        ({"data": [{"generate": "default"}, {"path": "x.txt", "weight": 0}]}, "data.1.weight", "greater than 0"),
        ({"seq_len": 512}, "seq_len", "max_position_embeddings (256)"),
        ({"global_batch_tokens": 100}, "global_batch_tokens", "multiple of seq_len"),
        ({"global_batch_tokens": 32 * 6, "micro_batch_size": 4}, "global_batch_tokens", "micro_batch_size (4)"),
        ({"max_tokens": 1000}, "max_tokens", "exactly one"),
        ({"warmup_steps": 6}, "warmup_steps", "below the 6 training steps"),
        ({"trainable": "routers"}, "trainable", "parameter-free"),
        ({"trainable": "everything"}, "trainable", "'all', 'attention', 'routers' or 'lora'"),
        ({"trainable": "lora", "lora": {"save": "adapter", "target_modules": ["o_proj"]}}, "lora.target_modules",
         "o_proj"),
    ],
)
def test_bad_recipes_fail_before_loading_and_name_the_key(tiny_moh, tmp_path, no_model_loading, changes, key, words):
    recipe = tiny_recipe(tiny_moh["query-norm"], tiny_moh["text"], tmp_path / "run")
    data_changes = changes.pop("data", None)
    recipe.update(changes)
    if data_changes is not None:
        recipe["data"] = data_changes
    with pytest.raises(MoHError) as error:
        moh_train.train(recipe)
    assert f"'{key}'" in str(error.value) and words in str(error.value), str(error.value)


def test_set_overrides_are_yaml_values_and_reach_nested_keys(tiny_moh, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_moh["query-norm"], tiny_moh["text"], tmp_path / "run"))
    recipe = moh_train.load_recipe(path, ["max_steps=9", "lora.r=4", "lora.target_modules=[q_proj, v_proj]",
                                          "max_grad_norm=null"])
    assert (recipe.max_steps, recipe.lora.r, recipe.lora.target_modules, recipe.max_grad_norm) == (
        9, 4, ["q_proj", "v_proj"], None)
    with pytest.raises(MoHError, match="KEY=VALUE"):
        moh_train.load_recipe(path, ["max_steps"])
    with pytest.raises(MoHError, match="unknown recipe key 'lora.rank'"):
        moh_train.load_recipe(path, ["lora.rank=4"])


def test_data_lists_sources_with_weights_and_set_reaches_one_of_them(tiny_moh, tmp_path):
    """`data` is one source (a mapping, as before) or a list mixed by weight; `--set data.1.weight=3` edits one entry."""
    recipe = tiny_recipe(tiny_moh["query-norm"], tiny_moh["text"], tmp_path / "run")
    assert [source.path for source in moh_train.load_recipe(recipe).data] == [str(tiny_moh["text"])]
    recipe["data"] = [{"path": str(tiny_moh["text"])}, {"generate": "self", "weight": 0.5}]
    path = write_recipe(tmp_path / "r.yaml", recipe)
    loaded = moh_train.load_recipe(path, ["data.1.weight=3"])
    assert [(source.generate, source.weight) for source in loaded.data] == [(None, 1.0), ("self", 3.0)]
    assert loaded.data_keys() == ["data.0", "data.1"]
    with pytest.raises(MoHError, match="name a key inside one source"):
        moh_train.load_recipe(path, ["data.path=x.txt"])


def test_existing_checkpoints_need_resume(tiny_moh, tmp_path, no_model_loading):
    (tmp_path / "run" / "checkpoints" / "step-00000002").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-00000002" / "trainer_state.json").write_text("{}")
    with pytest.raises(MoHError, match="'output_dir'.*--resume"):
        moh_train.train(tiny_recipe(tiny_moh["query-norm"], tiny_moh["text"], tmp_path / "run"))
