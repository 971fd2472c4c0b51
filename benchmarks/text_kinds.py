"""Evaluation windows for four kinds of text, each from real documents that no default of the toolkit calibrates on.

    prose  WikiText-2 test.txt (the windows `moh_convert.perplexity.wikitext_windows` cuts)
    chat   ARC-Easy test and PIQA validation questions with their correct answers, as multi-turn dialogues in the
           tokenizer's own chat template (no generation prompt); a plain "User: ...\\nAssistant: ..." layout when
           the tokenizer has no template
    math   GSM8K test worked solutions, "Question: ...\\nAnswer: ..." (the dataset's own answer text)
    code   excerpts of 30 pure-Python modules of the running interpreter's standard library

Every kind is a fixed, ordered list of documents (no randomness), joined into one text, tokenized once (no special
tokens added) and cut into non-overlapping windows of `window` tokens; the first `max_windows` are used.

    from benchmarks.text_kinds import text_kind_windows
    windows = text_kind_windows(tokenizer, "../shared/data")          # {"prose": LongTensor [24, 512], ...}

Calibration defaults read none of these documents: the default mix is 'chat' (text the model writes itself),
'prose' (WikiText-2 valid articles), 'math' (GSM8K train problems) and 'code' (modules of installed packages, not
the standard library). Data folder layout: ../shared/data (wikitext-2/, eval/).
"""
import ast
import json
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

KINDS = ("prose", "chat", "math", "code")
TURNS_PER_DIALOGUE = 4  # question/answer pairs per chat dialogue
CODE_CHARS_PER_FILE = 1500  # about how much of each module the code kind takes (cut at a def/class boundary): with
# SmolLM2's tokenizer ~16.7K tokens in all, so 24 windows of 512 reach 23 of the 30 modules and leave headroom for
# tokenizers that need fewer tokens for code
# Pure-Python modules present as single files in every CPython from 3.10 on (none removed by PEP 594 / 3.12, none
# turned into a package: not string, zipfile, pathlib, re, gzip), 6-100 KB each, sorted.
CODE_MODULES = (
    "argparse.py", "calendar.py", "configparser.py", "contextlib.py", "copy.py", "csv.py", "dataclasses.py",
    "difflib.py", "enum.py", "filecmp.py", "fileinput.py", "fractions.py", "ftplib.py", "functools.py",
    "gettext.py", "heapq.py", "ipaddress.py", "mimetypes.py", "optparse.py", "pprint.py", "selectors.py",
    "shlex.py", "shutil.py", "smtplib.py", "statistics.py", "tempfile.py", "textwrap.py", "timeit.py",
    "tokenize.py", "uuid.py",
)


@dataclass
class TextKind:
    """One kind of text: the joined `text`, the files it comes from, and where each document starts in it."""

    name: str
    text: str
    sources: list[str]
    description: str
    doc_starts: list[int] = field(repr=False)  # character offset of each document in `text`, ascending

    @property
    def documents(self) -> int:
        return len(self.doc_starts)


@dataclass
class KindWindows:
    """The windows cut from one kind of text and how much of the text they cover."""

    kind: TextKind
    windows: torch.Tensor  # LongTensor [num_windows, window]
    tokens_available: int  # tokens of the whole text
    documents_used: int | None  # documents the windows reach into (None: a slow tokenizer gives no offsets)

    @property
    def tokens_used(self) -> int:
        return self.windows.numel()


# ---------------------------------------------------------------- the texts


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass the data folder that holds eval/{path.name}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _join(documents: list[str], separator: str) -> tuple[str, list[int]]:
    """The documents joined by `separator`, and each one's start offset in the result."""
    starts, position = [], 0
    for document in documents:
        starts.append(position)
        position += len(document) + len(separator)
    return separator.join(documents), starts


def prose_text(data_dir: str | Path) -> TextKind:
    """WikiText-2 test.txt exactly as `wikitext_windows` reads it; a document is an article (a ' = Title = ' line)."""
    path = Path(data_dir) / "wikitext-2" / "test.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass the data folder that holds wikitext-2/test.txt")
    text = path.read_text()
    starts = [match.start() for match in re.finditer(r"^ = [^=].* = $", text, flags=re.MULTILINE)] or [0]
    starts[0] = 0  # the text before the first title belongs to the first article
    return TextKind("prose", text, ["wikitext-2/test.txt"],
                    f"WikiText-2 test.txt, {len(starts)} articles in file order", starts)


def _sentence(text: str) -> str:
    """The dataset's text as the end of a sentence: stripped, with a full stop unless it already ends in one."""
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def chat_pairs(data_dir: str | Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(question, reply) pairs of ARC-Easy test and of PIQA validation, in file order. Replies are the datasets'
    own text: 'The answer is: <correct choice>.' for ARC (the question lists its choices), the correct solution
    for PIQA."""
    data_dir = Path(data_dir)
    arc = []
    for row in _read_jsonl(data_dir / "eval" / "arc_easy_test.jsonl"):
        labels, texts = row["choices"]["label"], row["choices"]["text"]
        if row["answerKey"] not in labels:
            continue
        choices = "\n".join(f"{label}. {text.strip()}" for label, text in zip(labels, texts))
        answer = texts[labels.index(row["answerKey"])]
        arc.append((f"{row['question'].strip()}\n{choices}", "The answer is: " + _sentence(answer)))
    piqa = []
    for row in _read_jsonl(data_dir / "eval" / "piqa_validation.jsonl"):
        goal, solution = row["goal"].strip(), row[f"sol{int(row['label']) + 1}"].strip()
        if goal and solution:
            piqa.append((goal, solution))
    return arc, piqa


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_dialogue(tokenizer, pairs: list[tuple[str, str]]) -> str:
    """One dialogue of several question/answer turns: in the tokenizer's chat template (no generation prompt), or
    'User: ...\\nAssistant: ...' lines when it has none."""
    if has_chat_template(tokenizer):
        messages = []
        for question, reply in pairs:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return "".join(f"User: {question}\nAssistant: {reply}\n" for question, reply in pairs) + "\n"


def chat_text(tokenizer, data_dir: str | Path) -> TextKind:
    """Dialogues of TURNS_PER_DIALOGUE turns, alternating ARC-Easy and PIQA (ARC rows 0-3, PIQA rows 0-3, ARC rows
    4-7, ...; the longer source's remaining dialogues at the end), each rendered on its own and concatenated."""
    arc, piqa = chat_pairs(data_dir)
    groups = [[pairs[i:i + TURNS_PER_DIALOGUE] for i in range(0, len(pairs) - TURNS_PER_DIALOGUE + 1,
                                                            TURNS_PER_DIALOGUE)] for pairs in (arc, piqa)]
    dialogues = [group for pair in zip(*groups) for group in pair]
    dialogues += max(groups, key=len)[min(map(len, groups)):]
    text, starts = _join([render_dialogue(tokenizer, dialogue) for dialogue in dialogues], "")
    layout = ("in the tokenizer's chat template, no generation prompt" if has_chat_template(tokenizer)
              else "tokenizer has NO chat template: plain 'User: ...\\nAssistant: ...' layout")
    description = (f"ARC-Easy test ({len(arc)} Q/A: question + lettered choices -> 'The answer is: <correct choice>.') "
                   f"and PIQA validation ({len(piqa)} Q/A: goal -> correct solution); {len(dialogues)} dialogues "
                   f"of {TURNS_PER_DIALOGUE} turns, alternating ARC/PIQA, {layout}")
    return TextKind("chat", text, ["eval/arc_easy_test.jsonl", "eval/piqa_validation.jsonl"], description, starts)


def math_text(data_dir: str | Path) -> TextKind:
    """GSM8K test: 'Question: ...\\nAnswer: ...' per problem (the dataset's worked solution, calculator
    annotations <<...>> and final '#### N' line included), separated by blank lines."""
    rows = _read_jsonl(Path(data_dir) / "eval" / "gsm8k_test.jsonl")
    documents = [f"Question: {row['question'].strip()}\nAnswer: {row['answer'].strip()}" for row in rows]
    text, starts = _join(documents, "\n\n")
    return TextKind("math", text, ["eval/gsm8k_test.jsonl"],
                    f"GSM8K test, {len(documents)} question + worked-solution documents in file order", starts)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _definition_lines(source: str) -> list[int]:
    """0-based first lines (decorators included) of the top-level definitions and of the classes' methods."""
    lines = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            lines.append(min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1)
            if isinstance(node, ast.ClassDef):
                lines += [min([item.lineno] + [d.lineno for d in item.decorator_list]) - 1 for item in node.body
                          if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return sorted(lines)


def code_excerpt(source: str, budget: int = CODE_CHARS_PER_FILE) -> str:
    """From the first top-level def/class (or its decorator) on: whole lines until `budget` characters are reached,
    ending before the next top-level or method definition (at the latest at twice the budget, on a line end)."""
    lines = source.splitlines(keepends=True)
    definitions = _definition_lines(source)
    boundaries = set(definitions)
    start = definitions[0] if definitions else 0
    taken, size = [], 0
    for number in range(start, len(lines)):
        line = lines[number]
        if size >= budget and (number in boundaries or size + len(line) > 2 * budget):
            break
        taken.append(line)
        size += len(line)
    return "".join(taken).rstrip() + "\n"


def code_text(budget: int = CODE_CHARS_PER_FILE) -> TextKind:
    """Each module of CODE_MODULES as '# file: NAME' and an excerpt of its source (see code_excerpt), in order."""
    folder = stdlib_dir()
    missing = [name for name in CODE_MODULES if not (folder / name).is_file()]
    assert not missing, f"standard library modules missing from {folder}: {missing}"
    documents = [f"# file: {name}\n" + code_excerpt((folder / name).read_text(encoding="utf-8"), budget)
                 for name in CODE_MODULES]
    text, starts = _join(documents, "\n\n")
    version = ".".join(map(str, sys.version_info[:2]))
    return TextKind("code", text, [f"{folder}/{name}" for name in CODE_MODULES],
                    f"{len(documents)} pure-Python modules of the CPython {version} standard library ({folder}), "
                    f"about {budget} characters of each from its first def/class on, cut at a def boundary, "
                    "each headed '# file: NAME'", starts)


def text_kinds(tokenizer, data_dir: str | Path, kinds=KINDS) -> dict[str, TextKind]:
    """The text and a short description of each kind (the tokenizer matters only for chat's template)."""
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise ValueError(f"unknown kinds of text {unknown}; choose from {KINDS}")
    builders = {"prose": lambda: prose_text(data_dir), "chat": lambda: chat_text(tokenizer, data_dir),
                "math": lambda: math_text(data_dir), "code": code_text}
    return {kind: builders[kind]() for kind in kinds}


# ---------------------------------------------------------------- the windows


def cut_windows(tokenizer, kind: TextKind, window: int = 512, max_windows: int | None = 24) -> KindWindows:
    """Tokenize the kind's text once (no special tokens added, as `moh_convert.perplexity.text_windows` does) and
    cut the first `max_windows` non-overlapping windows of `window` tokens."""
    fast = getattr(tokenizer, "is_fast", False)
    encoded = tokenizer(kind.text, add_special_tokens=False, return_offsets_mapping=fast)
    token_ids = torch.tensor(encoded["input_ids"], dtype=torch.long)
    num_windows = token_ids.numel() // window
    if max_windows is not None:
        num_windows = min(num_windows, max_windows)
    if num_windows == 0:
        raise ValueError(f"{kind.name} text has {token_ids.numel()} tokens, fewer than one {window}-token window")
    used = num_windows * window
    documents_used = None
    if fast:
        end = encoded["offset_mapping"][used - 1][1]
        documents_used = sum(1 for start in kind.doc_starts if start < end)
    return KindWindows(kind, token_ids[:used].view(num_windows, window), token_ids.numel(), documents_used)


def build_text_kinds(tokenizer, data_dir: str | Path, kinds=KINDS, window: int = 512,
                     max_windows: int | None = 24) -> dict[str, KindWindows]:
    """Windows of every kind with their texts and coverage (tokens and documents available vs used)."""
    return {name: cut_windows(tokenizer, kind, window, max_windows)
            for name, kind in text_kinds(tokenizer, data_dir, kinds).items()}


def text_kind_windows(tokenizer, data_dir: str | Path, kinds=KINDS, window: int = 512,
                      max_windows: int | None = 24) -> dict[str, torch.Tensor]:
    """kind -> LongTensor [num_windows, window] (num_windows = max_windows unless the text is shorter)."""
    return {name: built.windows for name, built in build_text_kinds(tokenizer, data_dir, kinds, window,
                                                                    max_windows).items()}


def describe(built: dict[str, KindWindows]) -> list[str]:
    """Markdown table of what each kind contains and how much of it the windows use."""
    lines = ["| kind | source | documents used / available | tokens used / available |", "| --- | --- | --- | --- |"]
    for name, item in built.items():
        used = "?" if item.documents_used is None else f"{item.documents_used:,}"
        lines.append(f"| {name} | {item.kind.description} | {used} / {item.kind.documents:,} | "
                     f"{item.tokens_used:,} / {item.tokens_available:,} |")
    return lines


if __name__ == "__main__":  # python benchmarks/text_kinds.py MODEL_OR_TOKENIZER [DATA_DIR]: show the kinds
    from transformers import AutoTokenizer

    data = sys.argv[2] if len(sys.argv) > 2 else str(Path(__file__).resolve().parents[2] / "shared" / "data")
    print("\n".join(describe(build_text_kinds(AutoTokenizer.from_pretrained(sys.argv[1]), data))))
