"""Rebuild the real-text samples shipped with moh_convert for the built-in 'prose' and 'math' calibration sources
(moh_convert/calibrate/texts/, see the README there) from the data sets' own files:

    python scripts/make_calibration_texts.py --data-dir ../shared/data

prose.txt: the first whole articles of WikiText-2 valid.txt (as distributed, word-tokenized) up to --chars characters;
math.txt: the first GSM8K train problems as "Question: ...\\nAnswer: ..." (the data set's answer text), blank-line
separated, up to --chars. Neither file is an evaluation split (benchmarks evaluate on WikiText-2 test, GSM8K test)."""
import argparse
import json
import re
from pathlib import Path

TEXTS = Path(__file__).resolve().parent.parent / "moh_convert" / "calibrate" / "texts"
ARTICLE_TITLE = re.compile(r"^ = [^=].* = $")  # a top-level WikiText heading starts a new article


def first_articles(valid_text: str, chars: int) -> str:
    lines = valid_text.splitlines(keepends=True)
    starts = [number for number, line in enumerate(lines) if ARTICLE_TITLE.match(line.rstrip("\n"))] + [len(lines)]
    taken = ""
    for start, end in zip(starts, starts[1:]):
        if len(taken) >= chars:
            break
        taken += "".join(lines[start:end])
    return taken


def first_problems(train_jsonl: Path, chars: int) -> str:
    documents, size = [], 0
    for line in train_jsonl.read_text(encoding="utf-8").splitlines():
        if size >= chars:
            break
        row = json.loads(line)
        documents.append(f"Question: {row['question']}\nAnswer: {row['answer']}")
        size += len(documents[-1]) + 2
    return "\n\n".join(documents) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="folder with wikitext-2/valid.txt and eval/gsm8k_train.jsonl")
    parser.add_argument("--chars", type=int, default=100_000, help="about how many characters each file holds")
    args = parser.parse_args()
    data = Path(args.data_dir)
    prose = first_articles((data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8"), args.chars)
    math = first_problems(data / "eval" / "gsm8k_train.jsonl", args.chars)
    (TEXTS / "prose.txt").write_text(prose, encoding="utf-8")
    (TEXTS / "math.txt").write_text(math, encoding="utf-8")
    print(f"prose.txt {len(prose):,} characters, math.txt {len(math):,} characters ({math.count('Question: ')} problems)")


if __name__ == "__main__":
    main()
