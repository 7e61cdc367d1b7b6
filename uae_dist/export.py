"""Export the universal atomic embeddings (UAEs) of a checkpoint for other tools.

``uae-dist export CKPT --out DIR`` writes, for elements Z = 1..100 (row k is Z = k + 1):

    uae.safetensors   ``embedding`` (100, d) float32, ``z`` (100,), ``seen`` (100,) uint8
    uae.npz           the same arrays plus ``symbols``
    atom_init.json    CGCNN's format {"1": [...], ...}: the reference CGCNN reads it as it is
    embedding.json    {"H": [...], ...}: ``elementembeddings.core.Embedding.from_json``
    embedding.csv     element,0,1,...: ``elementembeddings.core.Embedding.from_csv``
    model_card.json   provenance: checkpoint and data-manifest sha256, config, targets,
                      validation and test metrics, version, date, elements (un)seen in training
    pretrain_train_ids.txt  the ids the pretraining trained on (for downstream leak checks,
                      :mod:`uae_dist.train.provenance`), with the split.json sha256 in the card

Untrained rows. An element that never occurred in a training batch keeps its random initial row,
which looks like a real one. Such rows are replaced by the mean of the trained rows in the array
files (flagged by ``seen = 0`` and listed in the card's ``elements_unseen``) and are left out of
the text formats, so a CGCNN user meets a clear KeyError instead of noise; ``--include-unseen``
writes them (as that mean) to the text files too. ``load_uae`` warns which rows are untrained.

``uae-dist export NAME_OR_EXPORT --out DIR`` re-exports a shipped table (``mp-v1``, see
``uae_dist/tables``) or an earlier export in the formats asked for: the arrays come from its
``uae.safetensors`` (checked against its card's sha256), the card is kept with ``exported_from``
added, so a shipped table reaches every format without its checkpoint.

The output directory is ours or new: an existing directory must be empty or a previous export
(its model card lists its files); anything else is refused. The new files are written beside it
and swapped in, so no file of an earlier export survives into this one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from uae_dist.data.lmdb_store import file_sha256
from uae_dist.elements import N_ELEMENTS, SYMBOLS

log = logging.getLogger("uae_dist.export")

ALL_FORMATS = ("safetensors", "npz", "atom_init", "json", "csv")
FILES = {"safetensors": "uae.safetensors", "npz": "uae.npz", "atom_init": "atom_init.json",
         "json": "embedding.json", "csv": "embedding.csv"}
CARD = "model_card.json"
CARD_FORMAT = "uae-dist UAE export"


def embedding_from_checkpoint(path) -> tuple[np.ndarray, dict]:
    """(100, d) float32 table of the model a checkpoint holds, and the checkpoint's contents."""
    import torch

    from uae_dist.config import from_dict
    from uae_dist.models import build_model
    from uae_dist.train import checkpoint as ckpt

    ck = ckpt.read_model(path)
    cfg = from_dict(ck["config"])
    model = build_model(cfg.model, ck["state"]["meta"]["targets"])
    if not hasattr(model, "element_embedding"):
        raise ValueError(f"{ck['path']}: model {cfg.model.name!r} has no element embedding")
    model.load_state_dict({k: v.to(torch.float32) for k, v in ck["weights"].items()})
    table = model.element_embedding().to(torch.float32).cpu().numpy()
    if table.shape[0] != N_ELEMENTS:
        raise ValueError(f"embedding has {table.shape[0]} rows, expected {N_ELEMENTS}")
    return table, ck


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    card = out / CARD
    try:
        owned = set(json.loads(card.read_text())["files"]) | {CARD}
        ok = json.loads(card.read_text()).get("format") == CARD_FORMAT
    except (OSError, ValueError, KeyError, TypeError):
        owned, ok = set(), False
    foreign = sorted(p.name for p in out.iterdir() if p.name not in owned)
    if not ok or foreign:
        raise ValueError(f"--out {out} holds files this tool did not write "
                         f"({', '.join(foreign[:5]) or CARD}); choose an empty or new directory")


def _test_metrics(ck_dir: Path) -> dict | None:
    for d in (ck_dir, ck_dir.parent.parent):  # the checkpoint, then its run directory
        f = d / "test_metrics.json"
        if f.exists():
            return json.loads(f.read_text())
    return None


def export(checkpoint, out_dir, formats=None, include_unseen: bool = False) -> dict:
    """Write the files listed in the module docstring; return the model card. ``checkpoint``
    may also name a shipped table or an export directory (re-exported, see the docstring)."""
    from uae_dist import __version__

    formats = list(formats or ALL_FORMATS)
    bad = [f for f in formats if f not in ALL_FORMATS]
    if bad:
        raise ValueError(f"unknown export format(s) {bad}; choose from {', '.join(ALL_FORMATS)}")
    out = Path(out_dir)
    _check_out(out)
    src = export_dir_of(checkpoint)
    if src is not None:
        return reexport(src, out, formats, include_unseen)
    table, ck = embedding_from_checkpoint(checkpoint)
    st, meta, config = ck["state"], ck["state"]["meta"], ck["config"]
    counts = np.asarray(st["element_counts"], dtype=np.int64)
    seen = counts > 0
    if not seen.any():
        raise ValueError(f"{ck['path']}: no element was seen in training")
    table = table.copy()
    table[~seen] = table[seen].mean(0)  # untrained rows: the mean of the trained ones
    rows = [k for k in range(N_ELEMENTS) if seen[k] or include_unseen]

    with _staged(out) as tmp:
        _write_formats(tmp, formats, table, seen, rows)
        ck_dir = Path(ck["path"])
        train_ids = _copy_train_ids(ck_dir, meta, tmp)
        val = st.get("best_val") or meta.get("val")
        card = {
            "format": CARD_FORMAT, "name": "uae-dist universal atomic embedding",
            "uae_dist_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "checkpoint": str(ck_dir), "checkpoint_sha256": file_sha256(ck_dir / "model.safetensors"),
            "checkpoint_step": st.get("step"),
            "model": {"name": config["model"]["name"], "variant": config["model"].get("variant"),
                      "embedding_dim": int(table.shape[1])},
            "rows": "Z = 1..100 (row k is element Z = k + 1)",
            "targets": meta.get("targets"), "normalizer": st.get("normalizer"),
            "validation": val, "test": _test_metrics(ck_dir),
            "data": {"root": meta.get("data_root"),
                     "manifest_sha256": meta.get("data_manifest_sha256"),
                     "n_train": meta.get("n_train"), "n_val": meta.get("n_val"),
                     "n_test": meta.get("n_test"), "split_sha256": meta.get("split_sha256"),
                     "train_ids": train_ids},
            "elements_seen": [SYMBOLS[k] for k in range(N_ELEMENTS) if seen[k]],
            "elements_unseen": [SYMBOLS[k] for k in range(N_ELEMENTS) if not seen[k]],
            "untrained_rows": _untrained_note(include_unseen),
            "atom_counts_in_training": {SYMBOLS[k]: int(counts[k]) for k in range(N_ELEMENTS)
                                        if seen[k]},
            "config": config,
            "files": {**{FILES[f]: file_sha256(tmp / FILES[f]) for f in formats},
                      **({train_ids["file"]: train_ids["sha256"]} if train_ids else {})},
        }
        (tmp / CARD).write_text(json.dumps(card, indent=1, allow_nan=False))
    return card


def export_dir_of(spec) -> Path | None:
    """The export directory that ``spec`` names (a path to one, or a shipped table's name)
    when it holds the arrays a re-export reads."""
    from .train.provenance import export_dir

    d = export_dir(str(spec))
    return d if d is not None and (d / FILES["safetensors"]).is_file() else None


def reexport(src: Path, out: Path, formats, include_unseen: bool = False) -> dict:
    """An export (or shipped table) ``src`` written again to ``out`` in ``formats``."""
    from safetensors.numpy import load_file

    from .train.provenance import EXPORTED_IDS

    if out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the table being exported; choose another directory")
    card = json.loads((src / CARD).read_text())
    st = src / FILES["safetensors"]
    want = (card.get("files") or {}).get(FILES["safetensors"])
    if want != file_sha256(st):
        raise ValueError(f"{st}: sha256 does not match its model card ({want}); the export is "
                         "damaged or was edited")
    arrays = load_file(str(st))
    table, seen = arrays["embedding"], arrays["seen"].astype(bool)
    rows = [k for k in range(N_ELEMENTS) if seen[k] or include_unseen]
    with _staged(out) as tmp:
        _write_formats(tmp, formats, table, seen, rows)
        files = {FILES[f]: file_sha256(tmp / FILES[f]) for f in formats}
        if (src / EXPORTED_IDS).is_file():
            shutil.copyfile(src / EXPORTED_IDS, tmp / EXPORTED_IDS)
            files[EXPORTED_IDS] = file_sha256(tmp / EXPORTED_IDS)
        card = {**card, "files": files,
                "exported_from": {"table": card.get("table_name") or str(src),
                                  "card_sha256": file_sha256(src / CARD),
                                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                "untrained_rows": _untrained_note(include_unseen)}
        (tmp / CARD).write_text(json.dumps(card, indent=1, allow_nan=False))
    return card


def _untrained_note(include_unseen: bool) -> str:
    return ("mean of the trained rows; seen = 0 in the array files; "
            + ("included" if include_unseen else "left out") + " in the text files")


@contextlib.contextmanager
def _staged(out: Path):
    """A fresh directory beside ``out`` to write an export into: swapped in for ``out`` when
    the block succeeds, removed in any case."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_train_ids(ck_dir: Path, meta: dict, out: Path) -> dict | None:
    """The run's training ids (``<run>/train_ids.txt``, checked against the checkpoint's hash)
    → ``out``; what the model card says of them, or None when the run did not record them."""
    from .train.provenance import EXPORTED_IDS, TRAIN_IDS

    src, want = ck_dir.parent.parent / TRAIN_IDS, meta.get("train_ids_sha256")
    if not want or not src.is_file() or file_sha256(src) != want:
        log.warning("%s: no training ids matching the checkpoint; the export cannot tell "
                    "downstream runs which structures its pretraining saw", src)
        return None
    shutil.copyfile(src, out / EXPORTED_IDS)
    return {"file": EXPORTED_IDS, "sha256": want, "count": meta.get("n_train")}


def _write_formats(d: Path, formats, table: np.ndarray, seen: np.ndarray, rows: list[int]) -> None:
    z = np.arange(1, N_ELEMENTS + 1, dtype=np.int64)
    vec = lambda k: [float(v) for v in table[k]]  # noqa: E731
    if "safetensors" in formats:
        from safetensors.numpy import save_file

        save_file({"embedding": np.ascontiguousarray(table), "z": z, "seen": seen.astype(np.uint8)},
                  str(d / FILES["safetensors"]),
                  metadata={"format": CARD_FORMAT, "rows": "Z=1..100"})
    if "npz" in formats:
        np.savez(d / FILES["npz"], embedding=table, z=z, seen=seen, symbols=np.array(SYMBOLS))
    if "atom_init" in formats:
        (d / FILES["atom_init"]).write_text(json.dumps({str(k + 1): vec(k) for k in rows}))
    if "json" in formats:
        (d / FILES["json"]).write_text(json.dumps({SYMBOLS[k]: vec(k) for k in rows}))
    if "csv" in formats:
        with open(d / FILES["csv"], "w") as fh:
            fh.write("element," + ",".join(str(c) for c in range(table.shape[1])) + "\n")
            for k in rows:
                fh.write(SYMBOLS[k] + "," + ",".join(repr(float(v)) for v in table[k]) + "\n")


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` (ours, checked) by ``tmp`` with two renames."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def load_uae(path, warn: bool = True):
    """An exported or shipped UAE as a ``uae_dist.tables.Table`` (see there)."""
    from uae_dist.tables import load_uae as _load

    return _load(path, warn=warn)


# --------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory, a file in it, a run directory "
                        "(→ best) or a checkpoints/ directory (→ latest); or a shipped table's "
                        "name (mp-v1) or an export directory, to write it again")
    parser.add_argument("--out", required=True, help="output directory (new, empty, or an "
                        "earlier export)")
    parser.add_argument("--formats", default=",".join(ALL_FORMATS),
                        help="comma-separated subset of %(default)s")
    parser.add_argument("--include-unseen", action="store_true",
                        help="also write elements never seen in training (as the mean of the "
                             "trained rows) to the JSON/CSV/atom_init files")


def run(args) -> int:
    try:
        card = export(args.checkpoint, args.out, formats=[f for f in args.formats.split(",") if f],
                      include_unseen=args.include_unseen)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"uae-dist export: error: {e}", file=sys.stderr)
        return 2
    src = card.get("exported_from", {}).get("table") or card["checkpoint"]
    print(f"UAE {card['model']['name']} d={card['model']['embedding_dim']} from "
          f"{src} → {args.out} ({len(card['elements_seen'])} elements seen in "
          f"training, {len(card['elements_unseen'])} unseen)")
    return 0
