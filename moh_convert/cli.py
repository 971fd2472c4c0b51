"""The `moh` command: one table of subcommands over the Python API. Each subcommand's flags are generated from the
same options model as its Python function (`ConvertOptions` for `moh_convert.convert`, ...), so the two cannot
drift apart; errors the user can fix are one line on stderr and exit code 2."""
import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pydantic import BaseModel

from .analysis import HeadsOptions, head_load
from .calibrate import CalibrateOptions, calibrate
from .convert import ConvertOptions, convert
from .errors import MoHError
from .evaluate import EvalOptions, default_output, evaluate, render_table, suites_help
from .hub import PushOptions, describe_push, push
from .options import add_options_to_parser, options_from_args
from .train import train


@dataclass(frozen=True)
class Argument:
    """One argparse argument: `names` and keyword arguments as `add_argument` takes them."""

    names: tuple[str, ...]
    settings: dict = field(default_factory=dict)


def positional(name: str, metavar: str, help_text: str) -> Argument:
    return Argument((name,), {"metavar": metavar, "help": help_text})


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    description: str
    arguments: tuple[Argument, ...]
    options: type[BaseModel] | None  # flags generated from this model's fields, passed on as keyword options
    run: Callable[[argparse.Namespace, dict], None]
    epilog: str | Callable[[], str] = ""


def run_convert(args, options):
    print(f"MoH model written to {convert(args.source, args.output, **options)}")


def run_calibrate(args, options):
    calibrate(args.model, **options)  # prints its report


def run_train(args, options):
    train(args.recipe, args.overrides, resume=args.resume)


def run_eval(args, options):
    comparison = evaluate(args.model, **options)
    print(render_table(comparison))
    output = Path(options.get("output") or default_output(args.model))
    print(f"results written to {output}/ (comparison.json, results_table.md, results_*.json)")


def run_heads(args, options):
    data = head_load(args.model, **options)
    output = Path(options.get("output", HeadsOptions.model_fields["output"].default))
    print(f"head load of layer {data['plotted_layer']} for {', '.join(data['tasks'])} written to {output} "
          f"(all layers: {output.with_suffix('.json')})")


def run_push(args, options):
    print(describe_push(push(args.output, args.repo_id, **options)))


SUBCOMMANDS = (
    Subcommand(
        "convert",
        help="convert a dense checkpoint into a MoH model folder",
        description="Insert a router and a shared/routed head split into every attention block of SOURCE and write "
        "a model folder (safetensors, config, tokenizer, model card, modeling code) to OUTPUT, calibrated so that it "
        "keeps the source's quality without training: on --calibration-data, or by default on text the model writes "
        "itself (no data needed). 75% of heads are active per token unless --active-heads/--active-ratio say "
        "otherwise. --no-calibration writes the paper's parameter-free conversion (50% of heads shared, query-norm "
        "router), which needs long training to recover.",
        epilog="examples:\n  moh convert HuggingFaceTB/SmolLM2-135M smollm2-moh\n"
        "  moh convert ./smollm2 smollm2-moh --active-heads 6 --calibration-data valid.txt:0.5 default:0.5\n"
        "  moh convert ./llama-folder llama-moh --active-heads 24 --shared-heads 16 --dtype bfloat16\n"
        "  moh convert model.Q4_1.gguf model-moh --active-ratio 0.66",
        arguments=(positional("source", "SOURCE", "Hub model id, local checkpoint folder or .gguf file"),
                   positional("output", "OUTPUT", "folder to write the MoH model to")),
        options=ConvertOptions,
        run=run_convert,
    ),
    Subcommand(
        "calibrate",
        help="fit routers and shared heads of a converted model on a little text",
        description="Choose each layer's shared heads from measured head importance and fit a linear router per "
        "layer, one decoder layer at a time (peak memory: about one layer plus activations). Updates MODEL in "
        "place unless --output is given. Writes calibration_report.json and a model card section.",
        arguments=(positional("model", "MODEL", "a MoH model folder written by `moh convert`"),),
        options=CalibrateOptions,
        run=run_calibrate,
    ),
    Subcommand(
        "train",
        help="continue-tune a MoH model with accelerate",
        description="Run a training recipe in this process. For several processes or GPUs use "
        "`accelerate launch --config_file recipes/accelerate/CONFIG.yaml -m moh_convert.train RECIPE.yaml`.",
        epilog="examples:\n  moh train recipes/smollm2-135m-moh.yaml --set max_steps=20\n"
        "  accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml -m moh_convert.train "
        "recipes/smollm2-135m-moh.yaml --resume",
        arguments=(
            positional("recipe", "RECIPE.yaml", "training recipe (see recipes/)"),
            Argument(("--set",), {"dest": "overrides", "action": "append", "default": [], "metavar": "KEY=VALUE",
                                  "help": "override a recipe key (YAML value; nested keys with dots: data.path=..., "
                                  "lora.r=8)"}),
            Argument(("--resume",), {"action": "store_true",
                                     "help": "continue from the newest checkpoint in output_dir"}),
        ),
        options=None,
        run=run_train,
    ),
    Subcommand(
        "eval",
        help="run lm-eval benchmark suites on a MoH model and its dense baseline",
        description="Evaluate MODEL (a MoH folder, or any causal LM) with lm-eval, and BASELINE on the same tasks, and "
        "write lm-eval's results JSON for each, comparison.json and a Markdown table like the MoH paper's "
        "(one row per task: baseline, MoH, delta; average; fraction of heads active). Online, tasks are lm-eval's "
        "built-ins; with --data-dir they run offline as twins of the built-ins reading local JSONL files.",
        epilog=lambda: suites_help()
        + "examples:\n"
        "  moh eval smollm2-moh --baseline HuggingFaceTB/SmolLM2-135M --suite commonsense\n"
        "  moh eval smollm2-moh --baseline ./smollm2 --data-dir ../shared/data/eval \\\n"
        "      --tasks arc_easy,piqa,winogrande,hellaswag,lambada_openai --limit 200\n"
        "outputs (in --output): results_moh.json, results_baseline.json, comparison.json, results_table.md,\n"
        "  local_tasks/ (the twins; reuse them with `lm_eval --include_path OUTPUT/local_tasks`)",
        arguments=(positional("model", "MODEL",
                              "model to evaluate: MoH folder, checkpoint folder, Hub id or .gguf"),),
        options=EvalOptions,
        run=run_eval,
    ),
    Subcommand(
        "heads",
        help="plot how often each routed head is selected, per task (the MoH paper's head-load figure)",
        description="Run each task's documents (lm-eval's zero-shot prompt plus the reference answer) through the MoH "
        "MODEL with routing recorded and plot, for one layer, the share of tokens that selected each routed head: one "
        "panel per task. Padding tokens are not counted. The per-layer densities of every task go to a JSON file "
        "next to the PNG (each layer's densities sum to the routed top-K).",
        epilog="examples:\n"
        "  moh heads smollm2-moh --tasks arc_easy,piqa,winogrande --data-dir ../shared/data/eval --output heads.png\n"
        "  moh heads smollm2-moh --tasks gsm8k,lambada_openai --layer 0 --limit 100",
        arguments=(positional("model", "MODEL", "MoH model folder (or Hub id)"),),
        options=HeadsOptions,
        run=run_heads,
    ),
    Subcommand(
        "push",
        help="verify a MoH model folder and upload it to the Hugging Face Hub",
        description="Check that OUTPUT is a complete MoH model folder (config with auto_map, modeling code, "
        "weights matching their index, tokenizer, model card) that loads with trust_remote_code in a fresh Python "
        "without moh_convert; refresh its model card (conversion settings, calibration and training reports, "
        "evaluation results); then upload it to REPO_ID in one commit. Uses HF_TOKEN or a saved `hf auth login`.",
        epilog="examples:\n  moh push smollm2-moh me/SmolLM2-135M-MoH --dry-run\n"
        "  moh push smollm2-moh me/SmolLM2-135M-MoH --private --eval-dir eval-out\n"
        "  moh push smollm2-moh org/SmolLM2-135M-MoH --revision calibrated --create-pr",
        arguments=(positional("output", "OUTPUT", "MoH model folder (written by moh convert)"),
                   positional("repo_id", "REPO_ID", "Hub repository, e.g. your-name/model-name")),
        options=PushOptions,
        run=run_push,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moh",
        description="Mixture-of-Head attention for Hugging Face causal LMs: convert, calibrate, train, evaluate, push.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for subcommand in SUBCOMMANDS:
        epilog = subcommand.epilog() if callable(subcommand.epilog) else subcommand.epilog
        # Epilogs hold examples, one per line: keep their line breaks.
        formatter = argparse.RawDescriptionHelpFormatter if epilog else argparse.HelpFormatter
        sub = commands.add_parser(subcommand.name, help=subcommand.help, description=subcommand.description,
                                  epilog=epilog or None, formatter_class=formatter)
        for argument in subcommand.arguments:
            sub.add_argument(*argument.names, **argument.settings)
        if subcommand.options is not None:
            add_options_to_parser(sub, subcommand.options)
        sub.set_defaults(subcommand=subcommand)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    subcommand = args.subcommand
    options = options_from_args(args, subcommand.options) if subcommand.options is not None else {}
    try:
        subcommand.run(args, options)
    except MoHError as error:
        print(f"moh {subcommand.name}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
