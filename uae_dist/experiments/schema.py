"""The experiment-matrix file: one typed schema, parsed strictly.

A matrix crosses backbones × featurizers × tasks (a target on a data set) × seeds; every named
value carries config overrides (``{dotted.key: value}`` or a list of ``"dotted.key=value"``)
that are applied on top of the backbone's base config. See ``docs/experiments.md``.

An unknown key is an error naming it (with the closest valid spelling); so is a missing required
key, a value of the wrong type, a name that is not defined, and a featurizer that touches a key
of a backbone's budget (every featurizer of a backbone trains with the same budget).
"""
from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .overrides import MatrixError, overrides

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # names become directory names

# Options of the data build the matrix controls, so a build spec may not set them.
BUILD_CONTROLLED = {"out_dir", "resume", "overwrite", "progress", "use_mpi"}


@dataclass(frozen=True)
class Dataset:
    name: str
    root: str                      # built LMDB directory (relative paths: to the working dir)
    build: dict | None             # keyword arguments of uae_dist.data.build.build_lmdb, or None


@dataclass(frozen=True)
class Task:
    name: str
    dataset: str
    target: str
    units: str | None
    overrides: dict


@dataclass(frozen=True)
class Featurizer:
    name: str
    overrides: dict
    per_backbone: dict             # backbone name → overrides applied after ``overrides``
    description: str


@dataclass(frozen=True)
class Backbone:
    name: str
    config: str                    # base config: a path or a shipped config name
    default_featurizer: str        # the reference of the % change column
    featurizers: tuple[str, ...]
    tasks: tuple[str, ...]
    budget: dict                   # overrides applied last, the same for every featurizer
    task_budgets: dict             # task name → budget overrides for that task
    overrides: dict


@dataclass(frozen=True)
class RunOptions:
    jobs: int = 1                  # cells at once on one machine
    threads: int = 1               # torch threads per cell (train.threads, OMP_NUM_THREADS)
    launcher: tuple[str, ...] = ()  # prefix of each cell's command, e.g. ("srun",)
    timeout_s: float | None = None  # per attempt; then SIGTERM (checkpoint) and failure
    env: dict = field(default_factory=dict)  # extra environment of every cell


@dataclass(frozen=True)
class Exclude:
    match: dict                    # axis → allowed values; a cell matching every axis is dropped


@dataclass(frozen=True)
class Matrix:
    name: str
    path: Path
    sha256: str
    out_root: Path
    seeds: tuple[int, ...]
    datasets: dict
    tasks: dict
    backbones: dict
    featurizers: dict
    overrides: dict
    exclude: tuple[Exclude, ...]
    run: RunOptions
    reuse: tuple[Path, ...] = ()   # other matrices' out_roots whose done cells of the same
                                   # config hash (and data) are copied instead of re-run


# --------------------------------------------------------------------------- helpers
def _fail(where: str, msg: str) -> MatrixError:
    return MatrixError(f"{where}: {msg}")


def _keys(raw, where: str, required: set, optional: set) -> dict:
    """``raw`` as a mapping whose keys are all known and whose required keys are present."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _fail(where, f"expected a mapping, got {type(raw).__name__} {raw!r}")
    valid = required | optional
    for k in raw:
        if k not in valid:
            close = difflib.get_close_matches(str(k), list(valid), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _fail(f"{where}.{k}", f"unknown key{hint}; valid: {', '.join(sorted(valid))}")
    for k in sorted(required - set(raw)):
        raise _fail(f"{where}.{k}", "required key missing")
    return raw


def _str(v, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise _fail(where, f"expected a non-empty string, got {v!r}")
    return v


def _name(v, where: str) -> str:
    if not isinstance(v, str) or not NAME.match(v):
        raise _fail(where, f"{v!r} is not a valid name (letters, digits, _ . + -)")
    return v


def _int(v, where: str, lo: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo):
        raise _fail(where, f"expected an integer{f' >= {lo}' if lo is not None else ''}, got {v!r}")
    return v


def _names(raw, where: str, defined: dict, default: tuple) -> tuple[str, ...]:
    if raw is None:
        return default
    if not isinstance(raw, list) or not raw:
        raise _fail(where, f"expected a non-empty list of names, got {raw!r}")
    for k, n in enumerate(raw):
        if n not in defined:
            raise _fail(f"{where}[{k}]", f"{n!r} is not defined; defined: {', '.join(defined)}")
    if len(set(raw)) != len(raw):
        raise _fail(where, f"names repeat in {raw}")
    return tuple(raw)


# --------------------------------------------------------------------------- sections
def _build_spec(raw, where: str) -> dict | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _fail(where, f"expected a mapping of build options, got {raw!r}")
    from dataclasses import fields

    from uae_dist.data.options import BuildOptions, RunOptions

    params = {f.name for cls in (BuildOptions, RunOptions) for f in fields(cls)} | {"source"}
    valid = {p for p in params if p not in BUILD_CONTROLLED}
    spec = _keys(dict(raw), where, {"source"}, valid - {"source"})
    for k in ("source", "targets", "fmt"):
        if k in spec and isinstance(spec[k], str):
            _str(spec[k], f"{where}.{k}")
    if isinstance(spec.get("targets"), str):
        spec["targets"] = [t.strip() for t in spec["targets"].split(",") if t.strip()]
    return spec


def _dataset(name, raw, where: str) -> Dataset:
    r = _keys(raw, where, {"root"}, {"build"})
    return Dataset(_name(name, where), _str(r["root"], f"{where}.root"),
                   _build_spec(r.get("build"), f"{where}.build"))


def _task(name, raw, where: str, datasets: dict) -> Task:
    r = _keys(raw, where, {"dataset", "target"}, {"units", "overrides"})
    if r["dataset"] not in datasets:
        raise _fail(f"{where}.dataset", f"{r['dataset']!r} is not defined under datasets "
                    f"({', '.join(datasets) or 'none'})")
    units = r.get("units")
    return Task(_name(name, where), r["dataset"], _str(r["target"], f"{where}.target"),
                None if units is None else _str(units, f"{where}.units"),
                overrides(r.get("overrides"), f"{where}.overrides"))


def _featurizer(name, raw, where: str) -> Featurizer:
    if isinstance(raw, list):  # shorthand: the list of overrides
        raw = {"overrides": raw}
    r = _keys(raw, where, set(), {"overrides", "per_backbone", "description"})
    per = r.get("per_backbone") or {}
    if not isinstance(per, dict):
        raise _fail(f"{where}.per_backbone", f"expected backbone name → overrides, got {per!r}")
    return Featurizer(_name(name, where), overrides(r.get("overrides"), f"{where}.overrides"),
                      {b: overrides(o, f"{where}.per_backbone.{b}") for b, o in per.items()},
                      str(r.get("description") or ""))


def _backbone(name, raw, where: str, tasks: dict, feats: dict) -> Backbone:
    r = _keys(raw, where, {"config"}, {"default_featurizer", "featurizers", "tasks", "budget",
                                       "task_budgets", "overrides"})
    fz = _names(r.get("featurizers"), f"{where}.featurizers", feats, tuple(feats))
    ts = _names(r.get("tasks"), f"{where}.tasks", tasks, tuple(tasks))
    default = r.get("default_featurizer")
    if default is None:  # convention: a featurizer named "default", else the first listed
        default = "default" if "default" in fz else fz[0]
    elif default not in fz:
        raise _fail(f"{where}.default_featurizer", f"{default!r} is not one of this backbone's "
                    f"featurizers ({', '.join(fz)})")
    tb = r.get("task_budgets") or {}
    if not isinstance(tb, dict):
        raise _fail(f"{where}.task_budgets", f"expected task name → overrides, got {tb!r}")
    for t in tb:
        if t not in ts:
            raise _fail(f"{where}.task_budgets.{t}",
                        f"not a task of this backbone ({', '.join(ts)})")
    return Backbone(_name(name, where), _str(r["config"], f"{where}.config"), default, fz, ts,
                    overrides(r.get("budget"), f"{where}.budget"),
                    {t: overrides(o, f"{where}.task_budgets.{t}") for t, o in tb.items()},
                    overrides(r.get("overrides"), f"{where}.overrides"))


def _run(raw, where: str) -> RunOptions:
    r = _keys(raw, where, set(), {"jobs", "threads", "launcher", "timeout_s", "env"})
    launcher = r.get("launcher") or ()
    if isinstance(launcher, str):
        import shlex

        launcher = tuple(shlex.split(launcher))
    elif not (isinstance(launcher, (list, tuple)) and all(isinstance(x, str) for x in launcher)):
        raise _fail(f"{where}.launcher",
                    f"expected a command prefix (string or list), got {launcher!r}")
    t = r.get("timeout_s")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0):
        raise _fail(f"{where}.timeout_s", f"expected seconds > 0, got {t!r}")
    env = r.get("env") or {}
    if not isinstance(env, dict):
        raise _fail(f"{where}.env", f"expected a mapping NAME: value, got {env!r}")
    return RunOptions(_int(r.get("jobs", 1), f"{where}.jobs", 1),
                      _int(r.get("threads", 1), f"{where}.threads", 1), tuple(launcher),
                      None if t is None else float(t), {str(k): str(v) for k, v in env.items()})


AXES = ("backbone", "featurizer", "task", "dataset", "seed")


def _exclude(raw, where: str, m: dict) -> tuple[Exclude, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _fail(where, f"expected a list of {{axis: value(s)}}, got {raw!r}")
    out = []
    for k, e in enumerate(raw):
        w = f"{where}[{k}]"
        e = _keys(e, w, set(), set(AXES))
        if not e:
            raise _fail(w, "an empty rule would drop every cell")
        match = {}
        for axis, vals in e.items():
            vals = tuple(vals) if isinstance(vals, list) else (vals,)
            for v in vals:
                if v not in m[axis]:
                    raise _fail(f"{w}.{axis}", f"{v!r} is not a defined {axis}")
            match[axis] = vals
        out.append(Exclude(match))
    return tuple(out)


def _check_budgets(bbs: dict, feats: dict) -> None:
    for b in bbs.values():
        fixed = set(b.budget) | {k for o in b.task_budgets.values() for k in o}
        for f in b.featurizers:
            fz = feats[f]
            for key in set(fz.overrides) | set(fz.per_backbone.get(b.name, {})):
                if key in fixed:
                    raise MatrixError(f"featurizers.{f}: sets {key}, which is in the budget of "
                                      f"backbones.{b.name}: every featurizer of a backbone trains "
                                      "with the same budget")


TOP_REQUIRED = {"out_root", "seeds", "datasets", "tasks", "backbones", "featurizers"}
TOP_OPTIONAL = {"name", "overrides", "exclude", "run", "description", "reuse"}


def parse(raw: dict, path: Path, text: str = "", out_root: str | None = None) -> Matrix:
    """A ``Matrix`` from the parsed YAML ``raw`` (``path`` names the file in errors)."""
    w = str(path)
    r = _keys(raw, w, TOP_REQUIRED, TOP_OPTIONAL)

    def section(key):
        s = r[key]
        if not isinstance(s, dict) or not s:
            raise _fail(key, f"expected a non-empty mapping of name → entry, got {s!r}")
        return s

    try:
        datasets = {n: _dataset(n, v, f"datasets.{n}") for n, v in section("datasets").items()}
        tasks = {n: _task(n, v, f"tasks.{n}", datasets) for n, v in section("tasks").items()}
        feats = {n: _featurizer(n, v, f"featurizers.{n}")
                 for n, v in section("featurizers").items()}
        bbs = {n: _backbone(n, v, f"backbones.{n}", tasks, feats)
               for n, v in section("backbones").items()}
        for f in feats.values():
            for b in f.per_backbone:
                if b not in bbs:
                    raise _fail(f"featurizers.{f.name}.per_backbone.{b}", "not a defined backbone")
        _check_budgets(bbs, feats)
        seeds = r["seeds"]
        if not isinstance(seeds, list) or not seeds:
            raise _fail("seeds", f"expected a non-empty list of integers, got {seeds!r}")
        seeds = tuple(_int(s, f"seeds[{k}]") for k, s in enumerate(seeds))
        if len(set(seeds)) != len(seeds):
            raise _fail("seeds", f"seeds repeat in {list(seeds)}")
        axes = {"backbone": bbs, "featurizer": feats, "task": tasks, "dataset": datasets,
                "seed": set(seeds)}
        exclude = _exclude(r.get("exclude"), "exclude", axes)
        run = _run(r.get("run"), "run")
        glob = overrides(r.get("overrides"), "overrides")
        root = out_root or _str(r["out_root"], "out_root")
        name = _name(r.get("name") or Path(path).stem, "name")
        reuse = r.get("reuse") or []
        if not isinstance(reuse, list):
            raise _fail("reuse", f"expected a list of other matrices' out_root, got {reuse!r}")
        reuse = tuple(Path(_str(v, f"reuse[{k}]")) for k, v in enumerate(reuse))
    except MatrixError as e:
        raise MatrixError(f"{w}: {e}") from None
    return Matrix(name, Path(path), hashlib.sha256(text.encode()).hexdigest(), Path(root),
                  seeds, datasets, tasks, bbs, feats, glob, exclude, run, reuse)


def find_matrix(name_or_path) -> Path:
    """A path that exists, else a matrix shipped in ``uae_dist/configs`` (``matrix_smoke``)."""
    from uae_dist.config import PACKAGE_CONFIGS

    p = Path(name_or_path)
    if p.exists():
        return p
    cand = PACKAGE_CONFIGS / (p.name if p.suffix == ".yaml" else f"{p.name}.yaml")
    if cand.exists() and cand.stem.startswith("matrix"):
        return cand
    shipped = sorted(q.stem for q in PACKAGE_CONFIGS.glob("matrix*.yaml"))
    raise MatrixError(f"matrix {str(name_or_path)!r} not found: give a path or a shipped name "
                      f"({', '.join(shipped)})")


def load_matrix(name_or_path, out_root: str | None = None) -> Matrix:
    """Read and check a matrix file; ``out_root`` replaces the file's ``out_root``."""
    p = find_matrix(name_or_path)
    text = p.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MatrixError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise MatrixError(f"{p}: expected a mapping at the top level")
    return parse(raw, p, text, out_root)


__all__ = ["Matrix", "MatrixError", "Dataset", "Task", "Featurizer", "Backbone", "RunOptions",
           "load_matrix", "find_matrix", "parse", "AXES"]
