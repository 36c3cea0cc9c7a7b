"""The tree keeps its shape: one stem per op across kernels/, fastflamingo/ops/, fastflamingo/selftest/, tests/ and
benchmarks/; small modules; no project module loaded through importlib; no import circle, and an ops layer that
reaches no higher; no reference to a file outside the repository."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# limits of docs/design.md, "Layout": a module that outgrows them holds more than one concept
MAX_LINES = {"fastflamingo": 450, "kernels": 600}
# assembled from pieces, so that this file does not match itself
OUTSIDE = re.compile("|".join((r"\.\./" + "shared", "/work/" + "shared", r"\b(PERF|SEMANTICS|CPU_TESTING|STYLE)\." + r"md\b")))


def _tracked(*patterns):
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / line for line in out.stdout.split()]


def test_every_kernel_family_has_its_five_files():
    from fastflamingo.ops import KERNEL_FAMILIES

    for stem in KERNEL_FAMILIES:
        for path in (f"kernels/{stem}.py", f"fastflamingo/ops/{stem}.py", f"fastflamingo/selftest/{stem}.py",
                     f"tests/test_{stem}.py", f"benchmarks/ops_{stem}.py"):
            assert (ROOT / path).is_file(), f"kernel family {stem!r} has no {path}"


def test_modules_stay_small():
    too_big = []
    for folder, limit in MAX_LINES.items():
        for path in _tracked(f"{folder}/*.py", f"{folder}/**/*.py"):
            lines = path.read_text().count("\n")
            if lines > limit:
                too_big.append(f"{path.relative_to(ROOT)}: {lines} lines > {limit}")
    assert not too_big, too_big


def test_no_importlib_of_project_modules():
    offenders = []
    for path in _tracked("fastflamingo/*.py", "fastflamingo/**/*.py", "kernels/*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"importlib\.(import_module|util\.spec_from_file_location)\([^)]*(fastflamingo|kernels|\"\.)",
                         line) or "spec_from_file_location" in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_nothing_cites_a_path_outside_the_repository():
    offenders = []
    for path in _tracked("*.py", "*.md", "*.sh", "*.ini", "*.cfg", "*.toml", ".ci/*"):
        if "benchmarks/results" in str(path) or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not offenders, offenders


def test_tests_named_by_the_readme_exist():
    """The README's tables name the test behind each claim (``test_x.py::test_y``, then ``::test_z`` for more of
    the same file): every one of them exists."""
    text = (ROOT / "README.md").read_text()
    missing = []
    for line in text.splitlines():
        current = None
        for match in re.finditer(r"(test_\w+\.py)?::(\w+)", line):
            current = match.group(1) or current
            if current is None:
                continue
            source = ROOT / "tests" / current
            if not source.is_file() or not re.search(rf"def {match.group(2)}\b", source.read_text()):
                missing.append(f"{current}::{match.group(2)}")
    assert not missing, missing


# What the ops layer (launchers and custom ops) must never import: the model families, the patching rules, the
# selftest, the test kit and the oracles sit above it (docs/design.md, "Layout").
ABOVE_OPS = ("fastflamingo.models", "fastflamingo.patching", "fastflamingo.selftest", "fastflamingo.testing",
             "fastflamingo.reference")


def _module_files():
    """{module name: path} for every module of the library (kernels/ as fastflamingo.kernels, its symbolic link)."""
    files = {}
    paths = [p for p in (ROOT / "fastflamingo").rglob("*.py") if "kernels" not in p.relative_to(ROOT).parts]
    for path in paths + sorted((ROOT / "kernels").glob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[0] == "kernels":
            parts = ["fastflamingo"] + parts
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def _import_graph():
    """{module: {modules it imports}} from every import statement, at module level or inside a function: an import
    inside a function closes a circle as surely as one at the top, only later."""
    import ast

    files = _module_files()
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")
                base = base[:len(base) - node.level + 1] if node.level else []
                source = ".".join(base + ([node.module] if node.module else []))
                # ``from pkg import name``: the submodule pkg.name when there is one, else pkg itself
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    targets.add(submodule if submodule in files else source)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def _circles(graph):
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circles():
    """The library's import graph (function-level imports included) has no circle, and the ops layer imports
    nothing above it: no model family, patching rule, selftest, test kit or oracle."""
    graph = _import_graph()
    assert not _circles(graph), _circles(graph)
    reaching_up = sorted(f"{name} imports {target}" for name, targets in graph.items()
                         if name.startswith("fastflamingo.ops") for target in targets
                         if any(target == above or target.startswith(above + ".") for above in ABOVE_OPS))
    assert not reaching_up, reaching_up


ATTENTION_FAMILIES = ("media_xattn", "media_decode", "mllama_xattn", "mllama_decode", "perceiver_attn")


def _jit_function_bodies(path: Path):
    """(name, source) of every @triton.jit function of a kernel module."""
    import ast

    source = path.read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and any("triton.jit" in ast.unparse(d) for d in node.decorator_list):
            yield node.name, ast.get_source_segment(source, node)


def test_one_attention_skeleton():
    """The online softmax, its ending and the backward steps are written once, in kernels/_attention.py: no attention
    family exponentiates scores or takes the LSE's logarithm itself (media_decode's combine kernel, which merges
    the splits' LSEs, is the one kernel that is not a softmax over keys), and no family imports another's kernels."""
    written_again = []
    for family in ATTENTION_FAMILIES:
        path = ROOT / "kernels" / f"{family}.py"
        for name, body in _jit_function_bodies(path):
            if name == "_media_decode_combine_kernel":
                continue
            written_again += [f"{family}.{name}: {op}" for op in ("tl.exp2(", "tl.log2(", "float(\"inf\")")
                              if op in body]
        imports = re.findall(r"^from \.(\w+) import", path.read_text(), re.M)
        written_again += [f"{family} imports .{other}" for other in imports if other in ATTENTION_FAMILIES]
    assert not written_again, written_again
