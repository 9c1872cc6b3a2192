"""No code path unpickles a file or evaluates a string (issue 6, security).

Read from the syntax trees of the package, the widgets, the benchmarks and every code cell of
the notebooks: no ``pickle``/``dill``/``joblib``/``shelve``/``marshal`` loads, no
``pandas.read_pickle``, ``numpy.load`` only with ``allow_pickle`` absent or False,
``torch.load`` only with ``weights_only=True``, and no ``eval``/``exec``/``compile`` calls.
The checkpoint loader's refusal of a pickled object is tested in ``test_checkpoint.py``.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOADERS = {"load", "loads", "Unpickler", "open"}  # what reads a pickle (shelve.open included)
UNPICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}


def _skipped(path: Path) -> bool:
    """Virtual environments (``.venv``, the peer's ``bench/.venv-cryodrgn``) and notebook checkpoints."""
    return any(part.startswith(".venv") or part == ".ipynb_checkpoints" for part in path.parts)


def sources() -> list[tuple[str, str]]:
    """(name, source) of every Python file and notebook code cell we ship or run."""
    out = []
    for folder in ("cryospin_lab", "widgets", "bench", "notebooks", "tests/browser"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if not _skipped(path):
                out.append((str(path.relative_to(ROOT)), path.read_text(encoding="utf-8")))
        for path in sorted((ROOT / folder).rglob("*.ipynb")):
            if _skipped(path):
                continue
            cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
            for i, cell in enumerate(cells):
                if cell["cell_type"] == "code":
                    text = "".join(cell["source"])
                    # IPython magics and shell escapes are not Python
                    text = "\n".join(
                        line for line in text.splitlines() if not line.lstrip().startswith(("%", "!"))
                    )
                    out.append((f"{path.relative_to(ROOT)} cell {i}", text))
    return out


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def findings(name: str, text: str) -> list[str]:
    tree = ast.parse(text, filename=name)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLING_MODULES:
            for alias in node.names:
                if alias.name in LOADERS:
                    found.append(f"{name}:{node.lineno}: imports {node.module}.{alias.name}")
        if not isinstance(node, ast.Call):
            continue
        func = dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        where = f"{name}:{node.lineno}: {func}(...)"
        parts = func.split(".")
        if len(parts) > 1 and parts[0] in UNPICKLING_MODULES and parts[-1] in LOADERS:
            found.append(f"{where} unpickles")
        if func in ("eval", "exec", "compile", "builtins.eval", "builtins.exec"):
            found.append(f"{where} evaluates a string")
        if func.endswith("read_pickle"):
            found.append(f"{where} unpickles")
        if func in ("torch.load",):
            value = keywords.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append(f"{where} without weights_only=True")
        if func in ("np.load", "numpy.load"):
            value = keywords.get("allow_pickle")
            if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                found.append(f"{where} with allow_pickle")
    return found


def test_the_scan_finds_what_it_looks_for():
    bad = """
import pickle
from dill import loads
pickle.load(file)
eval("1 + 1")
torch.load(path)
torch.load(path, weights_only=False)
np.load(path, allow_pickle=True)
pd.read_pickle(path)
"""
    hits = findings("example.py", bad)
    assert len(hits) == 7, hits
    good = "import pickle\nerror = pickle.UnpicklingError\ntorch.load(path, weights_only=True)\n"
    good += "np.load(path)\nmodel.eval()\n"
    assert findings("example.py", good) == []


def test_no_unpickling_and_no_string_evaluation():
    files = sources()
    assert len(files) > 50  # the package, widgets, benchmarks and notebook cells were all found
    assert [hit for name, text in files for hit in findings(name, text)] == []
