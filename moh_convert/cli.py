"""The `moh` command: a thin layer over the Python API. Each pipeline module registers its own subcommand through
`register_cli(commands)`, with flags generated from that module's options model."""
import argparse
import importlib
import importlib.util
import sys

from .errors import MoHError

# One module per pipeline stage; a stage that is not built yet simply has no subcommand.
SUBCOMMAND_MODULES = ("convert", "calibrate", "train", "evaluate", "analysis", "hub")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moh",
        description="Mixture-of-Head attention for Hugging Face causal LMs: convert, calibrate, train, evaluate, push.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        if importlib.util.find_spec(f"{__package__}.{module_name}") is not None:
            importlib.import_module(f"{__package__}.{module_name}").register_cli(commands)
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
