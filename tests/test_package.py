"""Packaging: the engine/UI boundary and the `cryospin_lab.widgets` mapping."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("physics", "io", "model", "simulate", "analysis", "engine", "app")
UI_MODULES = ("ipywidgets", "plotly", "nglview", "IPython", "anywidget", "cryospin_lab.widgets")


def test_engine_never_imports_ui_modules():
    """Import every engine module in a fresh interpreter; no UI module may be loaded."""
    engine_modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "cryospin_lab").rglob("*.py")
        if p.stem != "__main__"
    )
    assert "cryospin_lab.engine.trainer" in engine_modules and "cryospin_lab.app.cli" in engine_modules
    code = (
        "import importlib, sys\n"
        f"for m in {engine_modules!r}: importlib.import_module(m)\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {UI_MODULES!r} or m in {UI_MODULES!r}]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"engine imported UI modules: {out.stdout}"


def test_widgets_import_name_in_this_install():
    import cryospin_lab.widgets as w

    assert Path(w.__file__).resolve() == ROOT / "widgets" / "__init__.py"
    # no top-level `widgets` package is installed
    out = subprocess.run(
        [sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('widgets'))"],
        capture_output=True,
        text=True,
        cwd="/",
        check=True,
    )
    assert out.stdout.strip() == "None"


@pytest.mark.slow
def test_wheel_maps_widgets_folder(tmp_path):
    """Build a wheel, install it into a bare folder, import `cryospin_lab.widgets` from there."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            tmp_path,
            ROOT,
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("cryospin_lab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "cryospin_lab/widgets/__init__.py" in names
    assert "cryospin_lab/assets/2cg9.pdb.gz" in names
    assert {f"cryospin_lab/{sub}/__init__.py" for sub in SUBPACKAGES} <= set(names)
    assert not any(n.startswith("widgets/") for n in names)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target, wheel],
        check=True,
        capture_output=True,
    )
    code = (
        "import cryospin_lab.widgets as w, cryospin_lab as c; c.Reconstruction, c.simulate_particles; "
        "print(w.__file__); print(c.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    widget_file, package_file = out.stdout.split()
    assert widget_file == str(target / "cryospin_lab" / "widgets" / "__init__.py")
    assert package_file == str(target / "cryospin_lab" / "__init__.py")
