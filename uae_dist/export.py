"""Export the universal atomic embeddings (UAEs) of a pretraining checkpoint.

``uae-dist export CKPT --out DIR`` writes, for elements Z = 1..100 (row k is Z = k + 1):

    uae.safetensors   tensors ``embedding`` (100, d) float32, ``z`` (100,), ``seen`` (100,) uint8
    uae.npz           the same arrays plus ``symbols``
    atom_init.json    CGCNN's format {"1": [...], ..., "100": [...]}: drop-in for CGCNN / ALIGNN
    embedding.json    {"H": [...], ...}: ``elementembeddings.core.Embedding.from_json``
    embedding.csv     element,0,1,...: ``elementembeddings.core.Embedding.from_csv``
    model_card.json   provenance: checkpoint and data-manifest sha256, config, targets, validation
                      metrics, package version, date, elements seen / never seen in training

Rows of elements that never occurred in a training batch are untrained (their initial values); they
are listed in the card (``elements_unseen``) and flagged by ``seen`` / ``load_uae(...).seen``;
``--only-seen`` leaves them out of the JSON/CSV/atom_init files.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uae_dist.data.lmdb_store import file_sha256

ALL_FORMATS = ("safetensors", "npz", "atom_init", "json", "csv")
N_ELEMENTS = 100


def symbols() -> list[str]:
    from pymatgen.core.periodic_table import Element

    return [Element.from_Z(z).symbol for z in range(1, N_ELEMENTS + 1)]


def embedding_from_checkpoint(path) -> tuple[np.ndarray, dict]:
    """(100, d) float32 table and the decoded checkpoint (weights_only load)."""
    import torch

    from uae_dist.config import from_dict
    from uae_dist.models import build_model
    from uae_dist.train import checkpoint as ckpt

    ck = ckpt.read_model(path)
    cfg = from_dict(ck["config"])
    targets = ck["meta"].get("targets") or cfg.data.targets
    model = build_model(cfg.model, targets)
    model.load_state_dict({k: v.to(torch.float32) for k, v in ck["model"].items()})
    table = model.element_embedding().to(torch.float32).cpu().numpy()
    if table.shape[0] != N_ELEMENTS:
        raise ValueError(f"embedding has {table.shape[0]} rows, expected {N_ELEMENTS}")
    return table, ck


def export(checkpoint, out_dir, formats=None, only_seen: bool = False) -> dict:
    """Write the files listed in the module docstring; return the model card."""
    from uae_dist import __version__

    formats = list(formats or ALL_FORMATS)
    bad = [f for f in formats if f not in ALL_FORMATS]
    if bad:
        raise ValueError(f"unknown export format(s) {bad}; choose from {', '.join(ALL_FORMATS)}")
    table, ck = embedding_from_checkpoint(checkpoint)
    meta, config = ck["meta"], ck["config"]
    counts = ck["element_counts"].numpy().astype(np.int64)
    seen = counts > 0
    syms = symbols()
    z = np.arange(1, N_ELEMENTS + 1, dtype=np.int64)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [k for k in range(N_ELEMENTS) if seen[k] or not only_seen]
    vec = lambda k: [float(v) for v in table[k]]  # noqa: E731
    files = []
    if "safetensors" in formats:
        from safetensors.numpy import save_file

        save_file({"embedding": np.ascontiguousarray(table), "z": z, "seen": seen.astype(np.uint8)},
                  str(out / "uae.safetensors"), metadata={"format": "uae-dist UAE", "rows": "Z=1..100"})
        files.append("uae.safetensors")
    if "npz" in formats:
        np.savez(out / "uae.npz", embedding=table, z=z, seen=seen, symbols=np.array(syms))
        files.append("uae.npz")
    if "atom_init" in formats:
        (out / "atom_init.json").write_text(json.dumps({str(k + 1): vec(k) for k in rows}))
        files.append("atom_init.json")
    if "json" in formats:
        (out / "embedding.json").write_text(json.dumps({syms[k]: vec(k) for k in rows}))
        files.append("embedding.json")
    if "csv" in formats:
        with open(out / "embedding.csv", "w") as fh:
            fh.write("element," + ",".join(str(c) for c in range(table.shape[1])) + "\n")
            for k in rows:
                fh.write(syms[k] + "," + ",".join(repr(float(v)) for v in table[k]) + "\n")
        files.append("embedding.csv")
    ck_file = Path(ck["path"]) / "model.pt"
    val = meta.get("best_val") or meta.get("val")
    card = {
        "name": "uae-dist universal atomic embedding",
        "uae_dist_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checkpoint": str(ck_file),
        "checkpoint_sha256": file_sha256(ck_file),
        "checkpoint_step": meta.get("step"),
        "model": {"name": config["model"]["name"], "variant": config["model"]["variant"],
                  "embedding_dim": int(table.shape[1])},
        "rows": "Z = 1..100 (row k is element Z = k + 1)",
        "targets": meta.get("targets"),
        "normalizer": {"mean": ck["normalizer_mean"].tolist(), "std": ck["normalizer_std"].tolist()},
        "validation": val,
        "data": {"root": meta.get("data_root"), "manifest_sha256": meta.get("data_manifest_sha256"),
                 "n_train": meta.get("n_train"), "n_val": meta.get("n_val")},
        "elements_seen": [syms[k] for k in range(N_ELEMENTS) if seen[k]],
        "elements_unseen": [syms[k] for k in range(N_ELEMENTS) if not seen[k]],
        "atom_counts_in_training": {syms[k]: int(counts[k]) for k in range(N_ELEMENTS) if seen[k]},
        "only_seen_in_text_files": bool(only_seen),
        "config": config,
        "files": {f: file_sha256(out / f) for f in files},
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=1))
    return card


@dataclass
class UAE:
    """An exported embedding read back: ``embedding[k]`` is element Z = k + 1."""
    embedding: np.ndarray
    z: np.ndarray
    symbols: list
    seen: np.ndarray
    card: dict = field(default_factory=dict)

    def __getitem__(self, element) -> np.ndarray:
        k = element - 1 if isinstance(element, (int, np.integer)) else self.symbols.index(element)
        return self.embedding[k]

    def as_dict(self, only_seen: bool = False) -> dict:
        return {s: self.embedding[k] for k, s in enumerate(self.symbols) if self.seen[k] or not only_seen}


def load_uae(path) -> UAE:
    """Read an export directory (safetensors, else npz, else atom_init.json) and its model card."""
    d = Path(path)
    card = json.loads((d / "model_card.json").read_text()) if (d / "model_card.json").exists() else {}
    syms = symbols()
    if (d / "uae.safetensors").exists():
        from safetensors.numpy import load_file

        t = load_file(str(d / "uae.safetensors"))
        return UAE(t["embedding"], t["z"], syms, t["seen"].astype(bool), card)
    if (d / "uae.npz").exists():
        t = np.load(d / "uae.npz")
        return UAE(t["embedding"], t["z"], syms, t["seen"].astype(bool), card)
    if (d / "atom_init.json").exists():
        a = json.loads((d / "atom_init.json").read_text())
        dim = len(next(iter(a.values())))
        emb = np.full((N_ELEMENTS, dim), np.nan, dtype=np.float32)
        for k, v in a.items():
            emb[int(k) - 1] = v
        unseen = set(card.get("elements_unseen", []))
        seen = np.array([s not in unseen and str(z) in a for z, s in zip(range(1, N_ELEMENTS + 1), syms)])
        return UAE(emb, np.arange(1, N_ELEMENTS + 1), syms, seen, card)
    raise FileNotFoundError(f"{d}: no uae.safetensors, uae.npz or atom_init.json")


# --------------------------------------------------------------------------- CLI (called by uae_dist.cli)
def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory, its model.pt, a run directory (→ best) "
                        "or a checkpoints/ directory (→ latest)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--formats", default=",".join(ALL_FORMATS),
                        help="comma-separated subset of %(default)s")
    parser.add_argument("--only-seen", action="store_true",
                        help="leave elements never seen in training out of the JSON/CSV/atom_init files")


def run(args) -> int:
    import sys

    try:
        card = export(args.checkpoint, args.out, formats=[f for f in args.formats.split(",") if f],
                      only_seen=args.only_seen)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"uae-dist export: error: {e}", file=sys.stderr)
        return 2
    print(f"UAE {card['model']['variant']} d={card['model']['embedding_dim']} from {card['checkpoint']} "
          f"→ {args.out} ({len(card['elements_seen'])} elements seen in training, "
          f"{len(card['elements_unseen'])} unseen)")
    return 0
