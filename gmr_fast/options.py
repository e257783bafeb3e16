"""One options object per component, and the CLI flags and resume fingerprints derived from it.

A component's options are a dataclass whose fields carry their help text (and whether they
change the exact bits of a result) in ``field(metadata=...)``, written with :func:`option`.
``add_arguments`` turns the fields into argparse flags, ``from_args`` reads them back, and
``fingerprint`` lists the fields a resumed job must not change. Rare knobs go through one
escape hatch, ``--backend-option key=value`` (repeatable), instead of one flag each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any

from .errors import ConfigError


def option(default: Any, help: str, *, determinism: bool = False, choices: tuple | None = None, flag: bool = True,
           metavar: str | None = None, aliases: tuple[str, ...] = ()) -> Any:
    """A dataclass field with CLI metadata. ``determinism``: a different value gives different
    score bits (a resumed job must keep it)."""
    meta = {"help": help, "determinism": determinism, "choices": choices, "flag": flag, "metavar": metavar,
            "aliases": aliases, "mapping": isinstance(default, dict)}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _scalar_type(cls, f: dataclasses.Field):
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    return base if base in (int, float, str, bool) else None


def add_arguments(parser: argparse.ArgumentParser, cls, exclude: tuple[str, ...] = (), prefix: str = "") -> None:
    """One flag per field (``max_batch_tokens`` -> ``--max-batch-tokens``); dict fields become
    the repeatable ``--<name> key=value``."""
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in exclude or not meta.get("flag", False):
            continue
        name = "--" + prefix + f.name.replace("_", "-")
        names = [name, *meta.get("aliases", ())]
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = _scalar_type(cls, f)
        if kind is bool:
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=meta["help"])
        elif meta.get("mapping"):
            group.add_argument(name[:-1] if name.endswith("options") else name, *meta.get("aliases", ()), dest=f.name,
                               action="append", default=[], metavar="KEY=VALUE", help=meta["help"])
        else:
            group.add_argument(*names, dest=f.name, type=kind or str, default=default, choices=meta.get("choices"),
                               metavar=meta.get("metavar"), help=meta["help"])


def parse_key_values(items: list[str] | dict | None, what: str = "--backend-option") -> dict:
    """``["threads=2", "arena=true"]`` -> ``{"threads": 2, "arena": True}`` (values parsed as JSON
    when they are JSON, else kept as strings)."""
    if items is None:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def from_args(cls, args: argparse.Namespace, **overrides):
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            if isinstance(value, list) and f.metadata.get("mapping"):
                value = parse_key_values(value)
            values[f.name] = value
    values.update(overrides)
    return cls(**values)


def fingerprint(obj) -> dict:
    """The fields of an options object that change the exact bits of its results."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.metadata.get("determinism")}


def check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_positive(name: str, value, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}; got {value!r}")
