"""What a pretraining saw, recorded so that a downstream run can tell whether its test is clean.

A run writes the ids of its training structures to ``<run>/train_ids.txt`` (one per line, in the
order of the split) and keeps the file's sha256 and the sha256 of the data set's ``split.json`` in
its checkpoints' metadata. ``uae-dist export`` copies the file into the export
(``pretrain_train_ids.txt``) and names both hashes in the model card. A fine-tuning run whose
``model.features`` is such an export compares its own validation and test ids with that list and
warns when the pretraining trained on any of them: its test error would then be optimistic.
Ids are compared as strings, so the check holds across data sets that share ids (the shared MP
split by id), not only within one build.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from uae_dist.data.lmdb_store import file_sha256  # noqa: F401 - also used by session

TRAIN_IDS = "train_ids.txt"
EXPORTED_IDS = "pretrain_train_ids.txt"


def write_ids(path: Path, ids) -> str:
    """Write ``ids`` one per line (atomically); return the file's sha256."""
    text = "".join(f"{i}\n" for i in ids)
    if any("\n" in str(i) for i in ids):
        raise ValueError(f"{path}: an id holds a newline")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return hashlib.sha256(text.encode()).hexdigest()


def read_ids(path: Path) -> list[str]:
    return [line for line in Path(path).read_text().splitlines() if line]


def export_dir(spec: str) -> Path | None:
    """The export directory a ``model.features`` spec names, or None (not a UAE export)."""
    from uae_dist.tables import SHIPPED

    name = spec[4:] if spec.startswith("uae:") else spec
    for d in (Path(name), SHIPPED / name):
        if (d / "model_card.json").is_file():
            return d
    return None


def leak_warning(spec: str, ids: dict[str, list[str]]) -> str | None:
    """A warning if the pretraining behind table ``spec`` trained on any of ``ids``
    (``{"test": [...], "val": [...]}``); None when clean or when ``spec`` is not a UAE export."""
    d = export_dir(str(spec))
    if d is None:
        return None
    card = json.loads((d / "model_card.json").read_text())
    rec = (card.get("data") or {}).get("train_ids") or {}
    f = d / EXPORTED_IDS
    if not rec or not f.is_file():
        return (f"model.features={spec}: its model card does not record which structures its "
                "pretraining trained on (exported by an older uae-dist?), so this run cannot check "
                "that its test structures were unseen; re-export it from its run directory")
    if file_sha256(f) != rec.get("sha256"):
        return (f"model.features={spec}: {f} does not match the sha256 in its model card, so "
                "this run cannot check that its test structures were unseen; re-export the table")
    seen = set(read_ids(f))
    parts = []
    for split, split_ids in ids.items():
        hit = [i for i in split_ids if i in seen]
        if hit:
            parts.append(f"{len(hit)} of its {len(split_ids)} {split} structures (e.g. "
                         f"{', '.join(map(repr, hit[:3]))})")
    if not parts:
        return None
    return (f"model.features={spec}: the pretraining of this table trained on "
            f"{' and '.join(parts)}, so this run's errors on them are optimistic. Pretrain on the "
            "train split of the data set you fine-tune on (the same split by id) for a clean test.")
