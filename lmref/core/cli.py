"""The one dataclass-to-command-line path: ``HfArgumentParser`` and what its mapping lacks.

Configs are dataclasses; command lines derive from them (``python -m lmref.train`` and
``python -m lmref.serve``). ``transformers.HfArgumentParser`` turns fields into flags, with help
and aliases from the fields' metadata; ``DataclassArgumentParser`` adds the few types it maps
badly, and ``flags_dataclass`` picks the fields of a config that a flag can express.

Usage::

    from lmref.core.cli import DataclassArgumentParser, flags_dataclass

    parser = DataclassArgumentParser([TrainingConfig], prog="python -m lmref.train")
    (config,) = parser.parse_args_into_dataclasses(["--max-steps", "20", "--seed", "none"])
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from typing import Union, get_args, get_origin

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

NONE_WORDS = {"none", "null", ""}  # what a command line writes for None


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in NONE_WORDS else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _bool_or_str(text: str) -> bool | str:
    """``true``/``false`` (and HF's yes/no, 1/0 ...) as booleans, any other text as itself."""
    try:
        return string_to_bool(text)
    except Exception:
        return text


class DataclassArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` with what its field mapping lacks for these dataclasses:

    - ``X | None`` (``int``, ``float``, ``str``) accepts ``none`` for None (HF maps it to ``X``,
      so a default could not be switched off from the command line);
    - a ``bool`` or ``bool | None`` field is a switch: ``--flag``, ``--flag false`` and
      ``--no-flag`` (HF adds ``--no-flag`` only when the default is True, and a ``bool | None``
      field without a default would need a value);
    - ``bool | str`` (``--resume`` or ``--resume PATH``) keeps a non-boolean value as text;
    - a ``"type"`` in a field's metadata is the parse function used (HF replaces it).

    Every other field goes to ``HfArgumentParser`` as it is.
    """

    @staticmethod
    def _parse_dataclass_field(parser, field: dataclasses.Field) -> None:
        kwargs = dict(field.metadata)
        aliases = kwargs.pop("aliases", [])
        aliases = [aliases] if isinstance(aliases, str) else list(aliases)
        dashed = field.name.replace("_", "-")
        flags = [f"--{field.name}", *([f"--{dashed}"] if dashed != field.name else []), *aliases]
        if field.default is not dataclasses.MISSING:
            kwargs["default"] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            kwargs["default"] = field.default_factory()
        else:
            kwargs["required"] = True
        union = get_origin(field.type) in (Union, types.UnionType)
        members = set(get_args(field.type)) if union else {field.type}
        if "type" in field.metadata:
            parser.add_argument(*flags, **kwargs)
        elif bool in members and members <= {bool, str, type(None)}:
            kwargs.pop("required", None)
            kwargs.setdefault("default", None)
            convert = _bool_or_str if str in members else string_to_bool
            parser.add_argument(*flags, type=convert, nargs="?", const=True, **kwargs)
            parser.add_argument(
                f"--no_{field.name}",
                f"--no-{dashed}",
                action="store_false",
                dest=field.name,
                default=argparse.SUPPRESS,  # the switch above sets the default
                help=f"same as --{dashed} false",
            )
        elif union and members - {type(None)} in ({int}, {float}, {str}):
            (kind,) = members - {type(None)}
            parser.add_argument(
                *flags, type=_optional(kind), metavar=kind.__name__.upper(), **kwargs
            )
        else:  # HF narrows field.type in place: a copy keeps the dataclass's own field intact
            HfArgumentParser._parse_dataclass_field(parser, copy.copy(field))


def flags_dataclass(
    cls: type, exclude: frozenset[str] = frozenset(), group: str | None = None, **help: str
) -> type:
    """A dataclass of ``cls``'s fields but ``exclude`` (same types, defaults and metadata, plus
    ``help`` by field name) for ``HfArgumentParser``: the fields a flag cannot express (a list
    of models, a dict of aliases) stay out and are assembled by hand."""
    hints = typing.get_type_hints(cls)  # the parser needs types, not annotation strings
    fields = [
        (
            f.name,
            hints[f.name],
            dataclasses.field(
                default=f.default,
                default_factory=f.default_factory,
                metadata={**f.metadata, **({"help": help[f.name]} if f.name in help else {})},
            ),
        )
        for f in dataclasses.fields(cls)
        if f.init and f.name not in exclude
    ]
    namespace = {"_argument_group_name": group or f"{cls.__name__} ({cls.__module__})"}
    return dataclasses.make_dataclass(f"{cls.__name__}Flags", fields, namespace=namespace)
