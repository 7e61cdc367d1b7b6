"""Known data sets: resolved by name from a local folder (never downloaded at run time), sha256-checked.

``--source mp`` looks for the file in ``$UAE_DATA_DIR``, then ``<repo>/../shared/data``, then
``./data``; a mirror is simply another folder given through ``UAE_DATA_DIR`` or ``--source PATH``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownDataset:
    name: str
    filename: str
    sha256: str
    targets: tuple[str, ...]
    description: str


KNOWN = {
    "mp": KnownDataset("mp", "mp_cgcnn_36737.json.gz",
                       "ae0a87e9ea075fb03fa0954af150c2cbb9ae7278412eadd040728672f7d2ef7c",
                       ("e_form_per_atom", "band_gap"),
                       "Materials Project subset of CGCNN, 36,737 crystals (CC BY 4.0)"),
    "hoip": KnownDataset("hoip", "hoip_kim2017_1346.json.gz",
                         "4e9cc75fc4678e0b3e02d005c58944f84a02e9bc109e7d8285d017175c90f880",
                         ("atomization_energy_per_atom", "gap_hse06"),
                         "Hybrid organic-inorganic perovskites, Kim et al. 2017, 1,346 crystals (CC0)"),
}

# A sanity bound per known label: values outside are data errors, not chemistry. Energies in eV/atom.
DEFAULT_BOUNDS = {
    "e_form_per_atom": (-4.5, 5.0),
    "band_gap": (0.0, 30.0),
    "gap_hse06": (0.0, 30.0),
    "gap_gga": (0.0, 30.0),
}


def search_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("UAE_DATA_DIR"):
        dirs.append(Path(os.environ["UAE_DATA_DIR"]))
    repo = Path(__file__).resolve().parents[2]
    dirs += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", Path.cwd() / "data"]
    return dirs


def resolve(source: str) -> tuple[Path, KnownDataset | None]:
    """A dataset name or a path → (path, known entry or None). Raises FileNotFoundError with where it looked."""
    if source in KNOWN:
        ds = KNOWN[source]
        tried = [d / ds.filename for d in search_dirs()]
        for p in tried:
            if p.exists():
                return p, ds
        raise FileNotFoundError(f"data set {source!r} ({ds.filename}) not found; looked in: "
                                + ", ".join(str(p.parent) for p in tried) + ". Set UAE_DATA_DIR to its folder.")
    p = Path(source)
    if not p.exists():
        raise FileNotFoundError(f"source {source!r} does not exist")
    for ds in KNOWN.values():
        if p.name == ds.filename:
            return p, ds
    return p, None
