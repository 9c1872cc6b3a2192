"""CTF against independent references: scipy.constants, torch-ctf and cryoDRGN's formula."""

import math

import numpy as np
import pytest
import scipy.constants as const
import torch
import torch_ctf

from cryospin_lab.physics.ctf import (
    CTFParams,
    compute_ctf,
    ctf_images,
    electron_wavelength_angstrom,
    frequency_grid_per_angstrom,
)


def _params(n: int, seed: int = 0, max_astigmatism_angstrom: float = 20000.0) -> CTFParams:
    """Different parameters per image, including df_u < df_v and a phase plate."""
    rng = np.random.default_rng(seed)
    defocus_u = rng.uniform(5000, 25000, n)
    return CTFParams(
        defocus_u_angstrom=defocus_u,
        defocus_v_angstrom=defocus_u + rng.uniform(-1, 1, n) * max_astigmatism_angstrom,
        defocus_angle_deg=rng.uniform(-180, 180, n),
        voltage_kv=rng.choice([100.0, 200.0, 300.0], n),
        cs_mm=rng.uniform(0.01, 2.7, n),
        amplitude_contrast=rng.uniform(0.05, 0.2, n),
        phase_shift_deg=rng.uniform(0, 90, n),
    )


def test_wavelength_matches_scipy_constants():
    for kv in (80.0, 100.0, 200.0, 300.0):
        volts = kv * 1e3
        e_v = const.e * volts
        expected = const.h / math.sqrt(2 * const.m_e * e_v * (1 + e_v / (2 * const.m_e * const.c**2))) * 1e10
        got = float(electron_wavelength_angstrom(kv))
        assert abs(got - expected) / expected < 1e-4, (kv, got, expected)
    batch = electron_wavelength_angstrom(torch.tensor([100.0, 300.0], dtype=torch.float64))
    assert batch.shape == (2,) and batch[1] == pytest.approx(0.019687, rel=1e-4)


@pytest.fixture
def torch_ctf_float64(monkeypatch):
    """torch-ctf hard-codes float32 (``dtype=torch.float``) for its inputs and the wavelength.

    A 300-rad phase (2.5 um defocus at 100 kV near Nyquist) rounds to ~3e-5 in float32, above the
    1e-5 tolerance, so the reference runs the same torch-ctf code in float64.
    """
    import torch_ctf._ctf_core
    import torch_ctf._ctf_preparation
    import torch_ctf.ctf_aberrations

    def as_float64(value, device):
        return torch.as_tensor(value, dtype=torch.float64, device=device)

    def wavelength64(energy):  # torch-ctf's formula, in float64
        ev = const.e * torch.as_tensor(energy, dtype=torch.float64)
        return const.h * const.c / torch.sqrt(ev * (2 * const.m_e * const.c**2 + ev))

    monkeypatch.setattr(torch_ctf._ctf_core, "as_float_tensor", as_float64)
    monkeypatch.setattr(torch_ctf._ctf_preparation, "as_float_tensor", as_float64)
    monkeypatch.setattr(torch_ctf.ctf_aberrations, "calculate_relativistic_electron_wavelength", wavelength64)
    return torch_ctf


def _torch_ctf_images(params: CTFParams, d: int, apix: float) -> torch.Tensor:
    out = []
    for i in range(len(params)):
        u, v = float(params.defocus_u_angstrom[i]), float(params.defocus_v_angstrom[i])
        angle = float(params.defocus_angle_deg[i])
        if u < v:
            # torch-ctf takes sqrt(astigmatism): give it u >= v by swapping the axes.
            u, v, angle = v, u, angle + 90.0
        out.append(
            torch_ctf.calculate_ctf_2d(
                defocus=(u + v) / 2 * 1e-4,  # micrometres, positive = underfocus
                astigmatism=(u - v) / 2 * 1e-4,
                astigmatism_angle=angle,
                voltage=float(params.voltage_kv[i]),
                spherical_aberration=float(params.cs_mm[i]),
                amplitude_contrast=float(params.amplitude_contrast[i]),
                phase_shift=float(params.phase_shift_deg[i]),
                pixel_size=apix,
                image_shape=(d, d),
                rfft=False,
                fftshift=True,  # DC at D // 2, rows = ky, columns = kx, like ours
            ).double()
        )
    return torch.stack(out)


def test_matches_torch_ctf_per_image_batch(torch_ctf_float64):
    """torch-ctf returns -sin(gamma - asin w), i.e. -1 times our (cryoDRGN's, docs/method.md §2) CTF.

    Astigmatism is kept realistic (|df_u - df_v| <= 600 Å): torch-ctf normalises the frequency
    direction by sqrt(|k|^2 + 1.2e-7), which shifts gamma by about pi lambda (df_u - df_v) 1.2e-7
    at every frequency (2.5e-4 for 18,000 Å of astigmatism at 100 kV). Large astigmatism is
    checked against cryoDRGN's formula and analytically below.
    """
    n, d, apix = 8, 64, 1.7
    params = _params(n, max_astigmatism_angstrom=600.0)
    ours = ctf_images(params, d, apix)
    assert ours.shape == (n, d, d)
    torch.testing.assert_close(ours, -_torch_ctf_images(params, d, apix), atol=1e-5, rtol=0)


def test_matches_unpatched_torch_ctf_at_float32_precision():
    params = _params(3, seed=5, max_astigmatism_angstrom=600.0)
    torch.testing.assert_close(
        ctf_images(params, 64, 1.7), -_torch_ctf_images(params, 64, 1.7), atol=5e-4, rtol=0
    )


def _cryodrgn_compute_ctf(freqs, dfu, dfv, dfang, volt, cs, w, phase_shift, bfactor, lam):
    """Transcription of cryoDRGN's ``ctf.compute_ctf`` (cryodrgn/ctf.py), with the wavelength passed in.

    cryoDRGN computes ``lam = 12.2639 / (volt + 0.97845e-6 volt^2) ** 0.5`` itself; passing the
    same wavelength isolates the formula from the constants (tested separately above).
    """
    cs = cs * 10**7
    dfang = dfang * np.pi / 180
    phase_shift = phase_shift * np.pi / 180
    x = freqs[..., 0]
    y = freqs[..., 1]
    ang = torch.atan2(y, x)
    s2 = x**2 + y**2
    df = 0.5 * (dfu + dfv + (dfu - dfv) * torch.cos(2 * (ang - dfang)))
    gamma = 2 * np.pi * (-0.5 * df * lam * s2 + 0.25 * cs * lam**3 * s2**2) - phase_shift
    ctf = (1 - w**2) ** 0.5 * torch.sin(gamma) - w * torch.cos(gamma)
    ctf *= torch.exp(-bfactor / 4 * s2)
    return ctf


def test_matches_cryodrgn_formula_on_frequency_list():
    n = 5
    params = _params(n, seed=1)
    params = CTFParams(
        **{**params.__dict__, "b_factor": torch.tensor([0.0, 50.0, 100.0, 200.0, 10.0], dtype=torch.float64)}
    )
    freqs = (torch.rand(300, 2, dtype=torch.float64) - 0.5) * 0.6  # arbitrary (kx, ky) in 1/Å
    ours = compute_ctf(params, freqs)
    assert ours.shape == (n, 300)
    for i in range(n):
        lam = electron_wavelength_angstrom(params.voltage_kv[i])
        ref = _cryodrgn_compute_ctf(
            freqs,
            params.defocus_u_angstrom[i],
            params.defocus_v_angstrom[i],
            params.defocus_angle_deg[i],
            params.voltage_kv[i],
            params.cs_mm[i],
            params.amplitude_contrast[i],
            params.phase_shift_deg[i],
            params.b_factor[i],
            lam,
        )
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=0)


def test_astigmatism_direction_on_image_grid():
    """Defocus angle 0: df_u along +x (columns), df_v along +y (rows); angle 90 swaps them."""
    d, apix = 64, 2.0
    u, v = 25000.0, 9000.0
    astig = CTFParams.constant(2, defocus_u_angstrom=u, defocus_v_angstrom=v)
    astig = CTFParams(
        **{**astig.__dict__, "defocus_angle_deg": torch.tensor([0.0, 90.0], dtype=torch.float64)}
    )
    iso_u = ctf_images(CTFParams.constant(1, defocus_u_angstrom=u), d, apix)[0]
    iso_v = ctf_images(CTFParams.constant(1, defocus_u_angstrom=v), d, apix)[0]
    images = ctf_images(astig, d, apix)
    c = d // 2
    torch.testing.assert_close(images[0, c, :], iso_u[c, :])  # row through DC: the kx axis
    torch.testing.assert_close(images[0, :, c], iso_v[:, c])  # column through DC: the ky axis
    torch.testing.assert_close(images[1, c, :], iso_v[c, :])
    torch.testing.assert_close(images[1, :, c], iso_u[:, c])
    assert not torch.allclose(iso_u[c, :], iso_v[c, :])


def test_defocus_angle_rotates_pattern():
    """CTF(angle=a)(k) == CTF(angle=0)(R(-a) k): the angle rotates the pattern counter-clockwise."""
    a = 37.0
    base = CTFParams.constant(1, defocus_u_angstrom=21000.0, defocus_v_angstrom=12000.0, cs_mm=2.0)
    rotated = CTFParams(**{**base.__dict__, "defocus_angle_deg": torch.tensor([a], dtype=torch.float64)})
    freqs = (torch.rand(500, 2, dtype=torch.float64) - 0.5) * 0.5
    r = math.radians(-a)
    rot = torch.tensor([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]], dtype=torch.float64)
    torch.testing.assert_close(compute_ctf(rotated, freqs), compute_ctf(base, freqs @ rot.T))
    # And along the direction a itself the defocus is df_u exactly.
    direction = torch.tensor([math.cos(math.radians(a)), math.sin(math.radians(a))], dtype=torch.float64)
    line = torch.linspace(0, 0.3, 50, dtype=torch.float64)[:, None] * direction
    iso = CTFParams.constant(1, defocus_u_angstrom=21000.0, cs_mm=2.0)
    torch.testing.assert_close(compute_ctf(rotated, line), compute_ctf(iso, line))


def test_batch_entries_are_independent():
    params = _params(4, seed=3)
    freqs = frequency_grid_per_angstrom(32, 1.5)
    batch = compute_ctf(params, freqs)
    for i in range(4):
        torch.testing.assert_close(batch[i], compute_ctf(params[i], freqs)[0])
    assert not torch.allclose(batch[0], batch[1])


def test_analytic_limits_and_b_factor():
    w = 0.07
    p = CTFParams.constant(3, defocus_u_angstrom=15000.0, amplitude_contrast=w)
    zero = torch.zeros(1, 2, dtype=torch.float64)
    torch.testing.assert_close(compute_ctf(p, zero)[:, 0], torch.full((3,), -w, dtype=torch.float64))
    b = 120.0
    pb = CTFParams.constant(3, defocus_u_angstrom=15000.0, amplitude_contrast=w, b_factor=b)
    freqs = frequency_grid_per_angstrom(16, 2.0)
    k2 = (freqs**2).sum(-1)
    torch.testing.assert_close(compute_ctf(pb, freqs), compute_ctf(p, freqs) * torch.exp(-b * k2 / 4))


def test_params_container_and_gradients():
    p = _params(5)
    assert len(p) == 5
    assert len(p[1:3]) == 2 and len(p[[0, 4]]) == 2 and len(p[2]) == 1 and len(p[np.int64(2)]) == 1
    assert len(p[torch.tensor(-1)]) == 1 and len(p[np.array([True, False] * 2 + [True])]) == 3
    assert float(p[4].defocus_u_angstrom[0]) == float(p.defocus_u_angstrom[4])
    assert torch.equal(p.b_factor, torch.zeros(5, dtype=torch.float64))
    assert p.to(dtype=torch.float32).cs_mm.dtype == torch.float32
    assert len(CTFParams.cat([p, p[:2]])) == 7
    with pytest.raises(ValueError, match="voltage_kv"):
        CTFParams(**{**p.__dict__, "voltage_kv": torch.ones(3)})
    defocus = p.defocus_u_angstrom.clone().requires_grad_(True)
    q = CTFParams(**{**p.__dict__, "defocus_u_angstrom": defocus})
    compute_ctf(q, frequency_grid_per_angstrom(8, 2.0)).sum().backward()
    assert defocus.grad is not None and torch.isfinite(defocus.grad).all()
