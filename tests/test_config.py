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


@pytest.mark.parametrize("name", ["pretrain", "pretrain_full", "pretrain_smoke",
                                  "configs/pretrain.yaml", "pretrain_mp_v1", "pretrain_mp_st_ef",
                                  "pretrain_mp_st_gap", "pretrain_mp_mt5", "pretrain_mp_paper"])
def test_shipped_configs_load(name):
    assert isinstance(load_config(name), Config)


def test_base_config_is_merged_under_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  layers: 5\n  heads: 2\ntrain:\n  epochs: 7\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nmodel:\n  heads: 4\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\ntrain:\n  epochs: 1\n")
    cfg = load_config(tmp_path / "c.yaml", ["model.layers=2"])
    assert (cfg.model.layers, cfg.model.heads, cfg.train.epochs) == (2, 4, 1)
    # a shipped name as the base: the recipe equals its base with the recipe's keys overridden
    st = load_config("pretrain_mp_st_gap")
    assert to_dict(st) == to_dict(load_config("pretrain_mp_v1", [
        "data.targets=[band_gap]", "train.out_dir=runs/pretrain_mp_st_gap"]))
    (tmp_path / "a.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: no_such_config\n")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "d.yaml")


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


@pytest.mark.parametrize("override,msg", [
    ("model.cutoff=-1", "model.cutoff=-1.0 must be > 0"),
    ("model.cutoff=0", "model.cutoff=0.0 must be > 0"),
    ("model.cutoff=nan", "model.cutoff=nan must be a finite number"),
    ("model.heads=0", "model.heads=0 must be >= 1"),
    ("optim.lr=-1", "optim.lr=-1.0 must be > 0"),
    ("optim.lr=inf", "optim.lr=inf must be a finite number"),
    ("train.max_steps=-5", "train.max_steps=-5 must be >= 1"),
    ("model.dropout=2", "model.dropout=2.0 must be < 1"),
    ("data.max_atoms=0", "data.max_atoms=0 must be >= 1"),
    ("optim.name=lamb", "must be one of adamw, sgd"),
    ("model.name=nope", "unknown model 'nope'"),
])
def test_numbers_outside_their_bounds_are_refused(override, msg):
    """Issue 8.8: each bad number is an error naming the option, at config time."""
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(".", r"\.")):
        load_config("pretrain_smoke", [override])


@pytest.mark.timeout(120)
def test_bad_config_exits_2_before_start_up_and_leaves_no_directory(tmp_path):
    """…before any expensive start-up (no process group, no data), leaving nothing to block a
    rerun: exit 2, the option named, no output directory."""
    import subprocess
    import sys

    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "launch/train.py", "--config", "pretrain_smoke",
                        f"train.out_dir={out}", "model.cutoff=-1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=100,
                       env={"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu"})
    assert p.returncode == 2 and "model.cutoff=-1.0 must be > 0" in p.stderr, p.stderr
    assert not out.exists()


def test_model_sections_are_typed_per_backbone(tmp_path):
    cfg = load_config("pretrain_smoke", ["model.variant=paper", "model.d_model=64"])
    assert type(cfg.model).__name__ == "CrystalTransformerConfig" and cfg.model.variant == "paper"
    assert cfg.model.graph() == {}  # the paper variant reads no edges
    assert load_config("pretrain_smoke").model.graph() == {"cutoff": 5.0}
    with pytest.raises(ConfigError, match="config 'no_such_config' not found"):
        load_config("no_such_config")


def test_normaliser_refuses_labels_it_cannot_scale():
    """Issue 8.8: a label of 1e308 would give an infinite std and a silently dropped target."""
    import numpy as np

    from uae_dist.train.targets import Normalizer

    y = np.array([[1.0, 2.0], [1e308, 3.0], [-1e308, np.nan]])
    with pytest.raises(ValueError, match="'a'.*remove the outliers"):
        Normalizer.fit(y, ["a", "b"])
    with pytest.raises(ValueError, match="'b' has no label"):
        Normalizer.fit(np.array([[1.0, np.nan]]), ["a", "b"])
    n = Normalizer.fit(y[:1, :1].repeat(3, 0) + np.arange(3)[:, None], ["a"])
    assert n.mean.dtype == np.float64 and n.std[0] == pytest.approx(1.0)


def test_auto_bf16_on_gpu_lifts_zero0_to_zero1():
    """Fine-tuning configs use ZeRO-0 (no partition hooks on small models); where ds.precision=auto
    picks bf16 (a GPU), the engine needs fp32 gradient accumulation, i.e. ZeRO-1."""
    cfg = load_config("finetune_cgcnn")
    assert ds_config(cfg, 1, on_gpu=False)["zero_optimization"]["stage"] == 0
    assert ds_config(cfg, 1, on_gpu=True)["zero_optimization"]["stage"] == 1
    # the CPU pretraining default is ZeRO-0 too: bf16 asked for on a GPU gets ZeRO-1 (docs/gpu.md)
    bf16 = load_config("pretrain", ["ds.precision=bf16"])
    assert ds_config(bf16, 1, on_gpu=True)["zero_optimization"]["stage"] == 1


def test_zero_buckets_are_capped_at_the_model_size():
    # DeepSpeed allocates a fresh reduce bucket every step: 5e7 elements for a 0.13 M-parameter
    # model made page faults most of a CPU step (issue 14)
    cfg = load_config("pretrain", ["ds.config=zero1"])  # the CPU default is ZeRO-0
    z = ds_config(cfg, 2, on_gpu=False, n_params=130_001)["zero_optimization"]
    assert z["stage"] == 1 and z["reduce_bucket_size"] == z["allgather_bucket_size"] == 130_048
    big = ds_config(cfg, 2, on_gpu=False, n_params=10**9)["zero_optimization"]
    assert big["reduce_bucket_size"] == 50_000_000  # never above the shipped bucket
    off = load_config("pretrain", ["ds.config=zero1", "ds.cap_buckets=false"])
    assert ds_config(off, 2, False, n_params=130_000)["zero_optimization"][
        "reduce_bucket_size"] == 50_000_000
    ft = load_config("finetune_cgcnn")  # stage 0: no buckets, nothing changed
    assert ds_config(ft, 1, False, n_params=10) == ds_config(ft, 1, False)
