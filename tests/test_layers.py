"""Imports flow one way: cli/bench/results -> ptq/export/deploy -> engine -> eval -> data/models ->
nn/quant/config/utils; and no two packages import each other, directly or through others."""

import ast
from collections import defaultdict
from pathlib import Path

import saq

PACKAGE = Path(saq.__file__).parent
LAYER = {"cli": 5, "bench": 5, "results": 5, "ptq": 4, "export": 4, "deploy": 4, "engine": 3, "eval": 2, "data": 1, "models": 1,
         "nn": 0, "quant": 0, "config": 0, "utils": 0}


def _layer_of(module: str) -> int:
    parts = module.split(".")
    if parts[-1] == "__main__":  # `python -m saq.ptq` shims belong to the command line
        return LAYER["cli"]
    return LAYER.get(parts[1], 0) if len(parts) > 1 else LAYER["cli"]


def _import_graph() -> dict[str, set[str]]:
    graph = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(("saq",) + path.relative_to(PACKAGE).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("saq."):
                graph[module].add(node.module)
            elif isinstance(node, ast.Import):
                graph[module].update(a.name for a in node.names if a.name.startswith("saq."))
    return graph


def test_no_import_points_up_a_layer():
    upward = [(a, b) for a, targets in _import_graph().items() for b in targets
              if a.split(".")[1] != b.split(".")[1] and _layer_of(b) > _layer_of(a)]
    assert upward == []


def test_no_import_cycles_between_modules():
    graph = _import_graph()
    cycles = []

    def visit(start, node, path):
        for nxt in graph.get(node, ()):
            if nxt == start:
                cycles.append(path)
            elif nxt not in path and len(path) < 8:
                visit(start, nxt, path + [nxt])

    for module in list(graph):
        visit(module, module, [module])
    assert cycles == []


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The graph is built from real files: a planted upward import is reported."""
    fake = tmp_path / "saq"
    (fake / "quant").mkdir(parents=True)
    (fake / "quant" / "bad.py").write_text("from saq.ptq.pipeline import run_ptq\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    graph = _import_graph()
    assert graph["saq.quant.bad"] == {"saq.ptq.pipeline"}
    assert _layer_of("saq.ptq.pipeline") > _layer_of("saq.quant.bad")




def package_imports() -> dict[str, set[str]]:
    """saq sub-package -> the other saq sub-packages its modules import."""
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) < 2 or path.name == "__main__.py":
            continue  # top-level modules are not a layer; `python -m saq.X` shims sit above every layer
        package = parts[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for name in names:
                pieces = name.split(".")
                if pieces[0] == "saq" and len(pieces) > 1 and pieces[1] != package and (PACKAGE / pieces[1]).is_dir():
                    edges.setdefault(package, set()).add(pieces[1])
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every package that can reach itself, with one path back."""
    found = []
    for start in sorted(edges):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(edges.get(node, ())):
                if nxt == start:
                    found.append(path + [start])
                    stack.clear()
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return found


def test_no_import_cycles_between_packages():
    assert cycles(package_imports()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"], ["b", "c", "a", "b"],
                                                                         ["c", "a", "b", "c"]]

