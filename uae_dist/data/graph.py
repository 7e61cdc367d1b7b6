"""One crystal → one graph record: validation, neighbour edges, and a pickle-free byte encoding.

A record is a safetensors blob (a JSON header plus raw little-endian arrays), so any tool can read
it without this package and nothing executes code on load. Edges are stored in CSR form around the
centre atom ``i`` (per-atom neighbour counts + ``j`` + ``shift``); see
``uae_dist.ops.neighbors_ref`` for the edge convention.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np
import safetensors.numpy as stnp

SCHEMA_VERSION = 2  # of a data set (manifest); 2: xxh3 per shard, records and split digests
RECORD_SCHEMA = 1   # of one encoded record (its metadata "schema"); unchanged since 1
MAX_Z = 100
# Two atoms closer than this (Å) are the same site counted twice, not a crystal.
MIN_DISTANCE = 0.1
# A label beyond this magnitude is a data error in any unit: it keeps labels, their squares and
# the sums of squares over millions of records finite in float32 (training normalises with them).
MAX_ABS_LABEL = 1e12
# Periodic images a neighbour search may visit for one structure (MP at 8 Å needs at most 729);
# a thin, skewed cell can need billions even when its pair count is small.
MAX_IMAGES = 100_000


class RejectError(ValueError):
    """A record that cannot become a graph; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class GraphOptions:
    """Graph settings of one build (defaults: :class:`uae_dist.data.options.BuildOptions`)."""
    cutoff: float                    # Å
    max_neighbors: int | None = None  # keep the N nearest per centre (whole tied shells)
    max_pairs: int | None = None      # reject a structure whose estimated pair count exceeds it


def validate_crystal(numbers, lattice, frac, pbc) -> None:
    """Raise RejectError for a structure no model should see."""
    numbers = np.asarray(numbers)
    if numbers.size == 0:
        raise RejectError("empty_structure", "no sites")
    bad = numbers[(numbers < 1) | (numbers > MAX_Z)]
    if bad.size:
        raise RejectError("element_out_of_range",
                          f"atomic number(s) {sorted(set(bad.tolist()))} outside 1..{MAX_Z}")
    if not np.all(np.isfinite(lattice)):
        raise RejectError("non_finite_lattice", "lattice has NaN/inf entries")
    if not np.all(np.isfinite(frac)):
        raise RejectError("non_finite_coordinates", "coordinates have NaN/inf entries")
    lengths = np.linalg.norm(lattice, axis=1)
    vol = abs(float(np.linalg.det(lattice)))
    # volume relative to the box of the lengths: ~0 when vectors are (nearly) coplanar
    flat = vol < 1e-6 * max(float(np.prod(lengths)), 1e-30)
    if np.any(lengths[np.asarray(pbc, bool)] < 1e-3) or flat:
        raise RejectError("degenerate_lattice", "cell vectors are (nearly) linearly dependent "
                          f"(volume {vol:.3g} Å³, lengths {np.round(lengths, 4).tolist()})")


def check_labels(targets: dict, bounds: dict) -> None:
    """NaN means "not labelled"; ±inf is a broken label; values beyond ``MAX_ABS_LABEL`` or outside
    a sanity bound are data errors."""
    for name, v in targets.items():
        if v is not None and np.isinf(v):
            raise RejectError("non_finite_label", f"{name}={v}")
        if v is not None and abs(v) > MAX_ABS_LABEL:
            raise RejectError("label_out_of_bounds", f"{name}={v:g} beyond the finite-magnitude "
                                                     f"bound |value| <= {MAX_ABS_LABEL:g}")
    for name, (lo, hi) in bounds.items():
        v = targets.get(name)
        if v is None or not np.isfinite(v):
            continue
        if not (lo <= v <= hi):
            raise RejectError("label_out_of_bounds",
                              f"{name}={v:g} outside sanity bound [{lo:g}, {hi:g}]")


def estimate_pairs(natoms: int, lattice, pbc, cutoff: float) -> tuple[float, float]:
    """(expected neighbour pairs, periodic images searched) of a validated cell, from O(1) work.

    Pairs: ``natoms`` atoms at the cell's mean density, each seeing a cutoff sphere:
    ``natoms² / V · 4/3 π rc³`` (uniform-density estimate; real crystals come within tens of per
    cent at 5-8 Å). Images: the ``∏ (2 n_k + 1)`` cells a brute-force search visits, with
    ``n_k = floor(rc |b_k|) + 1`` as in ``neighbors_ref.image_range``; a thin, skewed cell can
    need billions of them even when the pair count is small.
    """
    a = np.asarray(lattice, dtype=np.float64).tolist()  # 3x3 in plain floats: ~10x numpy's speed
    cross = [[a[j][1] * a[k][2] - a[j][2] * a[k][1], a[j][2] * a[k][0] - a[j][0] * a[k][2],
              a[j][0] * a[k][1] - a[j][1] * a[k][0]] for j, k in ((1, 2), (2, 0), (0, 1))]
    vol = abs(sum(x * y for x, y in zip(a[0], cross[0])))  # validated: > 0
    pairs = natoms * natoms / vol * (4.0 / 3.0) * math.pi * cutoff ** 3
    images = 1.0
    for k, periodic in enumerate(np.asarray(pbc, dtype=bool).tolist()):
        if periodic:  # |b_k| = |a_i x a_j| / V, as in neighbors_ref.image_range
            b_k = math.sqrt(sum(c * c for c in cross[k])) / vol
            images *= 2 * (math.floor(cutoff * b_k) + 1) + 1
    return pairs, images


def build_graph(numbers, lattice, frac, pbc, options: GraphOptions, neighbor_fn=None) -> dict:
    """Neighbour edges of one validated crystal as plain arrays (see ``encode_record``).

    A structure whose :func:`estimate_pairs` exceeds ``options.max_pairs`` pairs (when set) or
    ``MAX_IMAGES`` images is rejected (``too_many_neighbors``) before any neighbour search
    allocates memory for it.
    """
    if neighbor_fn is None:
        from uae_dist.ops import neighbor_list_numpy as neighbor_fn
    numbers = np.asarray(numbers, dtype=np.int64)
    lattice = np.asarray(lattice, dtype=np.float64)
    frac = np.asarray(frac, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    pairs, images = estimate_pairs(len(numbers), lattice, pbc, options.cutoff)
    if options.max_pairs is not None and pairs > options.max_pairs:
        raise RejectError("too_many_neighbors",
                          f"about {pairs:.3g} neighbour pairs within {options.cutoff:g} Å "
                          f"({len(numbers)} atoms in {abs(np.linalg.det(lattice)):.3g} Å³); the "
                          f"cap is --max-pairs {options.max_pairs:,}")
    if images > MAX_IMAGES:
        raise RejectError("too_many_neighbors",
                          f"the cell is so thin that a {options.cutoff:g} Å neighbour search "
                          f"visits {images:.3g} periodic images (at most {MAX_IMAGES:,})")
    pos = frac @ lattice
    i, j, shift = neighbor_fn(pos, lattice, pbc, options.cutoff, options.max_neighbors)
    i, j, shift = np.asarray(i), np.asarray(j), np.asarray(shift).reshape(-1, 3)
    if len(i) == 0:
        raise RejectError("no_neighbors", f"no neighbour within the {options.cutoff:g} Å cutoff")
    vec = pos[j] + shift @ lattice - pos[i]
    d = np.sqrt(np.einsum("ij,ij->i", vec, vec))
    dmin = float(d.min())
    if dmin < MIN_DISTANCE:
        k = int(np.argmin(d))
        raise RejectError("overlapping_atoms",
                          f"sites {int(i[k])} and {int(j[k])} are {dmin:.3g} Å apart")
    counts = np.bincount(i, minlength=len(numbers))
    if np.any(counts == 0):
        lonely = np.flatnonzero(counts == 0)[:5].tolist()
        raise RejectError("no_neighbors",
                          f"site(s) {lonely} have no neighbour within {options.cutoff:g} Å")
    return {"z": numbers, "pos": pos, "frac": frac, "cell": lattice, "pbc": pbc,
            "nbr_count": counts, "j": j, "shift": shift}


def _smallest_int(a: np.ndarray, signed: bool) -> np.ndarray:
    if a.size == 0:
        return a.astype(np.int8 if signed else np.uint8)
    lo, hi = int(a.min()), int(a.max())
    kinds = ((np.int8, np.int16, np.int32, np.int64) if signed
             else (np.uint8, np.uint16, np.uint32, np.int64))
    for dt in kinds:
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return a.astype(dt)
    raise OverflowError("integer out of range")


def encode_record(rec_id: str, graph: dict, y: np.ndarray) -> bytes:
    """Serialise one graph; integer arrays use the narrowest dtype that holds them."""
    tensors = {
        "z": graph["z"].astype(np.uint8),
        "pos": np.ascontiguousarray(graph["pos"], dtype=np.float64),
        "frac": np.ascontiguousarray(graph["frac"], dtype=np.float64),
        "cell": np.ascontiguousarray(graph["cell"], dtype=np.float64),
        "pbc": graph["pbc"].astype(np.uint8),
        "y": np.asarray(y, dtype=np.float64).reshape(-1),
        "nbr_count": _smallest_int(graph["nbr_count"], signed=False),
        "j": _smallest_int(graph["j"], signed=False),
        "shift": np.ascontiguousarray(_smallest_int(graph["shift"], signed=True)),
    }
    return stnp.save(tensors, metadata={"id": str(rec_id), "schema": str(RECORD_SCHEMA)})


def record_metadata(blob: bytes) -> dict:
    """The JSON metadata of an encoded record (its id and schema version)."""
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]).get("__metadata__", {})


def decode_record(blob: bytes) -> dict:
    """Arrays of one record with edges expanded: ``i``, ``j``, ``shift`` as int64."""
    t = stnp.load(bytes(blob))
    counts = t.pop("nbr_count").astype(np.int64)
    out = {k: v for k, v in t.items()}
    out["z"] = out["z"].astype(np.int64)
    out["pbc"] = out["pbc"].astype(bool)
    out["i"] = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    out["j"] = out["j"].astype(np.int64)
    out["shift"] = out["shift"].astype(np.int64).reshape(-1, 3)
    out["id"] = record_metadata(blob).get("id")
    return out
