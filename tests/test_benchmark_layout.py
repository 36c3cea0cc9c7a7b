"""The benchmarks keep their shape: no import circle among benchmarks/*.py, no module reaching into another's private
helpers (what several modules share lives in a public module: references.py, upstream.py, shapes.py, mllama.py),
no op module importing another (importing one registers its ops), and one name per op, the stem where it has a
kernel. Read from the source (imports inside functions count), so a circle is caught before anything runs.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
MODULES = sorted(p.stem for p in BENCH.glob("*.py"))


def _imports(name):
    """(module imported, names taken from it) for every import of a benchmarks module in ``name``, at any depth,
    and the local aliases bound to benchmarks modules (``from . import results as R``)."""
    tree = ast.parse((BENCH / f"{name}.py").read_text())
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                parts = node.module.split(".") if node.module else []
            elif node.level == 0 and node.module and node.module.split(".")[0] == "benchmarks":
                parts = node.module.split(".")[1:]
            else:
                continue
            if parts:  # from .x import a, b
                found.append((parts[0], [a.name for a in node.names]))
            else:  # from . import x [as y]
                for a in node.names:
                    found.append((a.name, []))
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "benchmarks" and len(parts) > 1:
                    found.append((parts[1], []))
    return tree, found, aliases


def _graph():
    return {name: {target for target, _ in _imports(name)[1] if target in MODULES and target != name}
            for name in MODULES}


def _cycle(graph):
    """One import circle as a list of modules, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_no_import_circle():
    cycle = _cycle(_graph())
    assert cycle is None, "benchmarks import circle: " + " -> ".join(cycle)


def test_no_private_helper_crosses_modules():
    crossings = []
    for name in MODULES:
        tree, found, aliases = _imports(name)
        crossings += [f"{name}: from .{target} import {n}" for target, names in found if target != name
                      for n in names if n.startswith("_")]
        crossings += [f"{name}: {node.value.id}.{node.attr}" for node in ast.walk(tree)
                      if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                      and node.value.id in aliases and node.attr.startswith("_") and not node.attr.startswith("__")]
    assert not crossings, "private helpers used across benchmark modules (share them through a public module): " \
        + "; ".join(crossings)


def test_op_modules_import_no_other_op_module():
    graph = _graph()
    crossings = [f"{name} -> {target}" for name in MODULES if name.startswith("ops_")
                 for target in sorted(graph[name]) if target.startswith("ops_")]
    assert not crossings, "an op module imports another (and so registers its ops): " + "; ".join(crossings)


def test_catalog_lists_every_op_module(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import catalog

    assert sorted(catalog.OP_MODULES) == [m for m in MODULES if m.startswith("ops_")]


def test_kernel_ops_are_named_by_their_stem(monkeypatch):
    """Each kernel family has a benchmark op named by its stem (``--ops media_decode``; no second name), whose cells
    carry that name into the result files."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import catalog
    from fastflamingo.ops import KERNEL_FAMILIES

    ops = catalog.load_all()
    assert not catalog.LOAD_ERRORS, catalog.LOAD_ERRORS
    assert set(KERNEL_FAMILIES) <= set(ops), sorted(set(KERNEL_FAMILIES) - set(ops))
    for stem in KERNEL_FAMILIES:
        assert all(case.op == stem for profile in ("cpu", "full") for case in ops[stem].cases(profile, None)), stem
