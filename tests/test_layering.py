"""Data flows one way: recipe → sources → llm → compile → release → torch, with the
builder (and the commands on top of it) the only place that knows the order. This test
reads every module's imports (ast, not execution) and fails on an import against that
order or on any cycle; and it keeps a training worker's `import mmrecipe.torch` free of
the compiler's dependencies."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "python" / "mmrecipe"

# The layer of each top-level module or package: a module may import only from its own
# layer or an earlier one. Layer 0 is the foundation every stage may use.
LAYERS = {
    "_core": 0, "errors": 0, "hashing": 0, "buffers": 0, "imageref": 0,
    "recipe": 1,
    "sources": 2,
    "llm": 3,
    "compile": 4, "encode": 4, "store": 4,
    "release": 5,
    "torch": 6, "loader": 6, "export": 6,
    "engines": 6,
    "builder": 7,
    "check": 8, "preview": 8,
    "cli": 9, "__main__": 10,
}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str, root: Path = PACKAGE) -> set[str]:
    """The mmrecipe modules `path` imports, anywhere in the file (lazy imports too)."""
    tree = ast.parse(path.read_text("utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "mmrecipe"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "mmrecipe":
                continue
            for alias in node.names:  # `from . import x` may name a module
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate, root) else target)
    return found


def _exists(name: str, root: Path) -> bool:
    rel = Path(*name.split(".")[1:])
    return (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file() or (root / f"{rel}.pyi").is_file()


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    out = {}
    for path in sorted(package.rglob("*.py")):
        name = module_name(path, package)
        out[name] = {m for m in imports_of(path, name, package) if m != name}
    return out


def layer(name: str) -> int:
    parts = name.split(".")
    if len(parts) == 1:  # the package's face: its names are imported on first use
        return max(LAYERS.values())
    return LAYERS[parts[1]]


def violations(g: dict[str, set[str]]) -> list[str]:
    problems = []
    for name, deps in g.items():
        for dep in sorted(deps):
            if dep == "mmrecipe" and name != "mmrecipe":
                continue  # `from mmrecipe import __version__`
            if layer(dep) > layer(name):
                problems.append(f"{name} (layer {layer(name)}) imports {dep} (layer {layer(dep)})")
    return problems


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if dep == "mmrecipe":
                continue
            if state.get(dep) == 1:
                found.append(stack[stack.index(dep):] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    return found


def test_every_module_has_a_layer():
    unknown = sorted({n.split(".")[1] for n in graph() if "." in n} - set(LAYERS))
    assert not unknown, f"give these modules a layer in LAYERS: {unknown}"


def test_imports_follow_the_pipeline():
    assert violations(graph()) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_check_catches_an_upward_import(tmp_path):
    """The test above would fail: a copy of the package with one upward import added."""
    import shutil

    copy = tmp_path / "mmrecipe"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    schema = copy / "recipe" / "schema.py"
    schema.write_text(schema.read_text("utf-8") + "\nfrom ..release.format import MANIFEST  # noqa\n", "utf-8")
    bad = violations(graph(copy))
    assert bad == ["mmrecipe.recipe.schema (layer 1) imports mmrecipe.release.format (layer 5)"]
    sources = copy / "sources" / "columns.py"
    sources.write_text(sources.read_text("utf-8") + "\nfrom . import layouts  # noqa\n", "utf-8")
    assert any("mmrecipe.sources.columns" in c and "mmrecipe.sources.layouts" in c for c in cycles(graph(copy)))


def test_a_training_worker_does_not_import_the_compiler():
    pytest.importorskip("torch")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    run = subprocess.run([sys.executable, "-X", "importtime", "-c", "import mmrecipe.torch"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "mmrecipe.torch" in imported  # the log is what we think it is
    heavy = sorted(m for m in imported if m.split(".")[0] in ("polars", "httpx") or m in ("mmrecipe.builder", "mmrecipe.compile"))
    assert heavy == []
