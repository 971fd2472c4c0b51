"""The `moh` command: a thin layer over the Python API (each subcommand's flags come from its options model)."""
import argparse
import sys

from .errors import MoHError
from .options import add_options_to_parser, options_from_args


def _convert(args: argparse.Namespace) -> None:
    from .convert import ConvertOptions, convert

    output = convert(args.source, args.output, **options_from_args(args, ConvertOptions))
    print(f"MoH model written to {output}")


def build_parser() -> argparse.ArgumentParser:
    from .convert import ConvertOptions

    parser = argparse.ArgumentParser(
        prog="moh",
        description="Mixture-of-Head attention for Hugging Face causal LMs: convert, calibrate, train, evaluate, push.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    convert_parser = commands.add_parser(
        "convert",
        help="convert a dense checkpoint into a MoH model folder",
        description="Insert a router and a shared/routed head split into every attention block of SOURCE and write "
        "a model folder (safetensors, config, tokenizer, model card, modeling code) to OUTPUT. The default is the "
        "paper's setting: 75% of heads active per token, 50% of heads shared, query-norm router.",
        epilog="examples:\n  moh convert HuggingFaceTB/SmolLM2-135M smollm2-moh\n"
        "  moh convert ./llama-folder llama-moh --active-heads 24 --shared-heads 16 --dtype bfloat16\n"
        "  moh convert model.Q4_1.gguf model-moh --active-ratio 0.66",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert_parser.add_argument("source", metavar="SOURCE", help="Hub model id, local checkpoint folder or .gguf file")
    convert_parser.add_argument("output", metavar="OUTPUT", help="folder to write the MoH model to")
    add_options_to_parser(convert_parser, ConvertOptions)
    convert_parser.set_defaults(handler=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except MoHError as error:
        print(f"moh {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
