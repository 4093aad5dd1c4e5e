"""TrainConfig's fields as flags of `coatnet train` and `coatnet finetune`. Each field's Setting
(train/config.py) gives the flag's spelling, help, choices and metavar; its type gives the flag's type; the
default shown in --help is the value a flag left out becomes (the field's default, or the command's recipe's)."""
from __future__ import annotations

import argparse
import typing
from typing import Any, Callable, Iterable

from ..train.config import Setting, TrainConfig


def add_config_flags(parser: argparse.ArgumentParser, fields: Iterable[str], defaults: dict[str, Any],
                     shown: dict[str, str] | None = None, grouped: bool = True) -> None:
    """Add the flags of these TrainConfig `fields` to `parser`, in the order given (grouped by their sections
    when `grouped`). Each sets the field of its name, and only when given (default SUPPRESS): a command
    applies the flags given over its recipe. `defaults`: field -> what the field is when its flag is left out,
    shown as "(default: X)"; `shown`: field -> the text to show instead (what the command does instead)."""
    settings, hints, shown = TrainConfig.settings(), typing.get_type_hints(TrainConfig), shown or {}
    groups: dict[str, Any] = {}
    added: set[tuple[str, ...]] = set()
    for name in fields:
        s = settings[name]
        if not s.flags:
            raise ValueError(f"TrainConfig.{name} has no flag")
        if s.flags in added:  # the second field of a flag that sets several (--randaugment N M)
            continue
        added.add(s.flags)
        if grouped and s.section not in groups:
            groups[s.section] = parser.add_argument_group(s.section)
        target = groups[s.section] if grouped else parser
        joint = [f for f, t in settings.items() if t.flags == s.flags]
        default_text = " ".join(shown.get(f) or _shown(defaults[f], settings[f]) for f in joint)
        help_text = s.help if _is_switch(s, hints[name]) else f"{s.help} (default: {default_text})"
        kwargs = dict(default=argparse.SUPPRESS, help=help_text)
        if len(joint) > 1:
            target.add_argument(s.flags[0], action=_SetFields, fields=tuple(joint),
                                types=tuple(_value_type(settings[f], hints[f])[0] for f in joint),
                                metavar=tuple(settings[f].metavar or f.upper() for f in joint), **kwargs)
        elif hints[name] is bool:
            if len(s.flags) == 2:  # --x/--no-x
                if s.flags[1] != "--no-" + s.flags[0][2:]:
                    raise ValueError(f"TrainConfig.{name}: a pair of flags is --x and --no-x, not {s.flags}")
                target.add_argument(s.flags[0], dest=name, action=argparse.BooleanOptionalAction, **kwargs)
            else:
                target.add_argument(s.flags[0], dest=name, action="store_const",
                                    const=not s.flags[0].startswith("--no-"), **kwargs)
        else:
            convert, nargs = _value_type(s, hints[name])
            if nargs == "+":  # tuple[X, ...]: one or more words, and the flag may repeat (--model-arg)
                kwargs["action"] = "extend"
            target.add_argument(*s.flags, dest=name, type=convert, nargs=nargs, choices=s.choices,
                                metavar=s.metavar, **kwargs)


def flag_names(fields: Iterable[str]) -> str:
    """The flags of TrainConfig fields as a user types them ("--fsdp/--no-fsdp"), sorted; fields without a
    flag left out."""
    settings = TrainConfig.settings()
    return ", ".join(sorted({"/".join(settings[f].flags) for f in fields if settings[f].flags}))


def _is_switch(s: Setting, hint: Any) -> bool:
    """A flag that takes no value and sets the field one way only (--strict, --no-augment): its default is the
    other way, so --help states none."""
    return hint is bool and len(s.flags) == 1


def _value_type(s: Setting, hint: Any) -> tuple[Callable[[str], Any], int | str | None]:
    """(the converter of one command-line word, nargs) for a field of type `hint`: Optional[X] takes an X,
    tuple[X, X] two, tuple[X, ...] one or more ("+"); a value equal to `none_as` becomes None (--clip-grad 0:
    off)."""
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    nargs = None
    if typing.get_origin(hint) is tuple:
        items = typing.get_args(hint)
        nargs, hint = ("+" if items[-1] is Ellipsis else len(items)), items[0]
    if s.none_as is None:
        return hint, nargs

    def convert(word: str) -> Any:
        value = hint(word)
        return None if value == s.none_as else value

    convert.__name__ = hint.__name__  # argparse's "invalid float value: 'x'" names the type by it
    return convert, nargs


def _shown(value: Any, s: Setting) -> str:
    """A default as --help states it: what None means, on/off for a pair of switches, tuples as their words."""
    if value is None or value == ():
        return s.none or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    return str(value)


class _SetFields(argparse.Action):
    """One flag that sets several fields, one value each (--randaugment N M: randaugment_n, randaugment_m)."""

    def __init__(self, option_strings: list[str], dest: str, fields: tuple[str, ...],
                 types: tuple[Callable[[str], Any], ...], **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=len(fields), **kwargs)
        self.fields, self.types = fields, types

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        for field, convert, word in zip(self.fields, self.types, values):
            try:
                setattr(namespace, field, convert(word))
            except ValueError:
                raise argparse.ArgumentError(self, f"invalid {convert.__name__} value: {word!r} "
                                                   f"({field})") from None
