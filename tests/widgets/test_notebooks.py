"""Every notebook in ``notebooks/`` runs top to bottom on the tiny settings (``CRYOSPIN_LAB_QUICK=1``).

Each notebook is executed with nbclient in a kernel of *this* Python (a
kernelspec written to a temporary ``JUPYTER_PATH``, which jupyter_client
searches before the user's and the system's kernels; a cell prepended in memory
prints the kernel's ``sys.executable`` to prove it), in a temporary working
folder, and must finish without a cell error. A few outputs are then checked
against what the notebook's physics must give, independently of the code that
printed them: the two projection routes of the Fourier slice theorem agree,
noisy particles correlate with their clean render as ``sqrt(SNR / (1 + SNR))``,
the second mode of a posterior sits at the pseudo-symmetric mate of the true
view, and the workbench's export is a RELION STAR with one row per particle.

About 2 minutes for the four notebooks on a 2-core CPU (kernel start and
imports included).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
KERNEL = "cryospin-lab-test"
PROBE = "import sys\nprint('KERNEL-PYTHON', sys.executable)"


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory) -> Path:
    """A JUPYTER_PATH holding one kernelspec: this interpreter running ipykernel."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"})
    )
    return root


def _text(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream" and output.get("name") == "stdout":
            parts.append(output["text"])
        elif output.get("output_type") in ("execute_result", "display_data"):
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def run_notebook(name: str, workdir: Path, kernel_path: Path, monkeypatch) -> str:
    """Execute ``notebooks/<name>`` in ``workdir``; all stdout and text results, joined."""
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_path))
    monkeypatch.setenv("CRYOSPIN_LAB_QUICK", "1")
    monkeypatch.delenv("VOILA_BASE_URL", raising=False)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), (
        f"{name} is committed with outputs: clear them"
    )
    nb.cells.insert(0, nbformat.v4.new_code_cell(PROBE))
    client = NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=300,
        resources={"metadata": {"path": str(workdir)}},
        allow_errors=False,
    )
    client.execute()  # raises CellExecutionError naming the cell on the first error
    text = "\n".join(_text(cell) for cell in nb.cells if cell.cell_type == "code")
    python = re.search(r"KERNEL-PYTHON (\S+)", text)
    assert python is not None and Path(python.group(1)) == Path(sys.executable)
    return text


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match is not None, f"no output matching {pattern!r} in:\n{text[-3000:]}"
    return float(match.group(1))


def test_notebooks_are_all_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == [
        "01_image_formation.ipynb",
        "02_pose_ambiguity.ipynb",
        "03_when_to_switch.ipynb",
        "workbench.ipynb",
    ]


def test_workbench_notebook_forks_switches_and_exports(tmp_path, kernel_path, monkeypatch):
    import starfile

    text = run_notebook("workbench.ipynb", tmp_path, kernel_path, monkeypatch)
    assert "forked at epoch 1: main -> amortized, direct" in text
    # "Switching…" once the engine has started the switch's candidate pass
    assert re.search(r"right after the click: Switch(ing…| requested…)", text), text[-2000:]
    assert "when the run has switched: Switched at epoch 1 (by hand)" in text
    assert "run stopped" in text
    out = tmp_path / "runs" / "workbench"
    for name in ("map.mrc", "map_amortized.mrc", "map_direct.mrc", "poses_direct.star", "metrics.csv"):
        assert (out / name).stat().st_size > 0, name
    poses = starfile.read(out / "poses_direct.star", always_dict=True)
    assert len(poses["particles"]) == 500
    assert {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnImageName"} <= set(poses["particles"].columns)
    assert "optics" in poses


def test_image_formation_notebook(tmp_path, kernel_path, monkeypatch):
    text = run_notebook("01_image_formation.ipynb", tmp_path, kernel_path, monkeypatch)
    assert _number(r"correlation between the two routes: ([\d.]+)", text) > 0.99
    measured = _number(r"mean correlation noisy vs clean: ([\d.]+)", text)
    snr = 0.1  # the default set's SNR (datasets.hsp90), not read from the notebook
    assert abs(measured - np.sqrt(snr / (1 + snr))) < 0.05


def test_pose_ambiguity_notebook(tmp_path, kernel_path, monkeypatch):
    text = run_notebook("02_pose_ambiguity.ipynb", tmp_path, kernel_path, monkeypatch)
    assert _number(r"pseudo-symmetry: a ([\d.]+)° rotation", text) > 170
    # The two highest posterior modes of an image under the true map: its true view and the mate S v.
    assert _number(r"two highest modes: ([\d.]+)° from the true view", text) < 15
    assert _number(r"° from the true view and ([\d.]+)° from its mate", text) < 15
    assert "PosteriorPanel: particle" in text


def test_when_to_switch_notebook(tmp_path, kernel_path, monkeypatch):
    text = run_notebook("03_when_to_switch.ipynb", tmp_path, kernel_path, monkeypatch)
    for branch in ("direct", "direct-2", "amortized-2"):
        assert re.search(rf"^\s*{re.escape(branch)}\s", text, flags=re.MULTILINE), branch
    # the replay cell opens the run it has just watched (no recorded runs in the test), at its last epoch
    assert "replaying 1 run(s): after epoch 3" in text, text[-2000:]
