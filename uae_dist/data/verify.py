"""Check a built data set against its manifest (every byte, every record) and summarise it.

:func:`verify` reports every problem it finds instead of stopping at the first: the manifest's
record table against its digest, every shard's size (before mapping it: a truncated LMDB read
through a mapping is SIGBUS), sha256 and xxh3, every record decoded and compared with the manifest
(id, sizes, labels, finite geometry), split.json (a partition of the records, the file the build
wrote) and the count of rejects. The same checks, minus the full hashes and decoding, run cheaply
whenever a dataset is opened (:mod:`uae_dist.data.integrity`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from . import lmdb_store as store
from .graph import SCHEMA_VERSION, decode_record
from .integrity import DataError, check_record, file_hashes, records_digest, split_problems
from .layout import MANIFEST, REJECTS, SPLIT

_RECORD_KEYS = ("ids", "source_index", "shard", "natoms", "nedges", "y")


def _load(mp: Path):
    if not mp.exists():
        return None, [f"{mp}: missing (incomplete build?)"]
    try:
        m = json.loads(mp.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        return None, [f"{mp}: not valid JSON ({e})"]
    if not isinstance(m, dict):
        return None, [f"{mp}: not a JSON object"]
    missing = [k for k in ("records", "counts", "shards") if k not in m]
    missing += [f"records.{k}" for k in _RECORD_KEYS
                if isinstance(m.get("records"), dict) and k not in m["records"]]
    if missing:
        return None, [f"{mp}: missing {', '.join(missing)} (not a uae-dist manifest, or damaged)"]
    if m.get("schema_version") != SCHEMA_VERSION:
        return None, [f"{mp}: schema version {m.get('schema_version')}, this uae-dist reads "
                      f"{SCHEMA_VERSION}: rebuild the data set"]
    return m, []


def _check_manifest(m: dict) -> list[str]:
    problems = []
    rec = m["records"]
    n = len(rec["ids"])
    for key in _RECORD_KEYS[1:]:
        if len(rec[key]) != n:
            problems.append(f"manifest: records.{key} has {len(rec[key])} entries, ids has {n}")
    if m["counts"]["records"] != n:
        problems.append(f"manifest: counts.records={m['counts']['records']} but {n} ids")
    if len(set(rec["ids"])) != n:
        problems.append("manifest: duplicate record ids")
    if records_digest(rec) != m.get("integrity", {}).get("records_sha256"):
        problems.append("manifest: the record table (ids, labels, sizes) is not the one the "
                        "build wrote (records_sha256 differs): edited or damaged")
    return problems


def _check_shard(root: Path, info: dict, rec: dict, mine: list[int], decode: bool, bar):
    problems = []
    p = root / info["file"]
    if not p.is_file():
        return [f"{info['file']}: missing"]
    size = p.stat().st_size
    if size != info["bytes"]:  # not mapped: reading past the end of a mapping is SIGBUS
        return [f"{info['file']}: {size:,} bytes, the manifest says {info['bytes']:,} "
                "(truncated or changed); not opened"]
    hashes = file_hashes(p)
    for name in ("sha256", "xxh3_128"):
        if hashes[name] != info.get(name):
            problems.append(f"{info['file']}: {name} {hashes[name][:12]}… != manifest "
                            f"{str(info.get(name))[:12]}…")
    if len(mine) != info["count"]:
        problems.append(f"{info['file']}: manifest lists {len(mine)} records but "
                        f"count={info['count']}")
    try:
        env = store.open_reader(p, info["bytes"])
    except DataError as e:
        return problems + [str(e)]
    try:
        with env.begin(buffers=True) as txn:
            nkeys = sum(1 for _ in store.iter_prefix(txn, b"r"))
            if nkeys != info["count"]:
                problems.append(f"{info['file']}: holds {nkeys} records, manifest says "
                                f"{info['count']}")
            for k in mine:
                rid = rec["ids"][k]
                blob = txn.get(store.rkey("r", rec["source_index"][k]))
                if blob is None:
                    problems.append(f"record {rid!r}: missing from {info['file']}")
                elif decode:
                    try:
                        r = decode_record(bytes(blob))
                        check_record(r, rid, rec["natoms"][k], rec["nedges"][k], rec["y"][k],
                                     info["file"])
                    except DataError as e:
                        problems.append(str(e))
                    except Exception as e:  # noqa: BLE001 - any decode failure is damage
                        problems.append(f"record {rid!r} in {info['file']}: cannot decode ({e})")
                bar.update(1)
    finally:
        store.close_reader(p)
    return problems


def _check_split(root: Path, m: dict) -> list[str]:
    sp = root / SPLIT
    if not sp.exists():
        return [f"{SPLIT}: missing"]
    raw = sp.read_bytes()
    try:
        split = json.loads(raw)
    except ValueError as e:
        return [f"{SPLIT}: not valid JSON ({e})"]
    if not isinstance(split, dict):
        return [f"{SPLIT}: not a JSON object"]
    problems = [f"{SPLIT}: {p}" for p in split_problems(split, m["records"]["ids"])]
    if hashlib.sha256(raw).hexdigest() != m.get("integrity", {}).get("split_sha256"):
        problems.append(f"{SPLIT}: not the split the build wrote (sha256 differs)")
    return problems


def verify(root, decode: bool = True, progress: bool = True) -> list[str]:
    """Return a list of problems (empty when the data set is intact)."""
    from tqdm import tqdm

    root = Path(root)
    m, problems = _load(root / MANIFEST)
    if m is None:
        return problems
    problems = _check_manifest(m)
    rec = m["records"]
    by_shard: dict[int, list[int]] = {}
    for k, s in enumerate(rec["shard"]):
        by_shard.setdefault(s, []).append(k)
    bar = tqdm(total=len(rec["ids"]), desc="verify", unit="rec", disable=not progress)
    for s, info in enumerate(m["shards"]):
        problems += _check_shard(root, info, rec, by_shard.get(s, []), decode, bar)
    bar.close()
    problems += _check_split(root, m)
    rj = root / REJECTS
    if not rj.exists():
        problems.append(f"{REJECTS}: missing")
    else:
        lines = [ln for ln in rj.read_text().splitlines() if ln.strip()]
        if len(lines) != m["counts"]["rejected"]:
            problems.append(f"{REJECTS}: {len(lines)} lines, manifest says "
                            f"{m['counts']['rejected']} rejects")
    return problems


def summary(root) -> dict:
    """A compact machine-readable summary of a built data set."""
    m = json.loads((Path(root) / MANIFEST).read_text())
    natoms = np.asarray(m["records"]["natoms"])
    nedges = np.asarray(m["records"]["nedges"])
    top = sorted(m["elements"].items(), key=lambda kv: -kv[1]["structures"])
    return {
        "root": str(Path(root).resolve()),
        "schema_version": m["schema_version"],
        "created": m["created"],
        "source": {k: m["source"].get(k) for k in ("path", "sha256", "known", "records", "fmt")},
        "cutoff": m["options"]["cutoff"],
        "max_neighbors": m["options"]["max_neighbors"],
        "counts": m["counts"],
        "split": m["split"]["sizes"],
        "atoms_per_structure": {"min": int(natoms.min()), "median": float(np.median(natoms)),
                                "max": int(natoms.max())} if len(natoms) else {},
        "edges_per_atom": round(float(nedges.sum() / max(natoms.sum(), 1)), 2),
        "targets": m["targets"]["stats"],
        "elements": len(m["elements"]),
        "top_elements": [k for k, _ in top[:10]],
        "shards": [{"file": s["file"], "count": s["count"], "MiB": round(s["bytes"] / 2**20, 1)} for s in m["shards"]],
        "build": m["build"],
    }


def format_summary(s: dict) -> str:
    c = s["counts"]
    lines = [
        f"data set   {s['root']}",
        f"source     {s['source']['path']} ({s['source'].get('known') or 'custom'}, sha256 {s['source']['sha256'][:12]}…)",
        f"graphs     cutoff {s['cutoff']:g} Å, max_neighbors {s['max_neighbors']}, schema v{s['schema_version']}",
        f"records    {c['records']:,} of {c['source']:,} ({c['rejected']:,} rejected"
        + (": " + ", ".join(f"{k} {v}" for k, v in sorted(c['reject_reasons'].items())) if c["reject_reasons"] else "")
        + ")",
        f"split      train {s['split']['train']:,} · val {s['split']['val']:,} · test {s['split']['test']:,}",
    ]
    if s["atoms_per_structure"]:
        a = s["atoms_per_structure"]
        lines.append(f"atoms      {c['atoms']:,} ({a['min']}–{a['max']} per structure, median {a['median']:g}); "
                     f"edges {c['edges']:,} ({s['edges_per_atom']:g} per atom)")
    lines.append(f"elements   {s['elements']} (most common: {', '.join(s['top_elements'])})")
    lines.append("targets    " + ("none" if not s["targets"] else ""))
    for name, st in s["targets"].items():
        if st.get("count"):
            lines.append(f"  {name:<28} n={st['count']:>7,}  mean {st['mean']:9.4f}  std {st['std']:8.4f}  "
                         f"range [{st['min']:.4g}, {st['max']:.4g}]")
        else:
            lines.append(f"  {name:<28} no labels")
    total = sum(x["MiB"] for x in s["shards"])
    lines.append(f"shards     {len(s['shards'])} files, {total:,.1f} MiB")
    b = s["build"]
    lines.append(f"build      {b['wall_s']:.1f} s with {b['processes']} process(es), {b['records_per_s']:,.0f} records/s")
    return "\n".join(lines)


def plot_summary(root, path) -> None:
    """Histograms of structure size, edges per atom and every target, plus element frequencies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = json.loads((Path(root) / MANIFEST).read_text())
    rec = m["records"]
    natoms = np.asarray(rec["natoms"])
    epa = np.asarray(rec["nedges"]) / np.maximum(natoms, 1)
    names = m["targets"]["names"]
    y = np.array([[np.nan if v is None else v for v in row] for row in rec["y"]], dtype=float).reshape(-1, len(names))
    panels = 3 + len(names)
    cols = 3
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    ax = axes.ravel()
    ax[0].hist(natoms, bins=50, color="#4c72b0")
    ax[0].set(xlabel="atoms per structure", ylabel="structures", title=f"{len(natoms):,} structures")
    ax[1].hist(epa, bins=50, color="#55a868")
    ax[1].set(xlabel=f"edges per atom (cutoff {m['options']['cutoff']:g} Å)", ylabel="structures")
    els = sorted(m["elements"].items(), key=lambda kv: -kv[1]["structures"])[:30]
    ax[2].bar(range(len(els)), [v["structures"] for _, v in els], color="#8172b2")
    ax[2].set_xticks(range(len(els)), [k for k, _ in els], rotation=90, fontsize=7)
    ax[2].set(ylabel="structures containing it", title=f"{len(m['elements'])} elements (top 30)")
    for k, name in enumerate(names):
        v = y[:, k][np.isfinite(y[:, k])]
        a = ax[3 + k]
        a.hist(v, bins=60, color="#c44e52")
        a.set(xlabel=name, ylabel="structures", title=f"n={len(v):,}")
    for a in ax[panels:]:
        a.axis("off")
    c = m["counts"]
    fig.suptitle(f"{Path(root).name}: {c['records']:,} records, {c['rejected']:,} rejected", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
