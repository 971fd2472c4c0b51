"""Built-in calibration sources of real text, so that the default calibration covers prose, math and code without
any data from the user (the fourth kind, chat, the model writes itself: chat_text.py).

    prose  WikiText-2 validation articles shipped with the package (texts/prose.txt, CC BY-SA 3.0)
    math   GSM8K training problems with their worked solutions (texts/math.txt, MIT), "Question: ...\\nAnswer: ..."
    code   excerpts of Python modules of packages installed beside moh_convert (transformers, torch, accelerate, ...),
           read from the machine; never the standard library, so it stays free for evaluation

texts/README.md says where the shipped files come from and under which licences; scripts/make_calibration_texts.py
rebuilds them from the data sets' files. Calibration takes its windows from all over a built-in text
(data.spread_windows), so that even a small share of the mix sees many documents. A calibration that needs more text than a built-in source holds fails
before any long work with a message naming --calibration-tokens (see data.load_source_windows)."""
import ast
import importlib.util
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import MoHError

TEXTS_FOLDER = "texts"  # package data of moh_convert.calibrate
SHIPPED_TEXTS = {
    "prose": ("prose.txt", "WikiText-2 validation articles shipped with moh_convert (CC BY-SA 3.0)"),
    "math": ("math.txt", "GSM8K training problems with worked solutions shipped with moh_convert (MIT)"),
}
CODE_EXCERPT_CHARS = 1500  # about how much of each module one excerpt takes, at least (more when more text is needed)
# (package, module file) in an order that alternates packages, so that a small calibration still sees several; all
# present in the versions setup.cfg allows, and a file a future version drops is skipped (the report lists those read).
CODE_MODULES = (
    ("transformers", "models/llama/modeling_llama.py"), ("torch", "nn/modules/module.py"),
    ("accelerate", "accelerator.py"), ("datasets", "arrow_dataset.py"), ("pydantic", "main.py"),
    ("transformers", "generation/utils.py"), ("torch", "optim/adam.py"), ("peft", "tuners/lora/layer.py"),
    ("huggingface_hub", "file_download.py"), ("yaml", "scanner.py"), ("transformers", "trainer.py"),
    ("torch", "utils/data/dataloader.py"), ("tqdm", "std.py"), ("transformers", "tokenization_utils_base.py"),
    ("torch", "nn/functional.py"), ("safetensors", "torch.py"), ("transformers", "data/data_collator.py"),
    ("torch", "optim/lr_scheduler.py"), ("accelerate", "big_modeling.py"), ("transformers", "models/gpt2/modeling_gpt2.py"),
    ("torch", "serialization.py"), ("datasets", "features/features.py"), ("transformers", "cache_utils.py"),
    ("torch", "autograd/function.py"), ("peft", "peft_model.py"), ("transformers", "optimization.py"),
    ("torch", "nn/modules/rnn.py"), ("huggingface_hub", "repocard.py"), ("transformers", "models/t5/modeling_t5.py"),
    ("torch", "utils/checkpoint.py"), ("yaml", "constructor.py"), ("transformers", "pipelines/base.py"),
    ("torch", "nn/init.py"), ("pydantic", "fields.py"), ("transformers", "modeling_rope_utils.py"),
    ("torch", "hub.py"), ("transformers", "models/bert/modeling_bert.py"), ("torch", "amp/grad_scaler.py"),
    ("transformers", "utils/generic.py"), ("accelerate", "utils/operations.py"),
)


@dataclass
class BuiltinText:
    """The text of one built-in source and where it came from (the report's `text` of that source)."""

    text: str
    origin: str
    files: list[str]


def read_builtin_text(source: str, needed_chars: int) -> BuiltinText:
    """The text of built-in source `source` ('prose', 'math' or 'code'); code reads about `needed_chars`."""
    if source == "code":
        return installed_code_text(needed_chars)
    file_name, origin = SHIPPED_TEXTS[source]
    text = resources.files(__package__).joinpath(TEXTS_FOLDER, file_name).read_text(encoding="utf-8")
    return BuiltinText(text, origin, [f"moh_convert/calibrate/{TEXTS_FOLDER}/{file_name}"])


def installed_code_text(needed_chars: int) -> BuiltinText:
    """An excerpt of every module of CODE_MODULES found (each headed '# file: PACKAGE/PATH'): CODE_EXCERPT_CHARS each,
    longer when that is not `needed_chars` in all."""
    modules = [(package, path) for package, path in CODE_MODULES if module_file(package, path) is not None]
    if not modules:
        raise MoHError("calibration source 'code' found none of its Python modules (transformers, torch, ...) in "
                       "this environment; reinstall moh_convert's dependencies or pass a code file instead of 'code'")
    budget = max(CODE_EXCERPT_CHARS, needed_chars // len(modules) + 1)
    documents, files = [], []
    for package, path in modules:
        excerpt = code_excerpt(module_file(package, path).read_text(encoding="utf-8"), budget)
        documents.append(f"# file: {package}/{path}\n{excerpt}")
        files.append(f"{package}/{path}")
    return BuiltinText("\n\n".join(documents), f"excerpts of {len(files)} Python modules of installed packages", files)


def module_file(package: str, path: str) -> Path | None:
    """The file `path` inside installed `package` (found without importing it), or None."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / path
        if candidate.is_file():
            return candidate
    return None


def code_excerpt(source: str, budget: int) -> str:
    """From the first top-level def/class (or its decorator) on: whole lines until `budget` characters are reached,
    ending before the next definition (at the latest at twice the budget). Licence headers and import blocks, which
    repeat from file to file, are skipped that way."""
    lines = source.splitlines(keepends=True)
    boundaries = definition_lines(source)
    start = min(boundaries) if boundaries else 0
    taken, size = [], 0
    for number in range(start, len(lines)):
        if size >= budget and (number in boundaries or size + len(lines[number]) > 2 * budget):
            break
        taken.append(lines[number])
        size += len(lines[number])
    return "".join(taken).rstrip() + "\n"


def definition_lines(source: str) -> set[int]:
    """0-based first lines (decorators included) of top-level and class-level definitions."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    starts = set()
    for node in tree.body:
        nested = node.body if isinstance(node, ast.ClassDef) else []
        for definition in [node, *nested]:
            if isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                first = min([definition.lineno] + [decorator.lineno for decorator in definition.decorator_list])
                starts.add(first - 1)
    return starts
