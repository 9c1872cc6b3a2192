"""The package's layout: subpackages import only downward, no import cycles, modules of one idea.

The import graph is read from the source with ``ast`` (every import in a
module, also those inside functions and under ``TYPE_CHECKING``: a lazy import
is still a dependency), so that a violation fails here before it fails at run
time. Layers, lowest first (docs: the README's "How it fits together")::

    physics <- io, model <- analysis, simulate <- engine <- app <- widgets

A module may import its own subpackage and any lower layer; modules of the
same layer in different subpackages (io and model, analysis and simulate)
do not import each other, and a private module (``_name``) is imported only
from its own subpackage.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "cryospin_lab"
LAYERS = {
    "_lazy": 0,
    "_cache": 0,
    "_version": 0,
    "physics": 1,
    "io": 2,
    "model": 2,
    "analysis": 3,
    "simulate": 3,
    "engine": 4,
    "app": 5,
    "widgets": 6,
    "assets": 0,
}
TOP = 7  # cryospin_lab/__init__.py (the lazy front door) and __main__.py
UI_PACKAGES = {"ipywidgets", "plotly", "nglview", "IPython", "anywidget"}
MAX_LINES = 450


def source_files() -> dict[str, Path]:
    """Module name -> file, for the package and the widgets folder mapped into it."""
    files = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "widgets").glob("*.py")):
        name = f"{PACKAGE}.widgets" + ("" if path.stem == "__init__" else f".{path.stem}")
        files[name] = path
    return files


FILES = source_files()


def imports_of(module: str, path: Path) -> set[str]:
    """Every module ``module`` imports, as absolute names (``from pkg import sub`` names ``pkg.sub``)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names if f"{name}.{alias.name}" in FILES)
    return found


GRAPH = {m: {i for i in imports_of(m, p) if i in FILES and i != m} for m, p in FILES.items()}


def layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "(front door)", TOP
    return parts[1], LAYERS[parts[1]]


def test_every_subpackage_has_a_layer():
    unknown = {module.split(".")[1] for module in FILES if "." in module} - set(LAYERS) - {"__main__"}
    assert not unknown, f"add these subpackages to LAYERS (and to the README's layer list): {unknown}"


def test_imports_point_down_the_layers():
    upward = []
    for module, targets in GRAPH.items():
        package, rank = layer(module)
        for target in targets:
            target_package, target_rank = layer(target)
            if target == PACKAGE and package != "(front door)":
                upward.append(f"{module} imports the front door {PACKAGE}; import from the subpackage")
            elif target_package != package and target_rank >= rank:
                upward.append(f"{module} ({package}, layer {rank}) imports {target} (layer {target_rank})")
    assert not upward, "imports against the layers:\n" + "\n".join(sorted(upward))


def test_private_modules_stay_inside_their_subpackage():
    """``pkg.sub._helper`` is imported by ``pkg.sub`` only; other code uses the subpackage's API."""
    leaks = []
    for module, targets in GRAPH.items():
        for target in targets:
            parts = target.split(".")
            if len(parts) >= 3 and parts[-1].startswith("_") and layer(module)[0] != parts[1]:
                leaks.append(f"{module} imports the private {target}")
    assert not leaks, "\n".join(leaks)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module (each an import cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles():
    assert strongly_connected(GRAPH) == []


def test_cycle_finder_finds_a_cycle():
    """The check above can fail: a two-module cycle and a three-module one are reported."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert strongly_connected(graph) == [["a", "b"], ["c", "d", "e"]]


def test_engine_never_imports_the_ui_even_lazily():
    offenders = []
    for module, path in FILES.items():
        if layer(module)[0] == "widgets":
            continue
        for name in imports_of(module, path):
            if name.split(".")[0] in UI_PACKAGES or name.startswith(f"{PACKAGE}.widgets"):
                offenders.append(f"{module} imports {name}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("module", sorted(FILES))
def test_modules_stay_short(module):
    n_lines = len(FILES[module].read_text().splitlines())
    assert n_lines <= MAX_LINES, f"{FILES[module]}: {n_lines} lines; split it by idea (at most {MAX_LINES})"


def test_the_front_door_and_every_subpackage_export_what_they_list():
    """``import cryospin_lab as csl`` loads nothing heavy; every name in an ``__all__`` resolves."""
    import importlib
    import subprocess
    import sys

    code = "import sys, cryospin_lab as csl; print('torch' in sys.modules, len(csl.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "False"
    for package in [PACKAGE] + [f"{PACKAGE}.{name}" for name in LAYERS if not name.startswith("_")]:
        if package.endswith(("assets", "widgets")):
            continue
        module = importlib.import_module(package)
        missing = [name for name in module.__all__ if getattr(module, name, None) is None]
        assert not missing, f"{package} lists but cannot give {missing}"
