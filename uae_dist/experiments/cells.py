"""Cells of a matrix: their order, directories, config overrides and config hash.

Cells are numbered in a fixed order (backbones as listed, then each backbone's tasks, featurizers
and the seeds), after the ``exclude`` rules; the number is the Slurm array index. A cell's config
is its backbone's base config with overrides applied in this order (later wins):

    matrix overrides → backbone overrides → task overrides → featurizer overrides
    → featurizer.per_backbone[backbone] → backbone budget → task_budgets[task]
    → data.root, data.targets, train.seed, train.out_dir, train.threads, train.progress=false

The config hash is the sha256 of the resolved config without the keys that cannot change the
result (paths, logging, threads, resume and test hooks) plus the data set's identity (its build
options, else its root): the same hash means the same experiment.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .overrides import override_args
from .schema import Matrix

# Resolved-config keys that do not change what a cell computes.
NOT_HASHED = ("data.root", "data.source", "data.build_limit", "data.num_workers",
              "train.out_dir", "train.resume", "train.threads", "train.progress",
              "train.tensorboard", "train.log_every", "train.keep_last", "train.ckpt_every_steps",
              "train.preempt_exit_code", "train.fail_after_steps", "train.preempt_at_step")


@dataclass(frozen=True)
class Cell:
    index: int
    backbone: str
    task: str
    featurizer: str
    seed: int
    dataset: str
    target: str

    @property
    def name(self) -> str:
        return f"{self.backbone}/{self.task}/{self.featurizer}/seed{self.seed}"

    def dir(self, m: Matrix) -> Path:
        return m.out_root / self.backbone / self.task / self.featurizer / f"seed{self.seed}"

    def axes(self) -> dict:
        return {"backbone": self.backbone, "featurizer": self.featurizer, "task": self.task,
                "dataset": self.dataset, "seed": self.seed}


@dataclass
class Resolved:
    """A cell with its overrides, its command-line arguments and, when the config is valid,
    the resolved config and hash (else ``error`` says what is wrong)."""

    cell: Cell
    dir: Path
    config_path: str
    overrides: dict
    config: dict | None = None
    hash: str | None = None
    error: str | None = None

    @property
    def args(self) -> list[str]:
        return ["--config", self.config_path, *override_args(self.overrides)]


def expand(m: Matrix) -> list[Cell]:
    """Every cell of the matrix, numbered from 0 in the fixed order."""
    cells = []
    for b in m.backbones.values():
        for t in b.tasks:
            task = m.tasks[t]
            for f in b.featurizers:
                for s in m.seeds:
                    c = Cell(len(cells), b.name, t, f, s, task.dataset, task.target)
                    if not any(_matches(c, e.match) for e in m.exclude):
                        cells.append(c)
    return [Cell(k, c.backbone, c.task, c.featurizer, c.seed, c.dataset, c.target)
            for k, c in enumerate(cells)]


def _matches(c: Cell, match: dict) -> bool:
    ax = c.axes()
    return all(ax[k] in vals for k, vals in match.items())


def cell_overrides(m: Matrix, c: Cell) -> dict:
    """The cell's overrides in application order (module docstring)."""
    b, t, f = m.backbones[c.backbone], m.tasks[c.task], m.featurizers[c.featurizer]
    out: dict = {}
    for part in (m.overrides, b.overrides, t.overrides, f.overrides,
                 f.per_backbone.get(b.name, {}), b.budget, b.task_budgets.get(t.name, {})):
        for k, v in part.items():
            out.pop(k, None)  # re-insert: the printed order is the order of application
            out[k] = v
    root = Path(m.datasets[c.dataset].root).resolve()
    out.update({"data.root": str(root), "data.targets": [c.target], "train.seed": c.seed,
                "train.out_dir": str(c.dir(m).resolve()), "train.threads": m.run.threads,
                "train.progress": False})
    return out


def base_config(m: Matrix, backbone: str) -> str:
    """The base config as a path when it exists (as given, or beside the matrix file), else the
    name as given (a shipped config)."""
    given = m.backbones[backbone].config
    for p in (Path(given), m.path.parent / given):
        if p.exists():
            return str(p.resolve())
    return given


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_hash(config: dict, dataset_identity) -> str:
    flat = {k: v for k, v in _flat(config).items() if k not in NOT_HASHED}
    blob = json.dumps({"config": flat, "dataset": dataset_identity}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def dataset_identity(m: Matrix, name: str):
    ds = m.datasets[name]
    return {"build": ds.build} if ds.build else {"root": str(Path(ds.root).resolve())}


def resolve(m: Matrix, c: Cell) -> Resolved:
    """Load the cell's config exactly as ``uae-dist finetune`` will; a bad config is reported in
    ``error`` (naming the key), not raised, so the other cells still run."""
    from uae_dist.config import ConfigError, load_config, to_dict

    ov = cell_overrides(m, c)
    r = Resolved(c, c.dir(m).resolve(), base_config(m, c.backbone), ov)
    try:
        cfg = load_config(r.config_path, override_args(ov))
    except ConfigError as e:
        r.error = f"config error: {e}"
        return r
    r.config = to_dict(cfg)
    r.hash = config_hash(r.config, dataset_identity(m, c.dataset))
    return r


def resolve_all(m: Matrix, cells: list[Cell]) -> list[Resolved]:
    return [resolve(m, c) for c in cells]
