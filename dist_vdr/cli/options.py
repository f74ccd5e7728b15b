"""Command-line options generated from config dataclasses: every default is defined once, in the field.

A command (:class:`Command`) names its settings dataclass (:mod:`dist_vdr.cli.settings`) and the short
options that alias its keys (``Opt("--num-negatives", "mining.num_negatives")``). The options get
their type from the field, their help from the field's docstring and ``(default: X)`` from the
dataclass, and ``argparse.SUPPRESS`` as their argparse default: an option not given is absent from
the parsed arguments, so it overrides nothing and the dataclass default applies. The command's
settings are then ``load_config(--config FILE, key=value overrides, schema, flags=the options given)``.

Values on the command line: lists are comma-separated (``--ks 1,3,5``; ``''`` is the empty list)
unless the option takes words (``nargs="*"``) or is repeated (``append``); a dict option is repeated
``KEY=VALUE``; a bool option is a switch that sets true.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Opt:
    """A command-line option aliasing a config key."""

    flag: str
    key: str
    help: str = ""
    """What the option means for this command, when the field's docstring does not say it."""
    choices: tuple = ()
    metavar: str | None = None
    nargs: str | None = None
    """``"*"``: a list given as separate words (``--page-columns a b``)."""
    append: bool = False
    """Repeatable: a list gets one item per use, a dict one ``KEY=VALUE`` per use."""


@dataclass(frozen=True)
class Command:
    """A subcommand's settings dataclass and its options."""

    schema: type
    options: tuple[Opt, ...]
    config_flag: str = "--config"
    """The option naming a YAML file of the settings (`submit` and `bench` keep --config for the recipe
    they train, which is a key of their own section)."""

    @property
    def aliases(self) -> dict[str, str]:
        return {o.key: o.flag for o in self.options}


def add_options(parser: argparse.ArgumentParser, command: Command) -> None:
    """``--config FILE``, the command's options and its ``key=value`` overrides."""
    schema = composed(command.schema)
    sections = ", ".join(f.name for f in dataclasses.fields(schema))
    parser.add_argument(command.config_flag, dest="command_config", default=None, metavar="FILE",
                        help=f"YAML file of this command's settings (sections: {sections}; a training recipe's "
                             "other sections are ignored); options and key=value overrides apply over it")
    for opt in command.options:
        _add_option(parser, schema, opt)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"settings overrides, e.g. {command.options[0].key}=..., over the file and the options")
    parser.set_defaults(command_spec=command)  # what the command loads (tests walk the parser by it)


def _add_option(parser: argparse.ArgumentParser, schema: type, opt: Opt) -> None:
    owner, name = field_of(schema, opt.key)
    kind = field_types(owner)[name]
    base = _base(kind)
    help_text = f"{opt.help or field_docs(owner).get(name, '')} ({_default_text(default_of(schema, opt.key))}; " \
                f"key: {opt.key})"
    kwargs: dict[str, Any] = {"dest": opt.key, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
    if base is bool:
        parser.add_argument(opt.flag, action="store_const", const=True, **kwargs)
        return
    kwargs["metavar"] = opt.metavar or opt.flag.lstrip("-").upper().replace("-", "_")
    if opt.choices:
        kwargs["choices"] = opt.choices
    origin = typing.get_origin(base) or base  # list[int] -> list; a bare dict is its own origin
    item = (typing.get_args(base) or (str,))[0]
    if origin is dict:
        parser.add_argument(opt.flag, action="append", type=_key_value, **kwargs)
    elif origin is list and (opt.append or opt.nargs):
        parser.add_argument(opt.flag, action="append" if opt.append else "store", nargs=opt.nargs, type=item,
                            **kwargs)
    elif origin is list:
        parser.add_argument(opt.flag, type=_comma_list(item), **kwargs)
    else:
        parser.add_argument(opt.flag, type=base, **kwargs)


def given_options(args: argparse.Namespace, command: Command) -> dict[str, Any]:
    """The options given on the command line, by config key (dict options: their KEY=VALUE pairs merged)."""
    values = vars(args)
    given = {}
    for opt in command.options:
        if opt.key in values:
            owner, name = field_of(command.schema, opt.key)
            kind = _base(field_types(owner)[name])
            is_dict = (typing.get_origin(kind) or kind) is dict
            given[opt.key] = dict(values[opt.key]) if is_dict else values[opt.key]
    return given


def load_command(args: argparse.Namespace, command: Command, overrides: list[str] | None = None,
                 check_paths: bool = True) -> Any:
    """The command's settings: its defaults < ``--config FILE`` < the options given < ``key=value``."""
    from dist_vdr.config import load_config

    return load_config(args.command_config, args.overrides if overrides is None else overrides, check_paths,
                       schema=command.schema, flags=given_options(args, command), aliases=command.aliases)


def composed(schema: type) -> type:
    """``schema`` with the kinds' own sections, when it takes them (:func:`dist_vdr.config.recipe_schema`)."""
    from dist_vdr.config import recipe_schema

    return recipe_schema(schema)


def field_of(schema: type, key: str) -> tuple[type, str]:
    """The dataclass that declares ``key`` (``section.name``) of ``schema``, and the field name."""
    owner = schema = composed(schema)
    *sections, name = key.split(".")
    for section in sections:
        owner = _base(field_types(owner)[section])
    if name not in field_types(owner):
        raise KeyError(f"{schema.__name__} has no key {key}")
    return owner, name


def default_of(schema: type, key: str) -> Any:
    """The default of ``key`` as the command sees it: from its section's default in ``schema``, or (a
    section declared without one) its class's field default; REQUIRED for a field without default."""
    from dist_vdr.config import REQUIRED

    section, _, rest = key.partition(".")
    value = _section_default(schema, section) if rest else None
    if value is not None:
        for part in rest.split("."):
            value = getattr(value, part)
        return value
    owner, name = field_of(schema, key)
    f = next(f for f in dataclasses.fields(owner) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return REQUIRED if f.default is dataclasses.MISSING else f.default


def _section_default(schema: type, section: str) -> Any:
    """The default instance of a (top-level) section, or None when it is declared without one."""
    f = next(f for f in dataclasses.fields(composed(schema)) if f.name == section)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _default_text(value: Any) -> str:
    from dist_vdr.config import REQUIRED

    if isinstance(value, str) and value == REQUIRED:
        return "required"
    if value is None or value == {}:
        return "default: none"
    if isinstance(value, bool):
        return f"default: {str(value).lower()}"
    if isinstance(value, list):
        return f"default: {','.join(map(str, value))}" if value else "default: empty"
    return f"default: {value}"


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (read from its source: Python keeps none)."""
    node = _class_nodes(cls.__module__).get(cls.__name__)
    body = node.body if node is not None else []
    docs = {}
    for field_node, after in zip(body, body[1:], strict=False):
        if (isinstance(field_node, ast.AnnAssign) and isinstance(field_node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[field_node.target.id] = " ".join(after.value.value.split())
    return docs


@functools.cache
def _class_nodes(module: str) -> dict[str, ast.ClassDef]:
    """The top-level classes of a module's source, parsed once (inspect.getsource re-parses per class)."""
    try:
        tree = ast.parse(inspect.getsource(sys.modules[module]))
    except (OSError, TypeError, KeyError):  # no source (a frozen build): help without the docs
        return {}
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _base(kind: Any) -> Any:
    """``X | None`` -> ``X``."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return kind


def _comma_list(item: type):
    def parse(text: str) -> list:
        return [item(part.strip()) for part in text.split(",") if part.strip()]

    parse.__name__ = f"comma-separated {item.__name__}"  # argparse names the type in its error
    return parse


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value
