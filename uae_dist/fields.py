"""Bounds on numeric config fields, declared once beside the default and checked by ``config``.

    cutoff: float = bounded(8.0, gt=0)          # Å
    dropout: float = bounded(0.1, ge=0, lt=1)

Every float field must also be finite (``nan``/``inf`` are refused) unless ``finite=False``.
"""
from __future__ import annotations

import math
from dataclasses import field


def bounded(default, *, gt=None, ge=None, lt=None, le=None, finite: bool = True):
    return field(default=default, metadata={"gt": gt, "ge": ge, "lt": lt, "le": le, "finite": finite})


def check_value(name: str, value, meta) -> str | None:
    """The reason ``value`` violates the field's bounds, or None (``None`` values pass)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value) and meta.get("finite", True):
        return f"{name}={value} must be a finite number"
    for key, ok, word in (("gt", lambda v, b: v > b, ">"), ("ge", lambda v, b: v >= b, ">="),
                          ("lt", lambda v, b: v < b, "<"), ("le", lambda v, b: v <= b, "<=")):
        b = meta.get(key)
        if b is not None and not ok(value, b):
            return f"{name}={value} must be {word} {b}"
    return None
