"""Imports flow one way (issue 7.11): cli/jobs → export → train → models → ops; data below train;
no module imports another that imports it back. Read from the source with ``ast``."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "uae_dist"

# package → the packages it must never import (directly or in a function)
FORBIDDEN = {
    "ops": {"data", "models", "train", "export", "jobs", "cli", "config", "tables", "experiments",
            "analysis"},
    "data": {"models", "train", "export", "jobs", "cli", "config", "experiments", "analysis"},
    "models": {"train", "export", "jobs", "cli", "config", "data", "experiments", "analysis"},
    "tables": {"train", "export", "jobs", "cli", "models", "data", "experiments", "analysis"},
    "train": {"export", "jobs", "cli", "experiments", "analysis"},
    "export": {"jobs", "cli", "experiments", "analysis"},
}


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    mod = _module(path)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("uae_dist")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("uae_dist"):
                out.add(target)
                out |= {f"{target}.{a.name}" for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        graph[mod] = {t for t in _imports(path) if t in files and t != mod}
    return graph


def _top(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_layers_import_one_way():
    bad = [(m, t) for m, ts in _graph().items() for t in ts
           if _top(t) in FORBIDDEN.get(_top(m), set())]
    assert not bad, bad


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ re-exporting its own modules is not a cycle of behaviour
    for m in graph:
        graph[m] = {t for t in graph[m] if not (m.startswith(t + ".") and t in graph)}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, cycles
