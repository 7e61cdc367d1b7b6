"""One typed configuration for training, fine-tuning and export.

Dataclasses hold the defaults; a YAML file overrides them; dotted ``section.key=value`` arguments
override the YAML (values are parsed as YAML scalars/lists, then checked against the field type).
An unknown section or key is an error that names the closest valid spelling. The resolved config is
a plain dict (``to_dict``) saved as YAML/JSON with every run and checkpoint.

DeepSpeed's own settings stay in DeepSpeed's JSON format (``configs/ds/*.json``); ``ds.config`` points
at one and the training engine fills in batch-size and precision fields consistently.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class DataConfig:
    root: str = "data_build/mp"              # built LMDB directory (manifest.json inside)
    source: str | None = None                 # built from this if root is missing (uae-dist data build)
    build_limit: int | None = None            # only the first N source records when building
    targets: list[str] | None = None          # subset of the data set's targets (None: all of them)
    max_atoms: int = 512                      # atoms per batch per rank (training)
    val_max_atoms: int | None = None          # atoms per batch for validation (default: 2 * max_atoms)
    num_workers: int = 0                      # DataLoader worker processes per rank
    train_limit: int | None = None            # use only the first N training records (smoke runs)
    val_limit: int | None = None


@dataclass
class ModelConfig:
    name: str = "crystal_transformer"        # registry key (uae_dist.models.MODELS)
    variant: str = "periodic"                # periodic (edge attention, invariant) | paper (published recipe)
    emb_dim: int = 128                        # width of the per-element embedding = the UAE
    d_model: int = 256
    layers: int = 8
    heads: int = 8
    ffn_dim: int = 512
    dropout: float = 0.1
    cutoff: float = 8.0                       # Å; edges beyond it are dropped, a smooth envelope inside
    n_rbf: int = 32
    head_hidden: int | None = None            # hidden width of each target head (default d_model)


@dataclass
class OptimConfig:
    lr: float = 3.0e-4
    min_lr_ratio: float = 0.1                 # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: str = "cosine"                  # cosine | constant
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    grad_clip: float = 1.0                    # written into the DeepSpeed config (gradient_clipping)


@dataclass
class TrainConfig:
    out_dir: str = "runs/pretrain"
    epochs: int = 10
    max_steps: int | None = None              # stop after this many optimizer steps (budget)
    seed: int = 0
    loss: str = "mse"                         # mse | l1 | huber, on normalised targets, NaN labels masked
    grad_accum: int = 1
    log_every: int = 20                       # steps between log lines / CSV rows
    val_every: int = 1                        # epochs between validations
    ckpt_every_steps: int | None = None       # also checkpoint every N steps (besides epoch ends)
    keep_last: int = 2                        # step checkpoints kept besides best
    resume: str | None = "auto"               # auto (latest in out_dir if any) | a checkpoint dir | null
    init_from: str | None = None              # warm start: model weights only, from any checkpoint / world size
    deterministic: bool = True
    threads: int | None = None                # torch intra-op threads per rank (default: cores / local ranks)
    progress: bool = True                     # tqdm bar on rank 0
    tensorboard: bool = True
    preempt_exit_code: int = 0                # exit code after a SIGTERM checkpoint (slurm/pretrain.sh requeues)
    fail_after_steps: int | None = None       # testing: hard-exit (os._exit 17) after N steps, no checkpoint


@dataclass
class DSConfig:
    config: str = "configs/ds/zero1.json"    # DeepSpeed JSON (DeepSpeed's own format)
    zero_stage: int | None = None             # override zero_optimization.stage
    precision: str = "auto"                   # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    backend: str = "auto"                     # auto (nccl on GPU, gloo on CPU) | gloo | nccl | mpi


@dataclass
class ExportConfig:
    after_train: bool = True                  # export the best checkpoint when training ends
    out_dir: str | None = None                # default: <train.out_dir>/uae
    formats: list[str] = field(default_factory=lambda: ["safetensors", "npz", "atom_init", "json", "csv"])


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ds: DSConfig = field(default_factory=DSConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# --------------------------------------------------------------------------- type checking
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [v.strip() for v in str(value).split(",") if v.strip()] if isinstance(value, str) else [value]
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


def _apply(obj, values: dict, prefix: str = "") -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = _hints(type(obj))
    for key, val in values.items():
        if key not in hints:
            raise _unknown(key, hints, prefix)
        cur = getattr(obj, key)
        if dataclasses.is_dataclass(cur):
            _apply(cur, val, f"{prefix}{key}.")
        else:
            setattr(obj, key, _coerce(val, hints[key], prefix + key))


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


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    for text in overrides or []:
        path, val = parse_override(text)
        nested: Any = val
        for part in reversed(path):
            nested = {part: nested}
        _apply(cfg, nested)
    return cfg


def validate(cfg: Config) -> Config:
    choices = {"model.variant": (cfg.model.variant, ("periodic", "paper")),
               "train.loss": (cfg.train.loss, ("mse", "l1", "huber")),
               "optim.schedule": (cfg.optim.schedule, ("cosine", "constant")),
               "ds.precision": (cfg.ds.precision, ("auto", "fp32", "bf16")),
               "ds.backend": (cfg.ds.backend, ("auto", "gloo", "nccl", "mpi"))}
    for k, (v, ok) in choices.items():
        if v not in ok:
            raise ConfigError(f"{k}={v!r}: must be one of {', '.join(ok)}")
    if cfg.model.d_model % cfg.model.heads:
        raise ConfigError(f"model.d_model={cfg.model.d_model} is not divisible by model.heads={cfg.model.heads}")
    if cfg.model.variant == "paper" and cfg.model.d_model <= cfg.model.emb_dim:
        raise ConfigError(f"model.variant=paper concatenates element ({cfg.model.emb_dim}) and coordinate features: "
                          f"model.d_model={cfg.model.d_model} must exceed model.emb_dim")
    if cfg.ds.zero_stage not in (None, 0, 1, 2):
        raise ConfigError("ds.zero_stage must be 0, 1 or 2 (stage 3 is not supported by this engine)")
    for k in ("data.max_atoms", "train.epochs", "train.grad_accum", "model.layers", "model.heads"):
        sec, name = k.split(".")
        if getattr(getattr(cfg, sec), name) < 1:
            raise ConfigError(f"{k} must be >= 1")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults ← YAML file ← dotted overrides, validated."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} not found")
        data = yaml.safe_load(p.read_text()) or {}
        try:
            _apply(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
    apply_overrides(cfg, overrides or [])
    return validate(cfg)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    cfg = Config()
    _apply(cfg, d)
    return validate(cfg)


def dump_yaml(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg,
                                         sort_keys=False))


def to_json(cfg) -> str:
    return json.dumps(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, sort_keys=True)
