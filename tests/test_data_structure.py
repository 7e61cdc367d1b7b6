"""Issue 7 point 11, data side: no import cycles in uae_dist.data, readers independent of the
builder, and data-build defaults in one place (BuildOptions / RunOptions)."""
import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

from _data_fixtures import cli, manifest, mp_records, write_json

DATA = Path(__file__).resolve().parents[1] / "uae_dist" / "data"


def _imports() -> dict[str, set[str]]:
    """module -> uae_dist.data modules it imports, at top level or inside functions."""
    mods = {p.stem for p in DATA.glob("*.py")}
    graph = {}
    for p in DATA.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    deps.add(node.module.split(".")[0])
                elif node.level == 1:
                    deps |= {a.name for a in node.names if a.name in mods}
                elif (node.module or "").startswith("uae_dist.data."):
                    deps.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[2] for a in node.names
                         if a.name.startswith("uae_dist.data.")}
        graph[p.stem] = deps & mods - {p.stem}
    return graph


def _reach(graph, start) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for d in graph[todo.pop()]:
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_no_import_cycles_in_the_data_package():
    graph = _imports()
    cycles = sorted(m for m in graph if m in _reach(graph, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


@pytest.mark.parametrize("reader", ["dataset", "verify"])
def test_readers_do_not_import_the_builder(reader):
    reach = _reach(_imports(), reader)
    assert not reach & {"build", "shard", "pool", "finalize", "sources"}, sorted(reach)


def test_build_defaults_live_in_one_place():
    from uae_dist.cli import build_parser
    from uae_dist.data.build import BuildOptions, build_lmdb
    from uae_dist.data.graph import GraphOptions

    # no default repeated in the signature of the builder or in the graph options
    params = inspect.signature(build_lmdb).parameters.values()
    assert not [p.name for p in params if p.default is not inspect.Parameter.empty]
    cutoff = next(f for f in dataclasses.fields(GraphOptions) if f.name == "cutoff")
    assert cutoff.default is dataclasses.MISSING
    # the command line takes its defaults from the options classes
    from uae_dist.data.options import RunOptions
    a = build_parser().parse_args(["data", "build", "--source", "s", "--out", "o"])
    b, r = BuildOptions(), RunOptions()
    got = {"cutoff": a.cutoff, "max_neighbors": a.max_neighbors, "max_pairs": a.max_pairs,
           "shards": a.shards, "limit": a.limit, "fmt": a.format, "id_key": a.id_key,
           "cif_key": a.cif_key, "fast_cif": not a.no_fast_cif, "seed": a.seed,
           "split": tuple(float(x) for x in a.split.split(",")), "targets": a.targets,
           "workers": a.workers, "commit_every": a.commit_every, "progress": not a.quiet}
    want = {k: getattr(b, k) if hasattr(b, k) else getattr(r, k) for k in got}
    assert got == want


def test_cli_and_api_defaults_build_the_same_data_set(tmp_path):
    src = write_json(tmp_path / "s.json.gz", mp_records(6))
    from uae_dist.data.build import build_lmdb

    build_lmdb(src, tmp_path / "api", progress=False, use_mpi=False)
    r = cli("data", "build", "--source", src, "--out", tmp_path / "cli", "-q")
    assert r.returncode == 0, r.stderr
    assert manifest(tmp_path / "api")["options"] == manifest(tmp_path / "cli")["options"]
