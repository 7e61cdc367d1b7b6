"""Per-element tables: the UAEs we export and ship, and the atom features they are compared with.

``load_table(spec)`` reads any of

* an export directory of ``uae-dist export`` (``uae.safetensors``, else ``uae.npz``, else
  ``atom_init.json``, ``embedding.json`` or ``embedding.csv``, with ``model_card.json``);
* one file in those formats: ``.safetensors``/``.npz`` (arrays ``embedding`` (100, d), optional
  ``seen``), a JSON object keyed by Z (``"1"``…, CGCNN's ``atom_init.json``) or by element symbol
  (elementembeddings), or a CSV whose first column is the element symbol (one header row);
* a name: ``cgcnn92`` (CGCNN's 92 features, read from the aviary-models package), ``onehot``
  (100-d), ``random``/``random:DIM``/``random:DIM:SEED`` (standard normal, seeded), any table that
  ``elementembeddings`` ships (``megnet16``, ``magpie``, ``mat2vec``, ``oliynyk``, ``skipatom``, …),
  or a table shipped in this package (``mp-v1``, also spelled ``uae:mp-v1``).

Rows are Z = 1..100. A row is *present* when the table defines that element (other rows hold NaN,
so they cannot be used by accident) and *trained* when it carries information: for a UAE, the
element occurred in pretraining; untrained rows of an export hold the mean of the trained rows
and are listed in its model card. Elements beyond Z = 100 are dropped; an unknown symbol is an error.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uae_dist.elements import N_ELEMENTS, SYMBOLS, z_of

SHIPPED = Path(__file__).resolve().parent  # uae_dist/tables/<name>/ holds a shipped export
EXPORT_FILES = ("uae.safetensors", "uae.npz", "atom_init.json", "embedding.json", "embedding.csv")


@dataclass
class Table:
    """A (100, d) table; ``values[k]`` is element Z = k + 1."""

    name: str
    values: np.ndarray
    present: np.ndarray
    trained: np.ndarray
    card: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])

    @property
    def symbols(self) -> list[str]:
        return list(SYMBOLS)

    @property
    def untrained(self) -> list[str]:
        """Symbols of present rows that carry no learned information."""
        return [s for s, p, t in zip(SYMBOLS, self.present, self.trained) if p and not t]

    @property
    def missing(self) -> list[str]:
        return [s for s, p in zip(SYMBOLS, self.present) if not p]

    # names of the export's arrays, kept for code written against earlier releases
    @property
    def embedding(self) -> np.ndarray:
        return self.values

    @property
    def seen(self) -> np.ndarray:
        return self.trained

    @property
    def z(self) -> np.ndarray:
        return np.arange(1, N_ELEMENTS + 1)

    def __getitem__(self, element) -> np.ndarray:
        k = _row(element)
        if not self.present[k]:
            raise KeyError(f"table {self.name!r} has no row for {SYMBOLS[k]}")
        return self.values[k]

    def as_dict(self, only_trained: bool = True) -> dict[str, np.ndarray]:
        ok = self.trained if only_trained else self.present
        return {s: self.values[k] for k, s in enumerate(SYMBOLS) if ok[k]}

    def require(self, zs, trained: bool = False) -> None:
        """Raise ValueError naming every element of ``zs`` (atomic numbers) the table lacks."""
        zs = np.unique(np.asarray(zs, dtype=np.int64))
        bad = zs[(zs < 1) | (zs > N_ELEMENTS)]
        if len(bad):
            raise ValueError(f"atomic numbers {bad.tolist()} are outside 1..{N_ELEMENTS}")
        ok = self.trained if trained else self.present
        lack = [SYMBOLS[z - 1] for z in zs if not ok[z - 1]]
        if lack:
            what = "trained rows" if trained else "rows"
            raise ValueError(f"table {self.name!r} has no {what} for {', '.join(lack)}, which "
                             "occur in the data: choose another table or drop those structures")

    def __repr__(self) -> str:
        return (f"Table({self.name!r}, dim={self.dim}, present={int(self.present.sum())}, "
                f"trained={int(self.trained.sum())})")


def _row(element) -> int:
    if isinstance(element, (int, np.integer)):
        if not 1 <= element <= N_ELEMENTS:
            raise KeyError(f"Z={element} outside 1..{N_ELEMENTS}")
        return int(element) - 1
    z = z_of(str(element))
    if z is None:
        raise KeyError(f"{element} (Z > {N_ELEMENTS}) has no row")
    return z - 1


def _from_rows(name: str, rows: dict[int, list], card: dict | None = None,
               trained=None) -> Table:
    if not rows:
        raise ValueError(f"{name}: the table has no rows for Z = 1..{N_ELEMENTS}")
    dims = {len(v) for v in rows.values()}
    if len(dims) != 1:
        raise ValueError(f"{name}: rows have different lengths {sorted(dims)}")
    values = np.full((N_ELEMENTS, dims.pop()), np.nan, dtype=np.float32)
    for z, v in rows.items():
        values[z - 1] = np.asarray(v, dtype=np.float32)
    present = np.isfinite(values).all(1)
    values[~present] = np.nan
    trained = present if trained is None else (np.asarray(trained, bool) & present)
    return Table(name, values, present, trained, card or {})


def _rows_by_symbol(items, where: str) -> dict[int, list]:
    rows = {}
    for sym, vec in items:
        try:
            z = z_of(sym)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if z is not None:
            rows[z] = vec
    return rows


# --------------------------------------------------------------------------- files
def _read_json(path: Path) -> dict[int, list]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON table: {e}") from None
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: expected an object of element → vector")
    if all(k.isdigit() for k in obj):  # atom_init.json: keys are Z
        rows = {int(k): v for k, v in obj.items() if 1 <= int(k) <= N_ELEMENTS}
        if not rows:
            raise ValueError(f"{path}: no keys in 1..{N_ELEMENTS}")
        return rows
    return _rows_by_symbol(obj.items(), str(path))


def _read_csv(path: Path) -> dict[int, list]:
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        next(reader, None)  # header
        items = [(r[0].strip(), [float(x) for x in r[1:]]) for r in reader if r]
    return _rows_by_symbol(items, str(path))


def _read_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        t = load_file(str(path))
    else:
        with np.load(path, allow_pickle=False) as z:
            t = {k: z[k] for k in z.files if k != "symbols"}
    if "embedding" not in t or t["embedding"].shape[0] != N_ELEMENTS:
        raise ValueError(f"{path}: expected an array 'embedding' with {N_ELEMENTS} rows")
    return t["embedding"].astype(np.float32), (t["seen"].astype(bool) if "seen" in t else None)


def read_file(path, card: dict | None = None) -> Table:
    path = Path(path)
    card = card or {}
    unseen = set(card.get("elements_unseen", []))
    trained = np.array([s not in unseen for s in SYMBOLS])
    if path.suffix in (".safetensors", ".npz"):
        values, seen = _read_arrays(path)
        rows = {k + 1: values[k] for k in range(N_ELEMENTS)}
        return _from_rows(str(path), rows, card, trained if seen is None else seen & trained)
    if path.suffix == ".json":
        return _from_rows(str(path), _read_json(path), card, trained)
    if path.suffix == ".csv":
        return _from_rows(str(path), _read_csv(path), card, trained)
    raise ValueError(f"{path}: unknown table format (use .safetensors, .npz, .json or .csv)")


def read_export(directory) -> Table:
    d = Path(directory)
    card_file = d / "model_card.json"
    card = json.loads(card_file.read_text()) if card_file.exists() else {}
    for f in EXPORT_FILES:
        if (d / f).exists():
            t = read_file(d / f, card)
            t.name = card.get("table_name") or str(d)
            return t
    raise FileNotFoundError(f"{d}: no {', '.join(EXPORT_FILES)}")


# --------------------------------------------------------------------------- names
def _cgcnn92() -> Table:
    spec = importlib.util.find_spec("aviary")  # locate the data file without importing aviary
    if spec is None or spec.origin is None:
        raise ValueError("cgcnn92 needs the aviary-models package (pip install aviary-models)")
    path = Path(spec.origin).parent / "embeddings" / "element" / "cgcnn92.json"
    rows = _read_json(path)
    card = {"source": "CGCNN atom_init.json (Xie & Grossman, PRL 120, 145301, 2018), as shipped "
                      "by aviary-models (MIT)", "file": str(path)}
    return _from_rows("cgcnn92", rows, card)


def _random(spec: str) -> Table:
    parts = spec.split(":")
    try:
        dim = int(parts[1]) if len(parts) > 1 else 128
        seed = int(parts[2]) if len(parts) > 2 else 0
    except ValueError:
        raise ValueError(f"{spec!r}: use random, random:DIM or random:DIM:SEED") from None
    if dim < 1:
        raise ValueError(f"{spec!r}: DIM must be >= 1")
    values = np.random.default_rng(seed).standard_normal((N_ELEMENTS, dim)).astype(np.float32)
    full = np.ones(N_ELEMENTS, dtype=bool)
    return Table(f"random:{dim}:{seed}", values, full, full,
                 {"source": f"standard normal, numpy default_rng({seed})"})


def _elementembeddings(name: str) -> Table:
    from elementembeddings.core import Embedding

    try:
        e = Embedding.load_data(name)
    except Exception as err:  # its loader raises several types for an unknown name
        raise ValueError(f"{name!r} is not a path, a shipped table or an elementembeddings "
                         f"table ({err})") from None
    rows = {}
    for sym in e.element_list:
        if sym in SYMBOLS:  # its lists carry placeholders such as 'Uup' beyond Z = 100
            rows[SYMBOLS.index(sym) + 1] = e.embeddings[sym]
    return _from_rows(name, rows, {"source": f"elementembeddings {name}"})


def shipped_names() -> list[str]:
    return sorted(p.name for p in SHIPPED.iterdir() if (p / "model_card.json").exists())


def load_table(spec) -> Table:
    """A table from a path, an export directory or a name (see the module docstring)."""
    s = str(spec)
    name = s[4:] if s.startswith("uae:") else s  # uae:DIR and uae:NAME, as featurizers spell them
    p = Path(name)
    if p.is_dir():
        return read_export(p)
    if p.is_file():
        return read_file(p)
    if (SHIPPED / name / "model_card.json").exists():
        t = read_export(SHIPPED / name)
        t.name = name
        return t
    if s.startswith("uae:"):
        raise FileNotFoundError(f"{s}: no export directory or shipped table of that name "
                                f"(shipped: {', '.join(shipped_names()) or 'none'})")
    if name == "cgcnn92":
        return _cgcnn92()
    if name == "onehot":
        eye = np.eye(N_ELEMENTS, dtype=np.float32)
        full = np.ones(N_ELEMENTS, dtype=bool)
        return Table("onehot", eye, full, full, {"source": "one-hot of Z"})
    if name == "random" or name.startswith("random:"):
        return _random(name)
    if "/" in s or p.suffix:
        raise FileNotFoundError(f"{s}: no such file or directory")
    return _elementembeddings(name)


def load_uae(path, warn: bool = True) -> Table:
    """An exported (or shipped) UAE; warns once, naming them, if some rows are untrained."""
    t = load_table(path)
    if warn and t.untrained:
        warnings.warn(f"{t.name}: rows {', '.join(t.untrained)} were never trained (elements "
                      "absent from pretraining; they hold the mean of the trained rows)",
                      UserWarning, stacklevel=2)
    return t


__all__ = ["Table", "load_table", "load_uae", "read_export", "read_file", "shipped_names"]
