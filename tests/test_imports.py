"""The import graph (docs/ARCHITECTURE.md): a one-way street, function-level imports included.

Two checks: a static one that reads every project module's source with `ast` and collects every
import statement, at module level or inside a function (a lazy import is still a dependency,
and a cycle through one is still a cycle), then checks the layering rules and that the module
graph has no cycle; and a dynamic one that imports a module in a fresh interpreter and checks
which heavy third-party packages it really pulls in.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# top-level unit -> project units it may import (directly, at any depth of the code)
ALLOWED = {
    "config": set(),
    "loss": set(),
    "models": set(),
    "data": set(),
    "metrics": set(),
    "quantification": set(),
    "pictures": {"metrics"},
    "report": {"quantification"},
    "checkpoint": set(),
    "runlog": set(),
    "runtime": {"config"},
    "inference": {"data"},
    "export": {"models"},
    "factory": {"config", "data", "models", "loss"},
    "training": {"runtime", "checkpoint", "runlog", "data", "inference", "models", "metrics"},
    "test": {"config", "data", "models", "loss", "runtime", "checkpoint", "inference", "factory",
             "metrics", "pictures", "quantification", "report", "export"},
    "main": {"config", "data", "models", "loss", "runtime", "checkpoint", "inference", "factory",
             "training", "test", "metrics"},
    "sweep": {"config", "runtime", "main", "models", "metrics", "factory", "data"},
}
# third-party packages a unit must not load (checked in a fresh interpreter)
FORBIDDEN_THIRD_PARTY = {
    "config": {"torch", "numpy"},
    "loss": {"segmentation_models_pytorch", "timm", "medpy", "nibabel", "scipy"},
    "models": {"medpy", "nibabel", "pydicom"},
    "data": {"segmentation_models_pytorch", "timm", "medpy"},
    "metrics": {"torch", "segmentation_models_pytorch", "timm"},
    "pictures": {"torch"},
}


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the project (tests and bench excluded)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("tests", "bench", "results", "runs", "cache") or rel.parts[0].startswith("."):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in `path` (module level and inside functions)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the submodule pkg.sub when it is one
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # a.b.c -> the longest known module prefix
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as [a, b, ..., a], or None. A package importing its own submodules (data ->
    data.cache) is the package's structure, not a cycle, so edges into a module's own parent
    packages are ignored."""
    def is_parent(parent: str, child: str) -> bool:
        return child.startswith(parent + ".")

    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if is_parent(nxt, node):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def unit(module: str) -> str:
    return module.split(".")[0]


def test_every_unit_has_a_rule():
    assert {unit(m) for m in project_modules()} <= set(ALLOWED), \
        f"add the new module(s) to ALLOWED: {sorted({unit(m) for m in project_modules()} - set(ALLOWED))}"


def test_layering_rules_hold_for_every_import():
    bad = [f"{m} imports {t}" for m, targets in import_graph().items() for t in targets
           if unit(t) != unit(m) and unit(t) not in ALLOWED[unit(m)]]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    # data/b.py imports data.a at module level, data/a.py imports data.b inside a function
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from .b import g\n    return g\n")
    (tmp_path / "pkg" / "b.py").write_text("from pkg.a import f\n\ndef g():\n    return f\n")
    (tmp_path / "top.py").write_text("import pkg.a\n")
    graph = import_graph(tmp_path)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert find_cycle(graph) in (["pkg.a", "pkg.b", "pkg.a"], ["pkg.b", "pkg.a", "pkg.b"])
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(tmp_path)) is None


def loaded_modules(module: str) -> set[str]:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return {name.split(".")[0] for name in json.loads(out.stdout.splitlines()[-1])}


@pytest.mark.parametrize("module", sorted(FORBIDDEN_THIRD_PARTY))
def test_heavy_packages_stay_out(module):
    bad = FORBIDDEN_THIRD_PARTY[module] & loaded_modules(module)
    assert not bad, f"importing {module} pulled in {sorted(bad)}"


def test_main_imports_without_side_effects():
    # importing main must not parse arguments, create run directories or start training
    out = subprocess.run([sys.executable, "-c", "import main, test, training"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout == "", out.stderr


def test_test_py_is_this_repos_not_the_standard_librarys():
    import test

    assert Path(test.__file__).resolve() == ROOT / "test.py"


def test_the_suite_runs_from_another_folder(tmp_path):
    """`python -m pytest <repo>/tests/...` from any folder (pyproject's pythonpath puts the repo
    first, so `import config` and `import test` find the repo's modules)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(ROOT / "tests" / "test_config.py"),
                          str(ROOT / "tests" / "test_imports.py") + "::test_test_py_is_this_repos_not_the_standard_librarys"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
