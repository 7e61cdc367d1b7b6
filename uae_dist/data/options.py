"""Options of ``uae-dist data build``: every default lives here, once.

:class:`BuildOptions` decide what a build writes (they are its identity: ``--resume`` refuses to mix
builds whose options differ); :class:`RunOptions` only decide how it runs. The command line takes
its defaults and help from these classes, and ``build_lmdb(**kwargs)`` maps its keyword arguments
onto them (``None`` means "the default"). :func:`validate` checks every value before anything
expensive starts (opening the source, creating ``--out``) and raises :class:`OptionError` naming
the option.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields

from .registry import DEFAULT_BOUNDS

FORMATS = ("auto", "json", "cgcnn", "extxyz", "ase")


class BuildError(RuntimeError):
    """A build that cannot go on; the message says what to do."""


class OptionError(BuildError, ValueError):
    """A bad option value; ``option`` is its command-line name (``--cutoff`` ...)."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option


@dataclass
class BuildOptions:
    cutoff: float = 8.0                   # Å
    max_neighbors: int | None = None      # keep the N nearest per atom (whole tied shells)
    max_pairs: int = 1_000_000            # estimated neighbour pairs that reject a record
    targets: list[str] | None = None      # None: the known data set's, else every numeric field
    bounds: dict = field(default_factory=lambda: dict(DEFAULT_BOUNDS))  # name -> (lo, hi)
    shards: int = 4
    limit: int | None = None              # only the first N source records
    fmt: str = "auto"
    id_key: str | None = None             # None: chosen from the whole source
    cif_key: str = "cif"
    fast_cif: bool = True
    split: tuple = (0.8, 0.1, 0.1)        # train, val, test fractions
    seed: int = 0                         # split seed
    split_file: str | None = None         # a given split (JSON train/val/test ids): see given_split

    def identity(self) -> dict:
        """What must not change between a partial build and its resumption."""
        d = asdict(self)
        d["bounds"] = {k: list(v) for k, v in sorted(self.bounds.items())}
        d["split"] = list(self.split)
        return d

    @classmethod
    def from_identity(cls, d: dict) -> "BuildOptions":
        return cls(**{**d, "bounds": {k: tuple(v) for k, v in d["bounds"].items()},
                      "split": tuple(d["split"])})


@dataclass
class RunOptions:
    workers: int = 1           # local worker processes
    commit_every: int = 128    # records per LMDB transaction
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    use_mpi: bool = True


FLAGS = {"cutoff": "--cutoff", "max_neighbors": "--max-neighbors", "max_pairs": "--max-pairs",
         "targets": "--targets", "bounds": "--bound", "shards": "--shards", "limit": "--limit",
         "fmt": "--format", "id_key": "--id-key", "cif_key": "--cif-key", "split": "--split",
         "seed": "--seed", "split_file": "--split-file", "workers": "--workers",
         "commit_every": "--commit-every"}


def parse_targets(v) -> list[str] | None:
    """``"a,b"`` or a sequence of names → list; ``None``/empty → None."""
    if v is None:
        return None
    names = [t.strip() for t in (v.split(",") if isinstance(v, str) else map(str, v))]
    names = [t for t in names if t]
    return names or None


def parse_split(v) -> tuple:
    """``"0.8,0.1,0.1"`` or three numbers → tuple of floats (checked by :func:`validate`)."""
    try:
        parts = v.split(",") if isinstance(v, str) else list(v)
        return tuple(float(x) for x in parts)
    except (TypeError, ValueError):
        raise OptionError("--split", f"{v!r} is not three comma-separated numbers (train,val,test)")


def parse_bound(text: str) -> tuple[str, tuple[float, float]]:
    """``NAME=LO:HI`` (either side may be empty: unbounded) → (name, (lo, hi))."""
    try:
        name, rng = text.split("=", 1)
        lo, hi = rng.split(":", 1)
        return name.strip(), (float(lo) if lo.strip() else -math.inf,
                              float(hi) if hi.strip() else math.inf)
    except ValueError:
        raise OptionError("--bound", f"{text!r}: expected NAME=LO:HI (either side may be empty)")


def make_options(**kwargs) -> tuple[BuildOptions, RunOptions]:
    """Keyword arguments → (BuildOptions, RunOptions), normalised but not yet validated."""
    names_b = {f.name for f in fields(BuildOptions)}
    names_r = {f.name for f in fields(RunOptions)}
    unknown = sorted(set(kwargs) - names_b - names_r)
    if unknown:
        raise TypeError(f"unknown build option(s) {unknown}; known: {sorted(names_b | names_r)}")
    given = {k: v for k, v in kwargs.items() if v is not None}
    b = BuildOptions(**{k: v for k, v in given.items() if k in names_b})
    r = RunOptions(**{k: v for k, v in given.items() if k in names_r})
    b.targets = parse_targets(b.targets)
    b.split = parse_split(b.split)
    if not isinstance(b.bounds, dict):
        raise OptionError("--bound", f"bounds must be a mapping NAME -> (LO, HI), got {b.bounds!r}")
    bounds = {}
    for k, v in b.bounds.items():
        try:
            lo, hi = (float(x) for x in v)
        except (TypeError, ValueError):
            raise OptionError("--bound", f"{k}={v!r}: expected two numbers LO, HI")
        bounds[str(k)] = (lo, hi)
    b.bounds = bounds
    return b, r


def _int(name: str, v, lo: int, none_ok: bool = False, why: str = "") -> None:
    if v is None and none_ok:
        return
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < lo:
        raise OptionError(FLAGS[name], f"{v!r}: expected a whole number >= {lo}{why}")


def validate(b: BuildOptions, r: RunOptions) -> None:
    """Raise OptionError for the first bad value (the message names the option and the fix)."""
    if not isinstance(b.cutoff, numbers.Real) or not math.isfinite(b.cutoff) or b.cutoff <= 0:
        raise OptionError("--cutoff", f"{b.cutoff!r}: the neighbour cutoff must be a finite number "
                                      "of Å > 0")
    b.cutoff = float(b.cutoff)
    _int("max_neighbors", b.max_neighbors, 1, none_ok=True)
    _int("max_pairs", b.max_pairs, 1)
    _int("shards", b.shards, 1)
    _int("limit", b.limit, 1, none_ok=True, why=" (leave it out to use every record)")
    _int("seed", b.seed, -(1 << 63))
    _int("workers", r.workers, 1)
    _int("commit_every", r.commit_every, 1)
    if b.targets is not None:
        dup = sorted({t for t in b.targets if b.targets.count(t) > 1})
        if dup:
            raise OptionError("--targets", f"target(s) given more than once: {dup}")
    for name, (lo, hi) in b.bounds.items():
        if not name:
            raise OptionError("--bound", f"a bound needs a label name: ={lo}:{hi}")
        if math.isnan(lo) or math.isnan(hi) or lo > hi:
            raise OptionError("--bound", f"{name}={lo:g}:{hi:g}: LO must be <= HI (inverted or "
                                         "NaN bound); write NAME=LO:HI")
    if b.fmt not in FORMATS:
        raise OptionError("--format", f"{b.fmt!r}: expected one of {', '.join(FORMATS)}")
    s = b.split
    if (len(s) != 3 or not all(math.isfinite(x) and x >= 0 for x in s)
            or abs(sum(s) - 1) > 1e-6):
        raise OptionError("--split", f"{','.join(f'{x:g}' for x in s)}: expected three "
                                     "non-negative fractions train,val,test summing to 1")
