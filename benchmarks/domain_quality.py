#!/usr/bin/env python
"""Perplexity by kind of text (prose, chat, math, code) of several models, as ratios to a dense baseline.

    python benchmarks/domain_quality.py --dense DENSE_DIR --models NAME=DIR [NAME=DIR ...] \\
        [--data-dir ../shared/data] [--json OUT.json] [--no-write]

For each kind (see benchmarks/text_kinds.py: WikiText-2 test, ARC-Easy/PIQA dialogues in the model's chat template,
GSM8K test solutions, standard-library Python) the perplexity (exp of the mean token loss) over the first 24
non-overlapping 512-token windows, and its ratio to the dense model's; the mean and the worst (max) ratio over the
four kinds; and the ratio on the first 48 windows of WikiText-2 test (the number calibration_quality.py reports).
None of these documents is calibration data of any default (prose and math come from other splits of the data
sets the built-in 'prose' and 'math' sources ship: WikiText-2 test against valid, GSM8K test against train). The models are evaluated one after another in
this process, in float32, with the dense model's tokenizer (every model's tokenizer must match it). The table goes to BENCHMARKS.md
between the domain_quality markers (with the command, date and machine) unless --no-write.

From another script:  `evaluate_models({"dense": dir, "paper": dir2}, data_dir)` -> [ModelQuality, ...].
"""
import argparse
import gc
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from benchmarks import common  # noqa: E402
from benchmarks.text_kinds import KINDS, KindWindows, build_text_kinds, describe  # noqa: E402

MARKERS = ("<!-- domain_quality:start -->", "<!-- domain_quality:end -->")
WIKITEXT = "wikitext48"  # key of the WikiText-2 test, 48 windows, perplexity


@dataclass
class ModelQuality:
    """One model's perplexities (per kind, and WIKITEXT) and their ratios to the first (dense) model's."""

    name: str
    folder: str
    perplexity: dict[str, float]
    ratio: dict[str, float] = field(default_factory=dict)
    mean_ratio: float = float("nan")  # over the kinds (not WIKITEXT)
    worst_ratio: float = float("nan")
    worst_kind: str = ""
    load_s: float = 0.0
    eval_s: float = 0.0


def _tokenizer_signature(tokenizer) -> tuple:
    return tuple(sorted(tokenizer.get_vocab().items())), str(getattr(tokenizer, "chat_template", None))


def evaluate_models(folders, data_dir, kinds=KINDS, window: int = 512, max_windows: int = 24,
                    wikitext_windows: int = 48, batch_size: int = 4, progress: bool = False,
                    log=lambda message: print(message, flush=True),
                    ) -> tuple[list[ModelQuality], dict[str, KindWindows]]:
    """Evaluate `folders` ({name: folder} or [(name, folder)], the first the dense baseline) in turn in this process.

    Returns the ModelQuality of each (ratios to the first) and the kinds' windows with their descriptions."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moh_convert  # noqa: F401  (registers the MoH architecture with the Auto classes)
    from moh_convert.perplexity import perplexity, wikitext_windows as cut_wikitext

    folders = list(folders.items()) if isinstance(folders, dict) else list(folders)
    if not folders:
        raise ValueError("no models to evaluate")
    tokenizer = AutoTokenizer.from_pretrained(folders[0][1])
    signature = _tokenizer_signature(tokenizer)
    built = build_text_kinds(tokenizer, data_dir, kinds, window, max_windows)
    wikitext = cut_wikitext(tokenizer, data_dir, "test", window, wikitext_windows)
    # The prose windows are the first WikiText-2 test windows: its 48-window perplexity reuses their loss.
    head = built["prose"].windows if "prose" in built else None
    reuse = head is not None and head.shape[0] <= wikitext.shape[0] and torch.equal(head, wikitext[:head.shape[0]])

    results = []
    for name, folder in folders:
        if _tokenizer_signature(AutoTokenizer.from_pretrained(folder)) != signature:
            raise ValueError(f"{name} ({folder}) has another tokenizer than {folders[0][0]}: ratios would compare "
                             "different tokens")
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        loaded = time.perf_counter()
        values = {}
        for kind, item in built.items():
            values[kind] = perplexity(model, item.windows, batch_size=batch_size, progress=progress)
            log(f"  {name}: {kind} perplexity {values[kind]:.3f}")
        if reuse:
            rest = wikitext[head.shape[0]:]
            log_sum = head.shape[0] * math.log(values["prose"])
            if rest.shape[0]:
                log_sum += rest.shape[0] * math.log(perplexity(model, rest, batch_size=batch_size, progress=progress))
            values[WIKITEXT] = math.exp(log_sum / wikitext.shape[0])  # every window predicts window - 1 tokens
        else:
            values[WIKITEXT] = perplexity(model, wikitext, batch_size=batch_size, progress=progress)
        log(f"  {name}: WikiText-2 test {wikitext.shape[0]} windows perplexity {values[WIKITEXT]:.3f}")
        results.append(ModelQuality(name, str(folder), values, load_s=loaded - start,
                                    eval_s=time.perf_counter() - loaded))
        del model
        gc.collect()

    dense = results[0].perplexity
    for result in results:
        result.ratio = {key: value / dense[key] for key, value in result.perplexity.items()}
        kind_ratios = {kind: result.ratio[kind] for kind in built}
        result.mean_ratio = sum(kind_ratios.values()) / len(kind_ratios)
        result.worst_kind = max(kind_ratios, key=kind_ratios.get)
        result.worst_ratio = kind_ratios[result.worst_kind]
    return results, built


def command_line() -> str:
    return ("python benchmarks/domain_quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])).strip()


def table_lines(results: list[ModelQuality], built: dict[str, KindWindows], wikitext_windows: int,
                window: int, machine: str) -> list[str]:
    kinds = list(built)
    windows = {kind: built[kind].windows.shape[0] for kind in kinds}
    dense = results[0]
    header = ("| model | " + " | ".join(kinds) + " | mean | worst | "
              f"WikiText-2 test, {wikitext_windows} windows | eval time [s] |")
    rule = "| --- " * (len(kinds) + 5) + "|"
    lines = [
        "## Quality by kind of text (perplexity ratio to the dense model)",
        "",
        f"- Command: `{command_line()}`",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {machine}",
        f"- Perplexity: exp(mean token loss) over the first {', '.join(f'{windows[k]}' for k in kinds)} "
        f"non-overlapping {window}-token windows of each kind ({', '.join(kinds)}), float32; ratio = model / "
        f"{dense.name}. Mean and worst over the {len(kinds)} kinds. None of these documents is calibration data (the "
        "default's 'prose' and 'math' are WikiText-2 valid and GSM8K train: the same data sets, other splits).",
        "",
        header,
        rule,
    ]
    for result in results:
        cells = [f"{result.ratio[kind]:.3f}" for kind in kinds]
        lines.append(f"| {result.name} | " + " | ".join(cells) + f" | {result.mean_ratio:.3f} | "
                     f"{result.worst_ratio:.3f} ({result.worst_kind}) | {result.ratio[WIKITEXT]:.3f} | "
                     f"{result.eval_s:.0f} |")
    lines += ["", "Perplexities:", "",
              "| model | " + " | ".join(kinds) + f" | WikiText-2 test, {wikitext_windows} windows |",
              "| --- " * (len(kinds) + 2) + "|"]
    for result in results:
        lines.append(f"| {result.name} | " + " | ".join(f"{result.perplexity[k]:.3f}" for k in kinds)
                     + f" | {result.perplexity[WIKITEXT]:.3f} |")
    lines += ["", "Texts:", ""] + describe(built)
    return lines


def parse_models(dense: str, models: list[str]) -> list[tuple[str, str]]:
    folders = [("dense", dense)]
    for entry in models:
        name, equals, folder = entry.partition("=")
        if not equals or not name or not folder:
            raise SystemExit(f"--models takes NAME=DIR entries, not {entry!r}")
        folders.append((name, folder))
    names = [name for name, _ in folders]
    if len(set(names)) != len(names):
        raise SystemExit(f"model names must differ: {names}")
    for name, folder in folders:
        if not (Path(folder) / "config.json").is_file():
            raise SystemExit(f"{name}: {folder} holds no config.json")
    return folders


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", required=True, help="folder of the dense baseline model (ratios are to it)")
    parser.add_argument("--models", nargs="*", default=[], metavar="NAME=DIR", help="models to compare with it")
    parser.add_argument("--data-dir", default=str(REPO_ROOT.parent / "shared" / "data"),
                        help="folder with wikitext-2/test.txt and eval/*.jsonl")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--window", type=int, default=512, help="tokens per window")
    parser.add_argument("--max-windows", type=int, default=24, help="windows per kind")
    parser.add_argument("--wikitext-windows", type=int, default=48, help="windows of the WikiText-2 test column")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--json", help="also save the numbers (and the texts' descriptions) here")
    parser.add_argument("--markdown", default=str(REPO_ROOT / "BENCHMARKS.md"))
    parser.add_argument("--no-write", action="store_true", help="print the table only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    folders = parse_models(args.dense, args.models)
    machine = common.machine_description()  # before the run: the load average it reports is the one at the start

    results, built = evaluate_models(folders, args.data_dir, args.kinds, args.window, args.max_windows,
                                     args.wikitext_windows, args.batch_size)
    lines = table_lines(results, built, args.wikitext_windows, args.window, machine)
    print("\n".join(lines))
    if args.json:
        texts = {kind: {"description": item.kind.description, "sources": item.kind.sources,
                        "documents": item.kind.documents, "documents_used": item.documents_used,
                        "tokens_available": item.tokens_available, "tokens_used": item.tokens_used,
                        "windows": item.windows.shape[0]} for kind, item in built.items()}
        Path(args.json).write_text(json.dumps({"command": command_line(), "machine": machine, "window": args.window,
                                               "texts": texts, "models": [asdict(r) for r in results]}, indent=2))
    if not args.no_write:
        common.write_markdown_section(Path(args.markdown), MARKERS, "\n".join(lines))
        print(f"written to {args.markdown}")


if __name__ == "__main__":
    main()
