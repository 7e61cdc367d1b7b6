"""One typed configuration for pretraining and fine-tuning.

Dataclasses hold the defaults (once, here and in each model's config class); a YAML file overrides
them; dotted ``section.key=value`` arguments override the YAML (values parse as YAML scalars or
lists, then are checked against the field's type and bounds). The ``model`` section's class is
chosen by ``model.name`` from the model registry, so each backbone has its own typed keys. An
unknown section or key is an error naming the closest valid spelling; a number outside its bounds
(``model.cutoff=-1``, ``optim.lr=-1``, ``model.dropout=2``, ``nan``) is an error naming the key.

Configs ship inside the package (``uae_dist/configs``): ``--config pretrain`` and
``--config configs/pretrain.yaml`` both find ``pretrain.yaml`` there when no such file exists;
any other value is a path. A file may start from another with ``base: NAME_OR_PATH`` and
override only some keys (mappings merge, any other value replaces the base's). DeepSpeed's own
settings stay in DeepSpeed's JSON (``ds.config``: a packaged name such as ``zero1`` or a path);
the engine fills in batch-size and precision fields.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from uae_dist.fields import bounded, check_value
from uae_dist.models import ModelConfig, model_config_class

PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    pass


@dataclass
class DataConfig:
    root: str = "data_build/mp"         # built LMDB directory (manifest.json inside)
    source: str | None = None           # built from this if root is missing (uae-dist data build)
    build_limit: int | None = bounded(None, ge=1)  # only the first N source records when building
    targets: list[str] | None = None    # subset of the data set's targets (None: all of them)
    max_atoms: int | None = bounded(512, ge=1)     # atoms per batch per rank (None: no cap)
    max_edges: int | None = bounded(None, ge=1)    # edges per batch per rank, after narrowing
    max_structures: int | None = bounded(None, ge=1)  # structures per batch per rank
    val_max_atoms: int | None = bounded(None, ge=1)   # evaluation batches (default 2 * max_atoms)
    num_workers: int = bounded(0, ge=0)  # DataLoader worker processes per rank
    train_limit: int | None = bounded(None, ge=1)  # only the first N training records (smoke runs)
    val_limit: int | None = bounded(None, ge=1)
    test_limit: int | None = bounded(None, ge=1)
    hold_out: str | None = None         # a split (file or shipped name): its val/test ids never train


@dataclass
class OptimConfig:
    name: str = "adamw"                 # adamw | sgd
    lr: float = bounded(3.0e-4, gt=0)
    momentum: float = bounded(0.9, ge=0, lt=1)  # sgd only
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = bounded(100, ge=0)
    schedule: str = "cosine"            # cosine | constant, over the run's epochs (or max_steps)
    weight_decay: float = bounded(0.01, ge=0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = bounded(1.0e-8, gt=0)
    grad_clip: float = bounded(1.0, ge=0)  # DeepSpeed gradient_clipping (0: off)


@dataclass
class TrainConfig:
    out_dir: str = "runs/pretrain"
    epochs: int = bounded(10, ge=1)
    max_steps: int | None = bounded(None, ge=1)  # stop after this many optimizer steps (budget)
    seed: int = 0
    loss: str = "mse"                   # mse | l1 | huber, on normalised targets, NaN labels masked
    grad_accum: int = bounded(1, ge=1)
    log_every: int = bounded(20, ge=1)  # steps between log lines / CSV rows
    val_every: int = bounded(1, ge=1)   # epochs between validations
    ckpt_every_steps: int | None = bounded(None, ge=1)  # also checkpoint every N steps
    keep_last: int = bounded(2, ge=1)   # step checkpoints kept besides best
    resume: str | None = "auto"         # auto (latest in out_dir if any) | a checkpoint dir | null
    init_from: str | None = None        # warm start: weights only, from any checkpoint/world size
    test: bool = True                   # evaluate the best checkpoint on the test split at the end
    deterministic: bool = True
    threads: int | None = bounded(None, ge=1)  # torch threads per rank (cores / local ranks)
    keep_freed_memory: bool = True      # freed memory stays in the process (train/memory.py)
    progress: bool = True               # tqdm bar on rank 0
    tensorboard: bool = True
    preempt_exit_code: int = 0          # exit code after a SIGTERM checkpoint (Slurm requeues)
    # testing hooks: hard-exit (os._exit 17) after N steps with no checkpoint; or act as if a
    # SIGTERM arrived at step N (checkpoint, exit as pre-empted)
    fail_after_steps: int | None = bounded(None, ge=1)
    preempt_at_step: int | None = bounded(None, ge=1)


@dataclass
class DSConfig:
    config: str = "zero1"               # DeepSpeed JSON: packaged zero0|zero1|zero2, or a path
    zero_stage: int | None = None       # override zero_optimization.stage (0, 1, 2)
    precision: str = "auto"             # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    backend: str = "auto"               # auto (nccl on GPU, gloo on CPU) | gloo | nccl | mpi
    cap_buckets: bool = True            # ZeRO buckets no larger than the model (optim.cap_buckets)


@dataclass
class ExportConfig:
    after_train: bool = True            # export the best checkpoint when training ends
    out_dir: str | None = None          # default: <train.out_dir>/uae
    formats: list[str] = field(
        default_factory=lambda: ["safetensors", "npz", "atom_init", "json", "csv"])
    include_unseen: bool = False        # also write untrained rows to the text formats


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=lambda: model_config_class("crystal_transformer")())
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ds: DSConfig = field(default_factory=DSConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


CHOICES = {"optim.name": ("adamw", "sgd"), "optim.schedule": ("cosine", "constant"),
           "train.loss": ("mse", "l1", "huber"), "ds.precision": ("auto", "fp32", "bf16"),
           "ds.backend": ("auto", "gloo", "nccl", "mpi")}


# --------------------------------------------------------------------------- type coercion
def _coerce(value: Any, tp, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = args or (Any,)
        return [_coerce(v, inner, f"{where}[{k}]") for k, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")


def _unknown(key: str, valid, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {where + key!r}{hint}; valid: {', '.join(sorted(valid))}")


def _build(cls, values: dict, prefix: str):
    """An instance of dataclass ``cls`` from its defaults updated with ``values``."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    obj = cls()
    for key, val in values.items():
        if key not in hints:
            raise _unknown(key, hints, prefix)
        if key == "model" and cls is Config:
            setattr(obj, key, _build_model(val, f"{prefix}model."))
        elif dataclasses.is_dataclass(hints[key]):
            setattr(obj, key, _build(hints[key], val, f"{prefix}{key}."))
        else:
            setattr(obj, key, _coerce(val, hints[key], prefix + key))
    return obj


def _build_model(values, prefix: str) -> ModelConfig:
    values = dict(values or {}) if isinstance(values, dict) or values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"model: expected a mapping, got {values!r}")
    name = values.get("name", ModelConfig.name)
    try:
        cls = model_config_class(str(name))
    except KeyError as e:
        raise ConfigError(f"model.name: {e.args[0]}") from None
    return _build(cls, values, prefix)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        val = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        val = raw
    return key.split("."), val


def _overrides_dict(overrides: list[str]) -> dict:
    out: dict = {}
    for text in overrides or []:
        path, val = parse_override(text)
        nested: Any = val
        for part in reversed(path):
            nested = {part: nested}
        out = _merge(out, nested)
    return out


# --------------------------------------------------------------------------- validation
def _walk(obj, prefix=""):
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from _walk(v, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", v, f.metadata


def validate(cfg: Config) -> Config:
    for name, value, meta in _walk(cfg):
        vals = value if isinstance(value, list) else [value]
        for v in vals:
            why = check_value(name, v, meta) if meta else check_value(name, v, {"finite": True})
            if why:
                raise ConfigError(why)
        if name in CHOICES and value not in CHOICES[name]:
            raise ConfigError(f"{name}={value!r}: must be one of {', '.join(CHOICES[name])}")
    try:
        cfg.model.check()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.ds.zero_stage not in (None, 0, 1, 2):
        raise ConfigError("ds.zero_stage must be 0, 1 or 2 (stage 3 is not supported)")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas={cfg.optim.betas}: two numbers in [0, 1)")
    if cfg.data.max_atoms is None and cfg.data.max_structures is None:
        raise ConfigError("set data.max_atoms or data.max_structures (a batch needs a cap)")
    return cfg


# --------------------------------------------------------------------------- loading
def find_config(name_or_path: str | Path, kind: str = "yaml") -> Path:
    """A path that exists, else a config shipped in the package (``pretrain``, ``zero1``, or
    ``configs/pretrain.yaml`` / ``configs/ds/zero1.json`` as they were named in the checkout)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    sub = PACKAGE_CONFIGS / "ds" if kind == "json" else PACKAGE_CONFIGS
    cand = sub / (p.name if p.suffix == f".{kind}" else f"{p.name}.{kind}")
    if cand.exists():
        return cand
    shipped = sorted(q.stem for q in sub.glob(f"*.{kind}"))
    raise ConfigError(f"config {str(name_or_path)!r} not found: give a path or a shipped name "
                      f"({', '.join(shipped)})")


def _read_yaml(p: Path, seen: tuple = ()) -> dict:
    """A config file's sections, over those of its ``base:`` (a path beside it or a shipped
    name, itself possibly based on another) so a recipe states only what it changes."""
    if p.resolve() in seen:
        raise ConfigError(f"{p}: base configs form a cycle: "
                          + " -> ".join(str(q) for q in (*seen, p.resolve())))
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    near = p.parent / str(base)
    bp = near if near.is_file() else find_config(str(base))
    return _merge(_read_yaml(bp, (*seen, p.resolve())), raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults ← YAML file (path or shipped name) ← dotted overrides, validated."""
    raw = _read_yaml(find_config(path)) if path is not None else {}
    try:
        cfg = _build(Config, _merge(raw, _overrides_dict(overrides or [])), "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None
    return validate(cfg)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    return validate(_build(Config, copy.deepcopy(d), ""))


def dump_yaml(cfg, path: str | Path) -> None:
    d = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    Path(path).write_text(yaml.safe_dump(d, sort_keys=False))


def to_json(cfg) -> str:
    return json.dumps(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, sort_keys=True)
