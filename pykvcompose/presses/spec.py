"""Presses written on a command line: ``NAME:RATIO[,key=value...]``, e.g. ``kvcompose:0.75`` or
``snapkv:0.5,window_size=32,per_head=false``."""

from __future__ import annotations

import dataclasses
from typing import Any

from .base_press import BasePress

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _convert(press_name: str, field: dataclasses.Field, text: str) -> Any:
    """A field's value from text, by the field's annotation (the modules use postponed annotations)."""
    kind = str(field.type).replace(" ", "")
    if kind.startswith("Optional[") and text.lower() == "none":
        return None
    kind = kind[len("Optional[") : -1] if kind.startswith("Optional[") else kind
    try:
        if kind == "bool":
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        what = {"bool": "true or false", "int": "an integer", "float": "a number"}[kind]
        raise ValueError(f"{press_name}: {field.name} must be {what}, got {text!r}") from None
    return text


def parse_press_spec(spec: str) -> BasePress:
    """
    The press a ``NAME:RATIO[,key=value...]`` string describes.

    Parameters
    ----------
    spec : str
        NAME is a key of ``pykvcompose.presses.PRESSES`` (``kvcompose``, ``snapkv``, ...), RATIO the
        compression ratio, then any of the press's fields as ``key=value``.

    Raises
    ------
    ValueError
        Unknown press or field, a malformed spec, or a value the press rejects; the message names it.
    """
    from . import PRESSES

    name, sep, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in PRESSES:
        raise ValueError(f"unknown press {name!r} in {spec!r}; expected one of {', '.join(PRESSES)}")
    cls = PRESSES[name]
    parts = [p.strip() for p in rest.split(",")] if sep else []
    if not parts or not parts[0] or "=" in parts[0]:
        raise ValueError(f"press spec {spec!r} needs a compression ratio: {name}:RATIO[,key=value...]")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {"compression_ratio": _convert(name, fields["compression_ratio"], parts[0])}
    for part in parts[1:]:
        key, eq, value = (s.strip() for s in part.partition("="))
        if not eq or not key:
            raise ValueError(f"{name}: expected key=value, got {part!r} in {spec!r}")
        if key not in fields or key == "compression_ratio":
            raise ValueError(
                f"{name} has no field {key!r}; fields: {', '.join(f for f in fields if f != 'compression_ratio')}"
            )
        if key in kwargs:
            raise ValueError(f"{name}: {key} given twice in {spec!r}")
        kwargs[key] = _convert(name, fields[key], value)
    return cls(**kwargs)
