"""Field-layout adapters for local twins of lm-eval tasks (see local_tasks.yaml).

`moh eval --data-dir` copies this file next to the twin YAMLs it generates; each function is a task's
`process_docs` and accepts either the Hugging Face layout the built-in task reads or the alternative layout of
local files, returning documents the built-in task's own prompt functions read unchanged.
"""
import os


def hellaswag_docs(dataset):
    """Rowan/hellaswag rows (ctx_a, ctx_b, endings, ...) go through lm-eval's own preprocessing; rows that are
    already preprocessed (query, choices, label) are used as they are."""
    if "ctx_a" in dataset.column_names:
        from lm_eval.tasks.hellaswag.utils import process_docs

        return process_docs(dataset)
    return dataset


def winogrande_docs(dataset):
    """allenai/winogrande rows (sentence, option1, option2, answer) are used as they are; rows in lm-eval's
    partial-scoring form (context_options, continuation, gold) become an equivalent sentence with a blank.

    The built-in task scores `sentence[:blank] + option` as context and the text after the blank as continuation.
    The two contexts differ only in the option, so their common prefix is the text before the blank (possibly
    plus a common start of both options, which yields the same contexts) and the rest of each is its option.
    """
    if "sentence" in dataset.column_names:
        return dataset
    return dataset.map(_winogrande_sentence_from_partial_scoring)


def _winogrande_sentence_from_partial_scoring(doc):
    first, second = doc["context_options"]
    before_blank = os.path.commonprefix([first, second])
    return {
        "sentence": f"{before_blank}_ {doc['continuation']}",
        "option1": first[len(before_blank):],
        "option2": second[len(before_blank):],
        "answer": str(int(doc["gold"]) + 1),
    }
