"""Check a built data set (checksums, counts, decodability, split) and summarise it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import lmdb_store as store
from .build import MANIFEST, REJECTS, SPLIT
from .graph import decode_record


def verify(root, decode: bool = True, progress: bool = True) -> list[str]:
    """Return a list of problems (empty when the data set is intact)."""
    from tqdm import tqdm

    root = Path(root)
    problems: list[str] = []
    mp = root / MANIFEST
    if not mp.exists():
        return [f"{mp}: missing (incomplete build?)"]
    try:
        m = json.loads(mp.read_text())
    except json.JSONDecodeError as e:
        return [f"{mp}: not valid JSON ({e})"]
    missing = [k for k in ("records", "counts", "shards") if k not in m]
    missing += [f"records.{k}" for k in ("ids", "source_index", "shard", "natoms", "nedges", "y")
                if "records" in m and k not in m["records"]]
    if missing:
        return [f"{mp}: missing {', '.join(missing)} (not a uae-dist manifest, or damaged)"]
    rec = m["records"]
    n = len(rec["ids"])
    for key in ("source_index", "shard", "natoms", "nedges", "y"):
        if len(rec[key]) != n:
            problems.append(f"manifest: records.{key} has {len(rec[key])} entries, ids has {n}")
    if m["counts"]["records"] != n:
        problems.append(f"manifest: counts.records={m['counts']['records']} but {n} ids")
    if len(set(rec["ids"])) != n:
        problems.append("manifest: duplicate record ids")
    by_shard: dict[int, list[int]] = {}
    for k, s in enumerate(rec["shard"]):
        by_shard.setdefault(s, []).append(k)
    bar = tqdm(total=n, desc="verify", unit="rec", disable=not progress)
    for s, info in enumerate(m["shards"]):
        p = root / info["file"]
        if not p.exists():
            problems.append(f"{info['file']}: missing")
            continue
        sha = store.file_sha256(p)
        if sha != info["sha256"]:
            problems.append(f"{info['file']}: sha256 {sha[:12]}… != manifest {info['sha256'][:12]}…")
        mine = by_shard.get(s, [])
        if len(mine) != info["count"]:
            problems.append(f"{info['file']}: manifest lists {len(mine)} records but count={info['count']}")
        try:
            env = store.open_reader(p)
            with env.begin(buffers=True) as txn:
                nkeys = sum(1 for _ in store.iter_prefix(txn, b"r"))
                if nkeys != info["count"]:
                    problems.append(f"{info['file']}: holds {nkeys} records, manifest says {info['count']}")
                for k in mine:
                    rid = rec["ids"][k]
                    blob = txn.get(store.rkey("r", rec["source_index"][k]))
                    if blob is None:
                        problems.append(f"record {rid!r}: missing from {info['file']}")
                    elif decode:
                        try:
                            r = decode_record(bytes(blob))
                            bad = []
                            if r["id"] != rid:
                                bad.append(f"id {r['id']!r}")
                            if len(r["z"]) != rec["natoms"][k]:
                                bad.append(f"natoms {len(r['z'])} != {rec['natoms'][k]}")
                            if len(r["j"]) != rec["nedges"][k] or len(r["i"]) != len(r["j"]):
                                bad.append(f"nedges {len(r['j'])} != {rec['nedges'][k]}")
                            if not (np.isfinite(r["pos"]).all() and np.isfinite(r["cell"]).all()):
                                bad.append("non-finite geometry")
                            if len(r["j"]) and (r["j"].max() >= len(r["z"]) or r["j"].min() < 0):
                                bad.append("edge index out of range")
                            if bad:
                                problems.append(f"record {rid!r} in {info['file']}: " + ", ".join(bad))
                        except Exception as e:  # noqa: BLE001 — any decode failure is damage
                            problems.append(f"record {rid!r} in {info['file']}: cannot decode ({e})")
                    bar.update(1)
            store.close_reader(p)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{info['file']}: cannot open as LMDB ({e})")
    bar.close()
    sp = root / SPLIT
    if not sp.exists():
        problems.append(f"{SPLIT}: missing")
    else:
        split = json.loads(sp.read_text())
        parts = [set(split.get(k, [])) for k in ("train", "val", "test")]
        if sum(map(len, parts)) != n or set().union(*parts) != set(rec["ids"]):
            problems.append(f"{SPLIT}: train/val/test do not partition the {n} records")
    rj = root / REJECTS
    if not rj.exists():
        problems.append(f"{REJECTS}: missing")
    else:
        lines = [ln for ln in rj.read_text().splitlines() if ln.strip()]
        if len(lines) != m["counts"]["rejected"]:
            problems.append(f"{REJECTS}: {len(lines)} lines, manifest says {m['counts']['rejected']} rejects")
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
