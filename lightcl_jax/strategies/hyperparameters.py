"""A strategy's hyperparameters: dataclass fields with a type, a default and a range.

A strategy declares its hyperparameters as annotated fields with defaults
(`lightcl_jax.strategies.base.Strategy` makes every subclass a frozen
dataclass), like the arguments of an optax factory::

    class OnlineEWC(Strategy):
        name = "ewc"
        lam: float = hyperparameter(10.0, "penalty weight", minimum=0)
        gamma: float = hyperparameter(1.0, "Fisher decay", minimum=0, maximum=1)

A field's annotation is its type: ``float``, ``int``, ``bool`` or ``str`` (a run
records them in JSON, and the CLI reads them from text). `check_fields`
validates an instance's values against them; `parse_value` reads one from the
command line (``--strategy-arg lam=100``); `describe` lists them for ``--help``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

TYPES = (bool, int, float, str)
_TRUE, _FALSE = ("on", "true", "yes", "1"), ("off", "false", "no", "0")


def hyperparameter(default, help: str = "", *, minimum=None, maximum=None, above=None,
                   choices: tuple | None = None):
    """A hyperparameter field: its ``default``, a line of ``help``, and what is allowed.

    Args:
      minimum, maximum: inclusive bounds of a number.
      above: an exclusive lower bound (e.g. ``above=0`` for a temperature).
      choices: the allowed values (e.g. of a ``str``).
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "minimum": minimum, "maximum": maximum, "above": above,
        "choices": None if choices is None else tuple(choices)})


def fields(cls) -> list[dataclasses.Field]:
    """The hyperparameter fields of a strategy class (its dataclass fields)."""
    return list(dataclasses.fields(cls))


def field_type(cls, field: dataclasses.Field) -> type:
    """The declared type of ``field``: one of `TYPES`.

    Raises:
      TypeError: the annotation is another type.
    """
    declared = typing.get_type_hints(cls).get(field.name, field.type)
    if declared not in TYPES:
        raise TypeError(f"{cls.__name__}.{field.name}: a hyperparameter is a bool, int, float "
                        f"or str (a run records it in JSON); got {declared!r}")
    return declared


def allowed(cls, field: dataclasses.Field) -> str:
    """What ``field`` accepts, in words: ``"a float >= 0"``, ``"an int in [1, 64]"``."""
    kind = field_type(cls, field).__name__
    meta = field.metadata
    article = "an" if kind == "int" else "a"
    if meta.get("choices"):
        return f"one of {', '.join(map(str, meta['choices']))}"
    low, high, above = meta.get("minimum"), meta.get("maximum"), meta.get("above")
    if low is not None and high is not None:
        return f"{article} {kind} in [{low}, {high}]"
    if above is not None and high is not None:
        return f"{article} {kind} in ({above}, {high}]"
    bounds = [f">= {low}" if low is not None else "", f"> {above}" if above is not None else "",
              f"<= {high}" if high is not None else ""]
    bound = " and ".join(b for b in bounds if b)
    finite = "finite " if kind == "float" and not bound else ""
    return f"{article} {finite}{kind}{' ' + bound if bound else ''}"


def check_value(cls, field: dataclasses.Field, value) -> Any:
    """``value`` as ``field`` holds it (an int becomes a float where a float is declared).

    Raises:
      ValueError: a value of another type, non-finite, or outside the allowed range;
        the message names the strategy, the field and what is allowed.
    """
    kind = field_type(cls, field)
    meta = field.metadata
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if ok and kind is float:
        ok = math.isfinite(value)
    if ok and meta.get("choices"):
        ok = value in meta["choices"]
    if ok and kind in (int, float):
        ok = ((meta.get("minimum") is None or value >= meta["minimum"])
              and (meta.get("maximum") is None or value <= meta["maximum"])
              and (meta.get("above") is None or value > meta["above"]))
    if not ok:
        raise ValueError(f"strategy {cls.name}: {field.name} must be {allowed(cls, field)}; "
                         f"got {value!r}")
    return value


def parse_value(cls, name: str, text: str) -> Any:
    """The value of hyperparameter ``name`` of ``cls`` written as ``text`` on a command line.

    Raises:
      ValueError: ``cls`` has no such hyperparameter (the message lists its own), or
        ``text`` is not of its type.
    """
    by_name = {f.name: f for f in fields(cls)}
    if name not in by_name:
        raise ValueError(f"strategy {cls.name} has no hyperparameter {name!r}; "
                         f"{_listing(cls)}")
    field = by_name[name]
    kind = field_type(cls, field)
    try:
        if kind is bool:
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        return kind(text)
    except ValueError:
        raise ValueError(f"strategy {cls.name}: {name} must be {allowed(cls, field)}; "
                         f"got {text!r}") from None


def _listing(cls) -> str:
    names = [f.name for f in fields(cls)]
    return f"it has {', '.join(names)}" if names else "it has none"


def check_names(cls, args: dict) -> None:
    """Raises ValueError naming the first key of ``args`` that ``cls`` has no field for."""
    names = {f.name for f in fields(cls)}
    for key in args:
        if key not in names:
            raise ValueError(f"strategy {cls.name} has no hyperparameter {key!r}; "
                             f"{_listing(cls)}")


def describe(cls) -> list[str]:
    """One line per hyperparameter of ``cls``: name, default, what is allowed, help."""
    lines = []
    for field in fields(cls):
        text = f"{field.name}={field.default!r} ({allowed(cls, field)})"
        if field.metadata.get("help"):
            text += f": {field.metadata['help']}"
        lines.append(text)
    return lines
