"""The packages of saq form layers: no package imports (at module level or inside a function) a
package that imports it back, directly or through others. (``__main__.py`` shims, which only call the
CLI, are above every layer.)"""

import ast
from pathlib import Path

SAQ = Path(__file__).resolve().parents[1] / "saq"


def package_imports() -> dict[str, set[str]]:
    """saq sub-package -> the other saq sub-packages its modules import."""
    edges: dict[str, set[str]] = {}
    for path in SAQ.rglob("*.py"):
        parts = path.relative_to(SAQ).parts
        if len(parts) < 2 or path.name == "__main__.py":
            continue  # top-level modules are not a layer; `python -m saq.X` shims sit above every layer
        package = parts[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for name in names:
                pieces = name.split(".")
                if pieces[0] == "saq" and len(pieces) > 1 and pieces[1] != package and (SAQ / pieces[1]).is_dir():
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


def test_no_package_import_cycles():
    assert cycles(package_imports()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"], ["b", "c", "a", "b"],
                                                                         ["c", "a", "b", "c"]]

