"""Config overrides as the matrix file writes them and as ``uae-dist finetune`` reads them.

In the file, overrides are a mapping ``{dotted.key: value}`` or a list of ``"dotted.key=value"``
strings (values parse as YAML, as on the command line); on the command line of a cell they are
``key=value`` arguments that parse back to the same values.
"""
from __future__ import annotations

import json

import yaml


class MatrixError(ValueError):
    pass


# Keys the matrix sets itself for every cell (from datasets/tasks/seeds and the cell directory).
RESERVED = {"data.root": "datasets.<name>.root", "data.targets": "tasks.<name>.target",
            "train.seed": "seeds", "train.out_dir": "out_root", "train.resume": "(always auto)",
            "data.source": "datasets.<name>.build"}


def overrides(raw, where: str) -> dict:
    """``{dotted.key: value}`` from a mapping or a list of ``"dotted.key=value"`` strings (values
    parse as YAML, as on the ``uae-dist finetune`` command line); later entries win."""
    from uae_dist.config import ConfigError, parse_override

    if raw is None:
        return {}
    if isinstance(raw, dict):
        items = list(raw.items())
    elif isinstance(raw, list):
        items = []
        for k, text in enumerate(raw):
            if not isinstance(text, str):
                raise _fail(f"{where}[{k}]", f"expected 'section.key=value', got {text!r}")
            try:
                path, val = parse_override(text)
            except ConfigError as e:
                raise _fail(f"{where}[{k}]", str(e)) from None
            items.append((".".join(path), val))
    else:
        raise _fail(where, "expected a mapping of dotted keys or a list of 'key=value', "
                    f"got {raw!r}")
    out = {}
    for key, val in items:
        if not isinstance(key, str) or key.count(".") < 1 or not all(key.split(".")):
            raise _fail(where, f"{key!r} is not a dotted config key such as train.epochs")
        if key in RESERVED:
            raise _fail(f"{where}.{key}", f"set by the matrix ({RESERVED[key]}), not an override")
        out.pop(key, None)
        out[key] = val
    return out


def override_args(ov: dict) -> list[str]:
    """``{key: value}`` → ``["key=value", …]``, read back as the values by ``uae-dist finetune``."""
    out = []
    for k, v in ov.items():
        s = v if isinstance(v, str) and _yaml_same(v) else json.dumps(v)
        out.append(f"{k}={s}")
    return out


def _yaml_same(s: str) -> bool:
    try:
        return s != "" and yaml.safe_load(s) == s
    except yaml.YAMLError:
        return False


def _fail(where: str, msg: str) -> MatrixError:
    return MatrixError(f"{where}: {msg}")
