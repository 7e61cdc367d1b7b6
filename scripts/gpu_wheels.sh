#!/usr/bin/env bash
# Prepare gpu_bundle/ (git-ignored) for scripts/gpu_check.sh on a lent GPU machine that has no network:
#
#   wheels/          cp312 manylinux wheels of what that machine lacks (deepspeed and its deps, lmdb,
#                    vesin, pyyaml, pytest, pytest-timeout); deepspeed ships only an sdist, so its
#                    (pure-Python, no prebuilt ops) wheel is built here with DS_BUILD_OPS=0
#   structures.npz   the neighbour-benchmark sets (MP sample + dense cells) as arrays: benchmarks and
#                    GPU tests need no pymatgen there
#   mp_subset.json.gz  the first N_LMDB MP records (for a build there, if pymatgen were importable)
#   mp_lmdb/         those records built here into the project's LMDB format (the data builder needs
#                    pymatgen, whose wheels and deps are far over the 64 MiB that can travel)
#   SIZES            what travels: every file above, and the tracked working tree
#
# Run it here (needs PyPI and ../shared/data); it fails if the bundle plus the working tree exceed
# 64 MiB. Then carry the folder: the device tool's run with carry=["gpu_bundle"].
#
#   scripts/gpu_wheels.sh                     # N_LMDB=2000 N_BENCH=1000
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-$REPO/.venv/bin/python}"
BUNDLE="${BUNDLE:-$REPO/gpu_bundle}"
MP="${MP:-$REPO/../shared/data/mp_cgcnn_36737.json.gz}"
N_LMDB="${N_LMDB:-2000}"
N_BENCH="${N_BENCH:-1000}"
LIMIT_MIB=64
W="$BUNDLE/wheels"
mkdir -p "$W"

# --isolated: the local pip config (find-links with this machine's cp311 wheels, a constraints file)
# must not shape a download for another machine
DL=(download --isolated --disable-pip-version-check -q --only-binary=:all: --python-version 3.12
    --implementation cp --abi cp312 --abi abi3 --abi none
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
    --platform linux_x86_64 --platform any -d "$W")
echo "== wheels -> $W"
# these resolve their own dependencies without pulling torch or numpy
"$PY" -m pip "${DL[@]}" "pydantic==2.14.4" einops hjson msgpack ninja packaging psutil py-cpuinfo tqdm \
  "lmdb==3.0.0" pyyaml pytest pytest-timeout
# vesin needs numpy, which that machine has: no dependencies
"$PY" -m pip "${DL[@]}" --no-deps "vesin==0.6.2"
if ! ls "$W"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  TMP="$(mktemp -d)"
  "$PY" -m pip download --isolated --disable-pip-version-check -q --no-deps --no-binary=:all: \
    "deepspeed==0.19.8" -d "$TMP"
  DS_BUILD_OPS=0 "$PY" -m pip wheel --isolated --disable-pip-version-check -q --no-deps \
    --no-build-isolation -w "$W" "$TMP"/deepspeed-0.19.8.tar.gz
  rm -rf "$TMP"
fi
ls "$W"/deepspeed-0.19.8-py3-none-any.whl >/dev/null

echo "== benchmark structures -> $BUNDLE/structures.npz"
"$PY" benchmarks/neighbors.py --n "$N_BENCH" --save-structures "$BUNDLE/structures.npz"

echo "== MP subset ($N_LMDB records) and its LMDB"
"$PY" - "$MP" "$BUNDLE/mp_subset.json.gz" "$N_LMDB" <<'PY'
import gzip, json, sys
rows = json.load(gzip.open(sys.argv[1], "rt"))[: int(sys.argv[3])]
with gzip.open(sys.argv[2], "wt") as fh:
    json.dump(rows, fh)
print(f"{len(rows)} records")
PY
if [ ! -f "$BUNDLE/mp_lmdb/manifest.json" ]; then
  rm -rf "$BUNDLE/mp_lmdb"
  "$PY" -m uae_dist.cli data build --source "$BUNDLE/mp_subset.json.gz" --out "$BUNDLE/mp_lmdb" \
    --targets e_form_per_atom,band_gap --shards 1 --workers 2 -q
fi
rm -f "$BUNDLE"/mp_lmdb/shards/*.lmdb-lock

echo "== sizes"
TREE=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
BUN=$(du -sb "$BUNDLE" | cut -f1)
{
  echo "# what travels with the working tree for scripts/gpu_check.sh (bytes)"
  (cd "$BUNDLE" && find . -type f -printf '%s\t%p\n' | sort -k2)
  echo "bundle_total	$BUN"
  echo "tracked_tree	$TREE"
  echo "all	$((BUN + TREE))	limit $((LIMIT_MIB * 1024 * 1024))"
} > "$BUNDLE/SIZES"
tail -3 "$BUNDLE/SIZES"
if [ $((BUN + TREE)) -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
  echo "bundle + tree exceed ${LIMIT_MIB} MiB" >&2
  exit 1
fi
echo "gpu_bundle ready: $(( (BUN + TREE) / 1024 / 1024 )) MiB of ${LIMIT_MIB} MiB"
