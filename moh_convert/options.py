"""Pydantic option models are the single source of truth for both the Python API and the `moh` CLI flags.

A field that takes several values after one flag (`--calibration-data a.txt:0.5 self:0.5`) opts in with
`Field(..., json_schema_extra={"nargs": "+"})` on a `list[str] | str`-style annotation: argparse then collects the
values into a list (a single value arrives as a one-item list; the field's own validator decides what that means).
Without the marker a list field takes one value (e.g. `--tasks a,b`, split by its validator)."""
import argparse
import types
import typing

import pydantic

from .errors import MoHError


def validate_options(model_cls: type[pydantic.BaseModel], values: dict) -> pydantic.BaseModel:
    """Build an options model, turning pydantic's report into one MoHError line that names the option."""
    try:
        return model_cls(**values)
    except pydantic.ValidationError as error:
        problems = []
        for item in error.errors():
            name = ".".join(str(part) for part in item["loc"]) or "options"
            if item["type"] == "extra_forbidden":
                valid = ", ".join(sorted(model_cls.model_fields))
                problems.append(f"unknown option {name!r} (valid options: {valid})")
            else:
                problems.append(f"{name.replace('_', '-')}: {item['msg']}")
        raise MoHError("; ".join(problems)) from None


def _choices(annotation) -> list | None:
    """Literal["a", "b"] (optionally inside `| None`) -> ["a", "b"]."""
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        # `int | Literal["auto"]` takes numbers too: leave it to pydantic, which checks both.
        if len(members) == 1 and typing.get_origin(members[0]) is typing.Literal:
            return list(typing.get_args(members[0]))
    return None


def _scalar_type(annotation):
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return annotation if annotation in (int, float, str) else str


def _nargs(field) -> dict:
    """The field's opt-in argparse `nargs` (and optional `metavar`) from json_schema_extra, else {}."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return {key: extra[key] for key in ("nargs", "metavar") if key in extra} if "nargs" in extra else {}


def add_options_to_parser(parser: argparse.ArgumentParser, model_cls: type[pydantic.BaseModel]) -> None:
    """One `--kebab-case` flag per field, with the field's description and default as help."""
    for name, field in model_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        # argparse %-formats help strings (for %(default)s): a literal % in a description must not break --help.
        help_text = (field.description or "").replace("%", "%%")
        if field.annotation is bool:
            # On-by-default switches also get a --no-... form to turn them off.
            action = argparse.BooleanOptionalAction if field.default is True else "store_true"
            parser.add_argument(flag, dest=name, action=action, default=None, help=help_text)
            continue
        choices = _choices(field.annotation)
        if field.default is not None:
            help_text += f" (default: {field.default})"
        parser.add_argument(
            flag, dest=name, default=None, choices=choices,
            type=None if choices else _scalar_type(field.annotation), help=help_text, **_nargs(field),
        )


def options_from_args(args: argparse.Namespace, model_cls: type[pydantic.BaseModel]) -> dict:
    """The flags the user actually gave (so the Python API's defaults apply to the rest)."""
    return {name: getattr(args, name) for name in model_cls.model_fields if getattr(args, name, None) is not None}
