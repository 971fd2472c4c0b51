"""Training text of four kinds for distillation runs, from documents that none of the evaluation kinds use
(benchmarks/text_kinds.py), so that recovery is measured on held-out documents of every kind:

    prose  WikiText-2 valid.txt articles            (evaluation: WikiText-2 test)
    math   GSM8K train worked solutions              (evaluation: GSM8K test)
    code   Python modules of installed packages that moh_convert depends on (transformers, accelerate, ...),
           never the standard library                (evaluation: the standard library)
    teacher  text the dense model writes itself: replies in its chat template to the prompts shipped with
           moh_convert, and free samples (the JSONL `moh train`'s `data: {generate: default}` writes)
                                                     (evaluation of chat: ARC-Easy / PIQA dialogues)

About `tokens_per_kind` tokens of each, documents interleaved kind by kind (so every stretch of training sees all
four kinds, not one kind after another) and written as one JSONL file that a recipe reads with `data: {path: ...}`.

    from benchmarks.training_mix import write_training_mix
    counts = write_training_mix(tokenizer, "../shared/data", "teacher-text.jsonl", "mix.jsonl", 32768)
"""
import importlib.util
import json
import random
from pathlib import Path

# Packages installed with moh_convert (its dependencies), so the code kind exists on every machine that runs it.
CODE_PACKAGES = ("transformers", "accelerate", "peft", "pydantic", "huggingface_hub", "safetensors", "yaml", "tqdm")
CODE_CHARS_PER_FILE = 3000  # the start of each module: many modules, each kind of code a little
CODE_FILES_PER_PACKAGE = 40


def prose_documents(data_dir: Path) -> list[str]:
    """WikiText-2 valid.txt, one document per article (a ' = Title = ' heading), short stubs left out."""
    text = (data_dir / "wikitext-2" / "valid.txt").read_text()
    return [" = " + article for article in text.split("\n = ") if len(article) > 2000]


def math_documents(data_dir: Path) -> list[str]:
    rows = [json.loads(line) for line in (data_dir / "eval" / "gsm8k_train.jsonl").read_text().split("\n") if line]
    return [f"Question: {row['question']}\nAnswer: {row['answer']}" for row in rows]


def code_documents(seed: int = 0) -> list[str]:
    """The first CODE_CHARS_PER_FILE characters of up to CODE_FILES_PER_PACKAGE modules (3-60 KB, not tests) of
    each installed package of CODE_PACKAGES, in a seeded order."""
    documents = []
    for package in CODE_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0])
        files = sorted(path for path in root.rglob("*.py")
                       if 3000 < path.stat().st_size < 60000 and "test" not in path.relative_to(root).as_posix())
        random.Random(seed).shuffle(files)
        documents += [path.read_text(errors="replace")[:CODE_CHARS_PER_FILE] for path in files[:CODE_FILES_PER_PACKAGE]]
    random.Random(seed + 1).shuffle(documents)
    return documents


def teacher_documents(teacher_text: Path) -> list[str]:
    return [json.loads(line)["text"] for line in teacher_text.read_text().split("\n") if line.strip()]


def _take(tokenizer, documents: list[str], tokens: int) -> list[str]:
    """Documents from the start until they hold `tokens` tokens."""
    taken, count = [], 0
    for document in documents:
        if count >= tokens:
            break
        taken.append(document)
        count += len(tokenizer(document, add_special_tokens=False)["input_ids"])
    return taken


def write_training_mix(tokenizer, data_dir: str | Path, teacher_text: str | Path, out: str | Path,
                       tokens_per_kind: int) -> dict[str, int]:
    """Writes the interleaved mix to `out` (JSONL, {"text": ...} per document); returns the documents per kind."""
    data_dir = Path(data_dir)
    kinds = {
        "prose": _take(tokenizer, prose_documents(data_dir), tokens_per_kind),
        "math": _take(tokenizer, math_documents(data_dir), tokens_per_kind),
        "code": _take(tokenizer, code_documents(), tokens_per_kind),
        "teacher": _take(tokenizer, teacher_documents(Path(teacher_text)), tokens_per_kind),
    }
    queues = [list(documents) for documents in kinds.values()]
    lines = []
    while any(queues):
        for queue in queues:
            if queue:
                lines.append(json.dumps({"text": queue.pop(0)}) + "\n")
    Path(out).write_text("".join(lines))
    return {kind: len(documents) for kind, documents in kinds.items()}
