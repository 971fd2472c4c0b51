"""`moh eval`: suites, local twins of lm-eval tasks (same prompts as the built-ins), results files and table.

Fast tests use tiny synthetic rows in the Hugging Face field layouts and tiny random models; tests marked slow
use the real SmolLM2-135M and the benchmark files in ../shared/data/eval (MOH_DATA_DIR overrides ../shared/data).
"""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

import moh_convert
from moh_convert.cli import main
from moh_convert.eval_tasks import (
    EvalOptions,
    TaskRequest,
    builtin_task_index,
    effective_shots,
    requested_tasks,
    write_local_tasks,
)
from moh_convert.evaluate import evaluate

REPO_ROOT = Path(__file__).resolve().parent.parent
REAL_EVAL_DATA = Path(os.environ.get("MOH_DATA_DIR", REPO_ROOT.parent / "shared" / "data")) / "eval"

# ---------------------------------------------------------------------------------------------------- synthetic data
# A few rows per task, written for these tests in the field layout of the HF data set each built-in task reads.

ARC_ROWS = [
    {"id": "t1", "question": "Which gas do plants take in from the air to make food?",
     "choices": {"text": ["oxygen", "carbon dioxide", "nitrogen", "helium"], "label": ["A", "B", "C", "D"]},
     "answerKey": "B"},
    {"id": "t2", "question": "What is the boiling point of water at sea level?",
     "choices": {"text": ["50 degrees C", "75 degrees C", "100 degrees C"], "label": ["1", "2", "3"]},
     "answerKey": "3"},
    {"id": "t3", "question": "Which tool measures mass?",
     "choices": {"text": ["a ruler", "a balance", "a thermometer", "a clock"], "label": ["A", "B", "C", "D"]},
     "answerKey": "B"},
    {"id": "t4", "question": "What makes the Moon shine?",
     "choices": {"text": ["its own fire", "reflected sunlight", "city lights", "lightning"], "label": ["A", "B", "C", "D"]},
     "answerKey": "B"},
]
PIQA_ROWS = [
    {"goal": "How do you open a stuck jar lid?", "sol1": "Run the lid under hot water, then twist.",
     "sol2": "Put the jar in the freezer, then twist.", "label": 0},
    {"goal": "Keep bread fresh longer", "sol1": "Leave it open on the counter.", "sol2": "Store it in a sealed bag.",
     "label": 1},
    {"goal": "How to cool soup quickly?", "sol1": "Stir it in a bowl set in ice water.", "sol2": "Cover it with a towel.",
     "label": 0},
    {"goal": "Remove a splinter", "sol1": "Pull it out with clean tweezers.", "sol2": "Push it deeper with a nail.",
     "label": 0},
]
WINOGRANDE_ROWS = [
    {"sentence": "The trophy doesn't fit into the suitcase because the _ is too large.", "option1": "trophy",
     "option2": "suitcase", "answer": "1"},
    {"sentence": "The trophy doesn't fit into the suitcase because the _ is too small.", "option1": "trophy",
     "option2": "suitcase", "answer": "2"},
    # Options with a common start ("Sam", "Samantha") are the tricky case for the partial-scoring layout.
    {"sentence": "Sam lent Samantha a book because _ had already read it.", "option1": "Sam", "option2": "Samantha",
     "answer": "1"},
]
# The same documents in lm-eval's partial-scoring form, as ../shared/data ships WinoGrande (written out by hand).
WINOGRANDE_PARTIAL_ROWS = [
    {"context_options": ["The trophy doesn't fit into the suitcase because the trophy",
                         "The trophy doesn't fit into the suitcase because the suitcase"],
     "continuation": "is too large.", "gold": 0},
    {"context_options": ["The trophy doesn't fit into the suitcase because the trophy",
                         "The trophy doesn't fit into the suitcase because the suitcase"],
     "continuation": "is too small.", "gold": 1},
    {"context_options": ["Sam lent Samantha a book because Sam", "Sam lent Samantha a book because Samantha"],
     "continuation": "had already read it.", "gold": 0},
]
HELLASWAG_ROWS = [
    {"ind": 1, "activity_label": "Baking cookies", "ctx_a": "A woman pours flour into a bowl.", "ctx_b": "she",
     "ctx": "A woman pours flour into a bowl. she", "source_id": "s1", "split": "val", "split_type": "indomain",
     "endings": ["adds two eggs and stirs.", "[title] paints the bowl blue.", "drives away.", "sings loudly."],
     "label": "0"},
    {"ind": 2, "activity_label": "Washing a car", "ctx_a": "A man sprays the car with water.", "ctx_b": "then he",
     "ctx": "A man sprays the car with water. then he", "source_id": "s2", "split": "val", "split_type": "indomain",
     "endings": ["eats the sponge.", "scrubs the doors with soap.", "flies off.", "reads a novel."], "label": "1"},
    {"ind": 3, "activity_label": "Running", "ctx_a": "A girl ties her shoes.", "ctx_b": "she",
     "ctx": "A girl ties her shoes. she", "source_id": "s3", "split": "val", "split_type": "indomain",
     "endings": ["jogs down the road.", "melts.", "becomes a tree.", "folds the road."], "label": "0"},
]
# The same documents already preprocessed by lm-eval's hellaswag process_docs (query, choices, label): the layout
# of ../shared/data's hellaswag_validation_approx.jsonl, written out by hand.
HELLASWAG_PREPROCESSED_ROWS = [
    {"query": "Baking cookies: A woman pours flour into a bowl. She",
     "choices": ["adds two eggs and stirs.", " paints the bowl blue.", "drives away.", "sings loudly."], "label": 0},
    {"query": "Washing a car: A man sprays the car with water. Then he",
     "choices": ["eats the sponge.", "scrubs the doors with soap.", "flies off.", "reads a novel."], "label": 1},
    {"query": "Running: A girl ties her shoes. She",
     "choices": ["jogs down the road.", "melts.", "becomes a tree.", "folds the road."], "label": 0},
]
LAMBADA_ROWS = [
    {"text": "She opened the door and the cat ran straight into the garden"},
    {"text": "After the long winter the farmers finally planted their wheat"},
]
GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 2 more. How many apples does he have?",
     "answer": "Tom has 3 + 2 = <<3+2=5>>5 apples.\n#### 5"},
    {"question": "A box holds 4 pens. How many pens are in 3 boxes?", "answer": "3 * 4 = <<3*4=12>>12 pens.\n#### 12"},
    {"question": "Ann reads 10 pages a day. How many pages in a week?", "answer": "10 * 7 = <<10*7=70>>70.\n#### 70"},
    {"question": "A bus has 30 seats and 12 are taken. How many are free?", "answer": "30 - 12 = <<30-12=18>>18.\n#### 18"},
]
MMLU_ROWS = [
    {"question": "Which organelle makes ATP?", "subject": "college_biology",
     "choices": ["ribosome", "mitochondrion", "nucleus", "vacuole"], "answer": 1},
    {"question": "DNA is made of which units?", "subject": "college_biology",
     "choices": ["amino acids", "fatty acids", "nucleotides", "sugars only"], "answer": 2},
    {"question": "Which molecule carries amino acids to the ribosome?", "subject": "college_biology",
     "choices": ["tRNA", "mRNA", "rRNA", "DNA"], "answer": 0},
]

# File name -> rows, laid out as in ../shared/data/eval (train splits added so few-shot prompts can be compared).
HF_LAYOUT_FILES = {
    "arc_easy_test.jsonl": ARC_ROWS,
    "arc_easy_train.jsonl": ARC_ROWS[::-1],
    "piqa_validation.jsonl": PIQA_ROWS,
    "piqa_train.jsonl": PIQA_ROWS[::-1],
    "winogrande_validation.jsonl": WINOGRANDE_ROWS,
    "hellaswag_validation.jsonl": HELLASWAG_ROWS,
    "hellaswag_train.jsonl": HELLASWAG_ROWS[::-1],
    "lambada_openai_test.jsonl": LAMBADA_ROWS,
    "gsm8k_test.jsonl": GSM8K_ROWS[:2],
    "gsm8k_train.jsonl": GSM8K_ROWS,
    "mmlu/college_biology_test.jsonl": MMLU_ROWS,
    "mmlu/college_biology_dev.jsonl": MMLU_ROWS[::-1],
}
# The built-in task's splits, as the HF data set would give them (the built-in loads every split it declares).
BUILTIN_SPLITS = {
    "arc_easy": {"train": ARC_ROWS[::-1], "validation": ARC_ROWS, "test": ARC_ROWS},
    "piqa": {"train": PIQA_ROWS[::-1], "validation": PIQA_ROWS},
    "winogrande": {"train": WINOGRANDE_ROWS, "validation": WINOGRANDE_ROWS},
    "hellaswag": {"train": HELLASWAG_ROWS[::-1], "validation": HELLASWAG_ROWS},
    "lambada_openai": {"test": LAMBADA_ROWS},
    "gsm8k": {"train": GSM8K_ROWS, "test": GSM8K_ROWS[:2]},
    "mmlu_college_biology": {"dev": MMLU_ROWS[::-1], "test": MMLU_ROWS},
}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_data_dir(folder: Path, files: dict[str, list[dict]]) -> Path:
    for name, rows in files.items():
        write_jsonl(folder / name, rows)
    return folder


@pytest.fixture(scope="module")
def hf_layout_dir(tmp_path_factory) -> Path:
    return write_data_dir(tmp_path_factory.mktemp("eval-data"), HF_LAYOUT_FILES)


# ---------------------------------------------------------------------------------------------------- built-in vs twin


def builtin_task(task_name: str, splits: dict[str, list[dict]]):
    """The built-in task exactly as lm-eval's own YAML defines it, fed `splits` instead of downloading its data."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(builtin_task_index()[task_name].yaml_path, resolve_func=True)
    for structural_key in ("tag", "group", "task_list"):  # as lm-eval's TaskFactory does before building a task
        config.pop(structural_key, None)
    dataset = datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in splits.items()})
    return ConfigurableTask(config={**config, "custom_dataset": lambda **kwargs: dataset})


def twin_task(task_name: str, data_dir: Path, twins_folder: Path, num_fewshot: int):
    from lm_eval.tasks import TaskManager

    write_local_tasks([TaskRequest(task_name, num_fewshot)], data_dir, twins_folder)
    manager = TaskManager(include_path=str(twins_folder), include_defaults=False)
    return manager.load([task_name])["tasks"][task_name]


def requests_of(task, num_fewshot: int) -> list[tuple]:
    """Every request lm-eval would send to a model: (document, request index, arguments: prompt + continuation)."""
    task.set_config(key="num_fewshot", value=num_fewshot)
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests()
    return [(instance.doc_id, instance.idx, instance.arguments) for instance in task.instances]


def prompt_parts(task) -> list[tuple]:
    """doc_to_text, doc_to_choice, doc_to_target of every document the task is scored on."""
    choices = task.doc_to_choice if task.config.doc_to_choice is not None else (lambda doc: None)
    return [(task.doc_to_text(doc), choices(doc), task.doc_to_target(doc)) for doc in task.eval_docs]


def assert_same_task(twin, builtin, num_fewshot: int) -> None:
    assert prompt_parts(twin) == prompt_parts(builtin)
    twin_requests = requests_of(twin, num_fewshot)
    assert twin_requests == requests_of(builtin, num_fewshot)
    assert twin_requests, "no requests were built"
    assert twin.OUTPUT_TYPE == builtin.OUTPUT_TYPE
    assert twin.config.metric_list == builtin.config.metric_list
    assert twin.aggregation().keys() == builtin.aggregation().keys()
    assert twin.config.filter_list == builtin.config.filter_list


@pytest.mark.parametrize(
    "task_name, num_fewshot",
    [
        ("arc_easy", 0), ("arc_easy", 2), ("piqa", 0), ("piqa", 2), ("winogrande", 0), ("hellaswag", 0),
        ("hellaswag", 2), ("lambada_openai", 0), ("gsm8k", 2), ("mmlu_college_biology", 2),
    ],
)
def test_twin_sends_the_builtin_tasks_requests(task_name, num_fewshot, hf_layout_dir, tmp_path):
    twin = twin_task(task_name, hf_layout_dir, tmp_path / "twins", num_fewshot)
    builtin = builtin_task(task_name, BUILTIN_SPLITS[task_name])
    assert twin.config.dataset_path == "json" and builtin.config.dataset_path != "json"
    assert_same_task(twin, builtin, num_fewshot)


def test_twin_prompts_contain_the_documents(hf_layout_dir, tmp_path):
    # Guards the comparison above against both sides being equally empty or wrong.
    twin = twin_task("arc_easy", hf_layout_dir, tmp_path / "twins", 0)
    context, continuation = requests_of(twin, 0)[1][2]
    assert context == f"Question: {ARC_ROWS[0]['question']}\nAnswer:" and continuation == " carbon dioxide"


def test_winogrande_partial_scoring_rows_give_the_builtin_requests(tmp_path):
    data_dir = write_data_dir(tmp_path / "data", {"winogrande_validation.jsonl": WINOGRANDE_PARTIAL_ROWS})
    twin = twin_task("winogrande", data_dir, tmp_path / "twins", 0)
    assert_same_task(twin, builtin_task("winogrande", BUILTIN_SPLITS["winogrande"]), 0)


def test_hellaswag_preprocessed_rows_give_the_builtin_requests(tmp_path):
    # ../shared/data names these files *_approx.jsonl: found through hellaswag's extra file pattern.
    data_dir = write_data_dir(tmp_path / "data", {"hellaswag_validation_approx.jsonl": HELLASWAG_PREPROCESSED_ROWS})
    twin = twin_task("hellaswag", data_dir, tmp_path / "twins", 0)
    assert_same_task(twin, builtin_task("hellaswag", BUILTIN_SPLITS["hellaswag"]), 0)


def test_group_runs_over_the_twins_of_its_tasks(tmp_path):
    from lm_eval.tasks import TaskManager

    # mmlu_stem is a group over a tag; give every one of its tasks a file with the rows above.
    index = builtin_task_index()
    subjects = [name.removeprefix("mmlu_") for name in sorted(index["mmlu_stem_tasks"].tags)]
    files = {f"mmlu/{subject}_{split}.jsonl": MMLU_ROWS for subject in subjects for split in ("test", "dev")}
    twins = write_local_tasks([TaskRequest("mmlu_stem", 0)], write_data_dir(tmp_path / "data", files), tmp_path / "twins")
    built = TaskManager(include_path=str(twins), include_defaults=False).load(["mmlu_stem"])
    assert "mmlu_stem" in built["groups"]
    assert sorted(built["tasks"]) == [f"mmlu_{subject}" for subject in subjects]
    assert all(task.config.dataset_path == "json" for task in built["tasks"].values())


# ---------------------------------------------------------------------------------------------------- twin errors


def test_missing_task_file_is_named(tmp_path):
    data_dir = write_data_dir(tmp_path / "data", {"piqa_validation.jsonl": PIQA_ROWS})
    with pytest.raises(moh_convert.MoHError, match=r"no local data for arc_easy .*split 'test'.*arc_easy_test\.jsonl"):
        write_local_tasks([TaskRequest("arc_easy", 0)], data_dir, tmp_path / "twins")


def test_fewshot_split_is_needed_only_with_fewshot_prompts(tmp_path):
    data_dir = write_data_dir(tmp_path / "data", {"piqa_validation.jsonl": PIQA_ROWS})
    twins = write_local_tasks([TaskRequest("piqa", 0)], data_dir, tmp_path / "zero-shot")
    assert "training_split: null" in (twins / "piqa.yaml").read_text()
    with pytest.raises(moh_convert.MoHError, match=r"its 3-shot examples, split 'train'.*piqa_train\.jsonl"):
        write_local_tasks([TaskRequest("piqa", 3)], data_dir, tmp_path / "three-shot")


def test_unknown_task_and_missing_data_dir_are_errors(tmp_path):
    with pytest.raises(moh_convert.MoHError, match="unknown lm-eval task 'no_such_task'"):
        write_local_tasks([TaskRequest("no_such_task", 0)], tmp_path, tmp_path / "twins")
    with pytest.raises(moh_convert.MoHError, match="is not a folder"):
        write_local_tasks([TaskRequest("piqa", 0)], tmp_path / "absent", tmp_path / "twins")


def test_file_in_the_wrong_field_layout_is_a_one_line_error(tmp_path):
    from moh_convert.eval_tasks import load_tasks, task_manager_for

    data_dir = write_data_dir(tmp_path / "data", {"piqa_validation.jsonl": ARC_ROWS})  # ARC rows under PIQA's name
    requests = [TaskRequest("piqa", 0)]
    manager = task_manager_for(requests, str(data_dir), tmp_path / "twins")
    with pytest.raises(moh_convert.MoHError, match="documents of piqa lack a field .*'goal' is undefined"):
        load_tasks(manager, requests)


# ---------------------------------------------------------------------------------------------------- suites


def test_paper_suite_has_the_papers_tasks_and_fewshot_counts():
    requests = requested_tasks(EvalOptions(suite="paper"))
    assert {request.name: request.num_fewshot for request in requests} == {
        "mmlu": 5, "ceval-valid": 5, "cmmlu": 5, "gsm8k": 8, "truthfulqa_mc2": 0, "hellaswag": 10, "logiqa": 0,
        "boolq": 32, "lambada_openai": 0, "sciq": 0, "piqa": 0, "winogrande": 0, "nq_open": 32, "arc_challenge": 25,
    }
    index = builtin_task_index()
    assert all(request.name in index for request in requests), "every suite task must exist in lm-eval"


def test_commonsense_suite_and_default_quick_suite():
    commonsense = requested_tasks(EvalOptions(suite="commonsense"))
    assert [(r.name, r.num_fewshot) for r in commonsense] == [
        ("sciq", 0), ("piqa", 0), ("winogrande", 0), ("openbookqa", 0), ("logiqa", 0), ("truthfulqa_mc2", 0)]
    assert requested_tasks(EvalOptions()) == requested_tasks(EvalOptions(suite="quick"))


def test_num_fewshot_overrides_the_suite_but_not_a_pinned_zero_shot_task():
    requests = requested_tasks(EvalOptions(suite="paper", num_fewshot=1))
    assert {request.num_fewshot for request in requests} == {1}
    assert effective_shots(requested=5, task_default=0) == 0  # truthfulqa pins 0 shots, as lm-eval keeps it
    assert effective_shots(requested=None, task_default=5) == 5 and effective_shots(None, None) == 0


def test_task_list_and_suite_options():
    assert [r.name for r in requested_tasks(EvalOptions(tasks="arc_easy, piqa"))] == ["arc_easy", "piqa"]
    with pytest.raises(moh_convert.MoHError, match="either --suite or --tasks"):
        requested_tasks(EvalOptions(suite="quick", tasks=["piqa"]))
    with pytest.raises(moh_convert.MoHError, match="unknown suite 'nope'; choose one of paper, commonsense, quick"):
        requested_tasks(EvalOptions(suite="nope"))


# ---------------------------------------------------------------------------------------------------- tiny models


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character tokenizer whose ids fit the tiny models' 128-token vocabulary (pad 0, bos 1, eos 2 as theirs)."""
    from tokenizers import Tokenizer, models

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    characters = [chr(code) for code in range(32, 127)] + ["\n"]
    vocab = {token: index for index, token in enumerate(specials + characters)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tiny_models(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """A tiny llama with a tokenizer ("dense"), and its MoH conversions at 3 of 4 heads and at all 4 heads."""
    import shutil

    root = tmp_path_factory.mktemp("tiny-eval-models")
    dense = root / "dense"
    shutil.copytree(tiny_checkpoints["llama"], dense)
    char_tokenizer().save_pretrained(dense)
    # lm-eval generates up to 256 tokens and needs a longer context than that; llama's rotary positions have no
    # weights, so raising the limit changes nothing else.
    config = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    return {
        "dense": dense,
        "moh_3of4": moh_convert.convert(dense, root / "moh-3of4", active_heads=3, shared_heads=1, no_calibration=True),
        "moh_4of4": moh_convert.convert(dense, root / "moh-4of4", active_heads=4, shared_heads=2, no_calibration=True),
    }


COMPARISON_KEYS = {"model", "baseline", "active_heads_fraction", "tasks", "average"}
ROW_KEYS = {"task", "metric", "num_fewshot", "moh", "baseline"}


def test_evaluate_writes_results_comparison_and_table(tiny_models, hf_layout_dir, tmp_path):
    out = tmp_path / "eval"
    comparison = evaluate(
        tiny_models["moh_3of4"], baseline=str(tiny_models["dense"]), tasks="arc_easy,piqa,winogrande",
        data_dir=str(hf_layout_dir), limit=3, batch_size=4, output=str(out),
    )
    assert json.loads((out / "comparison.json").read_text()) == comparison
    assert set(comparison) == COMPARISON_KEYS
    assert comparison["baseline"] == str(tiny_models["dense"])
    assert comparison["active_heads_fraction"] == pytest.approx(0.75)
    assert [row["task"] for row in comparison["tasks"]] == ["arc_easy", "piqa", "winogrande"]
    assert [row["metric"] for row in comparison["tasks"]] == ["acc_norm", "acc_norm", "acc"]
    moh_results = json.loads((out / "results_moh.json").read_text())
    baseline_results = json.loads((out / "results_baseline.json").read_text())
    for row in comparison["tasks"]:
        assert set(row) == ROW_KEYS and row["num_fewshot"] == 0
        assert row["moh"] == pytest.approx(100 * moh_results["results"][row["task"]][row["metric"] + ",none"])
        assert row["baseline"] == pytest.approx(100 * baseline_results["results"][row["task"]][row["metric"] + ",none"])
        assert moh_results["n-samples"][row["task"]]["effective"] == 3
    assert comparison["average"]["moh"] == pytest.approx(statistics.fmean(row["moh"] for row in comparison["tasks"]))
    table = (out / "results_table.md").read_text()
    assert "| task | metric | shots | baseline (100% heads) | MoH (75% heads) | Δ |" in table
    assert "| **average** |" in table and "| piqa | acc_norm | 0 |" in table
    assert (out / "local_tasks" / "piqa.yaml").is_file()


def test_all_heads_active_scores_exactly_like_the_baseline(tiny_models, hf_layout_dir, tmp_path):
    comparison = evaluate(
        tiny_models["moh_4of4"], baseline=str(tiny_models["dense"]), tasks=["arc_easy", "lambada_openai"],
        data_dir=str(hf_layout_dir), batch_size=2, output=str(tmp_path / "eval"),
    )
    assert comparison["active_heads_fraction"] == 1.0
    for row in comparison["tasks"]:
        assert row["moh"] == row["baseline"], row
    moh_results = json.loads((tmp_path / "eval" / "results_moh.json").read_text())
    baseline_results = json.loads((tmp_path / "eval" / "results_baseline.json").read_text())
    # lambada's perplexity is a continuous score: equal only if every log-likelihood is.
    assert moh_results["results"]["lambada_openai"]["perplexity,none"] == pytest.approx(
        baseline_results["results"]["lambada_openai"]["perplexity,none"], rel=1e-6)


def test_generation_task_with_fewshot_examples(tiny_models, hf_layout_dir, tmp_path):
    # gsm8k generates an answer (KV-cached decoding through the MoH hooks) and is scored through a filter.
    comparison = evaluate(
        tiny_models["moh_4of4"], baseline=str(tiny_models["dense"]), tasks="gsm8k", num_fewshot=2,
        data_dir=str(hf_layout_dir), limit=1, output=str(tmp_path / "eval"),
    )
    [row] = comparison["tasks"]
    assert (row["metric"], row["num_fewshot"]) == ("exact_match,strict-match", 2)
    assert row["moh"] == row["baseline"]
    results = json.loads((tmp_path / "eval" / "results_moh.json").read_text())
    assert results["n-shot"]["gsm8k"] == 2 and results["configs"]["gsm8k"]["output_type"] == "generate_until"


def test_without_baseline_the_table_has_only_the_model(tiny_models, hf_layout_dir, tmp_path):
    comparison = evaluate(tiny_models["moh_3of4"], tasks="piqa", data_dir=str(hf_layout_dir), limit=2,
                          output=str(tmp_path / "eval"))
    assert comparison["baseline"] is None and comparison["tasks"][0]["baseline"] is None
    assert comparison["average"]["baseline"] is None
    assert not (tmp_path / "eval" / "results_baseline.json").exists()
    assert "| task | metric | shots | MoH (75% heads) |" in (tmp_path / "eval" / "results_table.md").read_text()


def test_cli_prints_the_table(tiny_models, hf_layout_dir, tmp_path, capsys):
    code = main(["eval", str(tiny_models["moh_3of4"]), "--baseline", str(tiny_models["dense"]), "--tasks", "piqa",
                 "--data-dir", str(hf_layout_dir), "--limit", "2", "--output", str(tmp_path / "eval")])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "| piqa | acc_norm | 0 |" in stdout and "| **average** |" in stdout
    assert (tmp_path / "eval" / "comparison.json").is_file()


def test_cli_missing_data_is_one_line_exit_2(tiny_models, tmp_path, capsys):
    code = main(["eval", str(tiny_models["moh_3of4"]), "--tasks", "piqa", "--data-dir", str(tmp_path),
                 "--output", str(tmp_path / "eval")])
    assert code == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("moh eval: error: no local data for piqa")
    assert str(tmp_path / "piqa_validation.jsonl") in stderr[0]


def test_eval_help_explains_flags_and_suites():
    result = subprocess.run([sys.executable, "-m", "moh_convert", "eval", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ("--baseline", "--suite", "--tasks", "--num-fewshot", "--limit", "--data-dir", "--batch-size", "--output"):
        assert flag in result.stdout
    assert "paper: mmlu(5), ceval-valid(5)" in result.stdout and "local_tasks" in result.stdout


# ---------------------------------------------------------------------------------------------------- real model (slow)


def first_rows(path: Path, count: int) -> list[dict]:
    with path.open() as lines:
        return [json.loads(line) for line, _ in zip(lines, range(count))]


# Acceptance: on the real files of ../shared/data/eval, each local twin builds the built-in task's prompts and choices.
@pytest.mark.slow
@pytest.mark.parametrize(
    "task_name, files, num_fewshot",
    [
        ("arc_easy", {"test": "arc_easy_test.jsonl"}, 0),
        ("piqa", {"validation": "piqa_validation.jsonl"}, 0),
        ("lambada_openai", {"test": "lambada_openai_test.jsonl"}, 0),
        ("gsm8k", {"test": "gsm8k_test.jsonl", "train": "gsm8k_train.jsonl"}, 3),
        ("mmlu_philosophy", {"test": "mmlu/philosophy_test.jsonl", "dev": "mmlu/philosophy_dev.jsonl"}, 5),
    ],
)
def test_twin_of_shared_data_builds_the_builtin_prompts(task_name, files, num_fewshot, tmp_path):
    splits = {split: first_rows(REAL_EVAL_DATA / name, 25) for split, name in files.items()}
    data_dir = write_data_dir(tmp_path / "data", {name: splits[split] for split, name in files.items()})
    twin = twin_task(task_name, data_dir, tmp_path / "twins", num_fewshot)
    # The built-in loads every split it declares; splits the shared data lacks (unused here) repeat the scored rows.
    scored_rows = next(iter(splits.values()))
    builtin_splits = {**{split: scored_rows for split in ("train", "validation", "test")}, **splits}
    assert_same_task(twin, builtin_task(task_name, builtin_splits), num_fewshot)


@pytest.mark.slow
def test_twins_of_preprocessed_shared_data_score_the_rows_own_prompts(tmp_path):
    # The shared WinoGrande and HellaSwag files hold the prompts lm-eval's built-ins derive (partial-scoring contexts
    # and continuation; preprocessed query and endings): the twins must send exactly those.
    winogrande_rows = first_rows(REAL_EVAL_DATA / "winogrande_validation.jsonl", 25)
    hellaswag_rows = first_rows(REAL_EVAL_DATA / "hellaswag_validation_approx.jsonl", 25)
    data_dir = write_data_dir(tmp_path / "data", {
        "winogrande_validation.jsonl": winogrande_rows, "hellaswag_validation_approx.jsonl": hellaswag_rows})

    winogrande = requests_of(twin_task("winogrande", data_dir, tmp_path / "winogrande", 0), 0)
    expected = [(doc_id, choice, (context, " " + row["continuation"]))
                for doc_id, row in enumerate(winogrande_rows) for choice, context in enumerate(row["context_options"])]
    assert winogrande == expected

    hellaswag = requests_of(twin_task("hellaswag", data_dir, tmp_path / "hellaswag", 0), 0)
    expected = [(doc_id, choice, (row["query"], " " + ending))
                for doc_id, row in enumerate(hellaswag_rows) for choice, ending in enumerate(row["choices"])]
    assert hellaswag == expected


@pytest.mark.slow
def test_quick_suite_runs_offline_from_the_shared_data(tmp_path):
    twins = write_local_tasks(requested_tasks(EvalOptions(suite="quick")), REAL_EVAL_DATA, tmp_path / "twins")
    assert sorted(path.stem for path in twins.glob("*.yaml")) == sorted(
        ["arc_easy", "piqa", "winogrande", "hellaswag", "lambada_openai"])


@pytest.mark.slow
def test_dense_smollm2_scores_above_chance(smollm2_folder, tmp_path):
    comparison = evaluate(smollm2_folder, tasks="arc_easy,piqa", data_dir=str(REAL_EVAL_DATA), limit=100,
                          output=str(tmp_path / "eval"))
    assert comparison["active_heads_fraction"] == 1.0  # a dense model
    scores = {row["task"]: row["moh"] for row in comparison["tasks"]}
    # Chance: 4 choices (ARC-Easy; a few questions have 3 or 5) and 2 (PIQA). 100 documents: stderr about 5 points.
    assert scores["arc_easy"] > 25 + 10, scores
    assert scores["piqa"] > 50 + 8, scores


@pytest.mark.slow
def test_moh_eval_cli_on_converted_smollm2(smollm2_folder, tmp_path):
    moh = moh_convert.convert(smollm2_folder, tmp_path / "moh-6of9", active_heads=6, shared_heads=3, no_calibration=True)
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "moh_convert", "eval", str(moh), "--baseline", str(smollm2_folder), "--data-dir",
         str(REAL_EVAL_DATA), "--tasks", "winogrande,lambada_openai", "--limit", "10", "--output", str(out)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| winogrande | acc | 0 |" in result.stdout and "MoH (67% heads)" in result.stdout
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["active_heads_fraction"] == pytest.approx(6 / 9)
    assert all(0 <= row["moh"] <= 100 and 0 <= row["baseline"] <= 100 for row in comparison["tasks"])
    assert (out / "results_moh.json").is_file() and (out / "results_baseline.json").is_file()


# The plain lm-eval command line on a converted folder: remote code only (this process never imports moh_convert).
@pytest.mark.slow
def test_plain_lm_eval_cli_runs_a_converted_model(smollm2_folder, tmp_path):
    moh = moh_convert.convert(smollm2_folder, tmp_path / "moh-6of9", active_heads=6, shared_heads=3, no_calibration=True)
    twins = write_local_tasks(["arc_easy"], REAL_EVAL_DATA, tmp_path / "local_tasks")
    result = subprocess.run(
        ["lm_eval", "--model", "hf", "--model_args", f"pretrained={moh},trust_remote_code=True,dtype=float32",
         "--tasks", "arc_easy", "--include_path", str(twins), "--device", "cpu", "--batch_size", "8",
         "--limit", "20", "--output_path", str(tmp_path / "lm-eval-out")],
        capture_output=True, text=True, cwd=tmp_path, stdin=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "HF_MODULES_CACHE": str(tmp_path / "hf-modules")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [results_file] = (tmp_path / "lm-eval-out").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["n-samples"]["arc_easy"]["effective"] == 20
    assert 0 <= results["results"]["arc_easy"]["acc,none"] <= 1
    assert results["configs"]["arc_easy"]["dataset_path"] == "json"
