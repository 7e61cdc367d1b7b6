"""Typed config: YAML + dotted overrides, clear errors, shipped configs and DeepSpeed JSON."""
import json
from pathlib import Path

import pytest

from uae_dist.config import Config, ConfigError, from_dict, load_config, to_dict
from uae_dist.train.optim import ds_config, lr_at

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  layers: 3\ntrain:\n  epochs: 5\n")
    cfg = load_config(p, ["train.epochs=2", "model.dropout=0", "data.targets=band_gap,e_form_per_atom",
                          "optim.lr=1e-3", "train.max_steps=null", "optim.betas=[0.9, 0.95]"])
    assert cfg.model.layers == 3 and cfg.train.epochs == 2 and cfg.model.dropout == 0.0
    assert cfg.data.targets == ["band_gap", "e_form_per_atom"] and cfg.optim.lr == 1e-3
    assert cfg.train.max_steps is None and cfg.optim.betas == [0.9, 0.95]
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("override,msg", [
    ("train.epoch=2", "did you mean 'epochs'"),
    ("trian.epochs=2", "did you mean 'train'"),
    ("train.epochs=two", "expected an integer"),
    ("model.variant=foo", "periodic, paper"),
    ("model.heads=3", "not divisible"),
    ("train.epochs", "section.key=value"),
])
def test_errors(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [override])


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  layer: 3\n")
    with pytest.raises(ConfigError, match="model.layer"):
        load_config(p)


@pytest.mark.parametrize("name", ["pretrain", "pretrain_full", "pretrain_smoke", "configs/pretrain.yaml"])
def test_shipped_configs_load(name):
    assert isinstance(load_config(name), Config)


def test_ds_json_and_batch_fields():
    for f in sorted((ROOT / "uae_dist" / "configs" / "ds").glob("*.json")):
        json.loads(f.read_text())
    cfg = load_config(None, ["ds.config=zero2", "train.grad_accum=3"])
    d = ds_config(cfg, world=4, on_gpu=False)
    assert d["train_batch_size"] == 12 and d["train_micro_batch_size_per_gpu"] == 1
    assert d["gradient_accumulation_steps"] == 3 and d["zero_optimization"]["stage"] == 2
    assert d["bf16"]["enabled"] is False and ds_config(cfg, 1, on_gpu=True)["bf16"]["enabled"] is True
    cfg.ds.precision = "bf16"
    bf = ds_config(cfg, 1, on_gpu=False)
    assert bf["bf16"]["enabled"] is True
    # gradients accumulate and are reduced in fp32 under bf16 (issue 7.5)
    assert bf["data_types"]["grad_accum_dtype"] == "fp32" and bf["communication_data_type"] == "fp32"
    cfg.ds.zero_stage = 0  # DeepSpeed's stage-0 bf16 would accumulate in bf16: refused
    with pytest.raises(ConfigError, match="ZeRO stage 1 or 2"):
        ds_config(cfg, 1, on_gpu=False)


def test_lr_schedule():
    oc = load_config(None, ["optim.warmup_steps=10", "optim.lr=1.0", "optim.min_lr_ratio=0.1"]).optim
    assert lr_at(0, 0.0, oc) == pytest.approx(0.1) and lr_at(9, 0.09, oc) == pytest.approx(1.0)
    assert lr_at(100, 1.0, oc) == pytest.approx(0.1)
    assert lr_at(50, 0.5, oc) == pytest.approx(0.55)  # cosine in the fraction of the run done
