"""Options declared once, as dataclass fields, and the command line generated from them.

A trainer's options are a dataclass (:mod:`training.config`); each field is declared with
:func:`option`, whose metadata carries what the command line needs (help, choices, argument group, a
parser for list values) and two flags: ``cli`` (the field is a command-line option) and ``record``
(the field is written into the artifacts' ``training`` metadata). From such a class,
:func:`add_arguments` generates the ``argparse`` options (``--max-steps`` for ``max_steps``, the
field's default as the option's default), :func:`from_args` builds the dataclass back from the parsed
arguments, and :func:`recorded` gives the recorded fields as a dict. A subclass that needs another
default for an inherited option re-declares it with :func:`override`, which keeps the declaration's
metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

__all__ = [
    "add_arguments",
    "check_choices",
    "csv_ints",
    "csv_strs",
    "from_args",
    "option",
    "override",
    "recorded",
]


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    group: str | None = None,
    choices: tuple[Any, ...] | None = None,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    cli: bool = True,
    record: bool = True,
    factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that is also a command-line option.

    ``default`` (or ``factory``) as in :func:`dataclasses.field`; without either the option is
    required. ``help`` may use argparse's ``%(default)s``. ``parse`` turns the command-line string into
    the value (default: the field's type: ``int``, ``float`` or ``str``, optional or not).
    """
    meta = {"help": help, "group": group, "choices": choices, "parse": parse, "metavar": metavar}
    meta.update(cli=cli, record=record)
    return dataclasses.field(default=default, default_factory=factory, metadata=meta)


def override(base: type, name: str, default: Any, **changes: Any) -> Any:
    """Re-declare ``base``'s option ``name`` in a subclass with another ``default`` (and, optionally,
    other metadata given as in :func:`option`, e.g. ``help=``)."""
    meta = {**base.__dataclass_fields__[name].metadata, **changes}
    return dataclasses.field(default=default, metadata=meta)


def csv_ints(text: str) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]``."""
    return [int(x) for x in text.split(",")]


def csv_strs(text: str) -> tuple[str, ...]:
    """``"q_proj, v_proj"`` -> ``("q_proj", "v_proj")`` (blank items dropped)."""
    return tuple(m.strip() for m in text.split(",") if m.strip())


def _scalar(cls: type, name: str, hint: Any) -> type:
    """The command-line type of a field typed ``int``, ``float`` or ``str`` (or ``X | None``)."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kinds = [a for a in args if a is not type(None)]
    if len(kinds) != 1 or kinds[0] not in (int, float, str):
        raise TypeError(f"{cls.__name__}.{name}: type {hint} needs parse= in its option()")
    return kinds[0]


def _cli_fields(cls: type) -> list[dataclasses.Field]:
    out = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with option()")
        if f.metadata["cli"]:
            out.append(f)
    return out


def add_arguments(parser: argparse.ArgumentParser, cls: type, group: str) -> None:
    """Add an option ``--field-name`` for every command-line field of the dataclass ``cls``, in
    argument groups named by the fields' ``group`` (``group`` for those that name none)."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    for f in _cli_fields(cls):
        meta = f.metadata
        name = meta["group"] or group
        if name not in groups:
            groups[name] = parser.add_argument_group(name)
        kw: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        kw["type"] = meta["parse"] or _scalar(cls, f.name, hints[f.name])
        if f.default is not dataclasses.MISSING:
            kw["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kw["default"] = f.default_factory()
        else:
            kw["required"] = True
        if meta["choices"] is not None:
            kw["choices"] = meta["choices"]
        if meta["metavar"] is not None:
            kw["metavar"] = meta["metavar"]
        groups[name].add_argument("--" + f.name.replace("_", "-"), **kw)


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """The dataclass ``cls`` built from the parsed command-line fields (the others keep their defaults)."""
    return cls(**{f.name: getattr(args, f.name) for f in _cli_fields(cls)})


def recorded(cfg: Any) -> dict[str, Any]:
    """The fields of ``cfg`` declared with ``record=True``, as :func:`dataclasses.asdict` gives them."""
    keep = {f.name for f in dataclasses.fields(cfg) if f.metadata["record"]}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k in keep}


def check_choices(cfg: Any) -> None:
    """Raise ``ValueError`` naming the first field whose value is not one of its declared choices
    (a field whose default is ``None`` may also be ``None``)."""
    for f in dataclasses.fields(cfg):
        choices, value = f.metadata.get("choices"), getattr(cfg, f.name)
        if value is None and f.default is None:
            continue  # left to the class to resolve
        if choices is not None and value not in choices:
            raise ValueError(
                f"{f.name} must be one of {', '.join(map(str, choices))}, not {getattr(cfg, f.name)!r}"
            )
