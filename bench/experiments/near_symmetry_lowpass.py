"""Can a run find its map's near-symmetry before the map is sharp? The detector on blurred true maps.

Usage::

    python bench/experiments/near_symmetry_lowpass.py DATA_DIR [DATA_DIR ...]

For each suite set folder (``ground_truth.mrc`` inside, as ``bench/suite.py`` simulates it):
``analysis.symmetry.find_near_symmetry`` on the true map as it is and low-passed by a Gaussian
``exp(-2 (k r)^2)`` for ``r`` = 20 and 40 Å (``k`` in 1/Å: at ``k = 1/r`` the amplitude is
down to 14 %), as a map early in a run would look. Prints the order found (or none), the
correlation of the map with its rotated copy, and the time. Asks whether the engine could tell
moves across a molecule's near-symmetry from rescues at run time (see docs/decisions.md#rescue-halfmaps).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import torch

from cryospin_lab.analysis.symmetry import find_near_symmetry

BLURS_ANGSTROM = (None, 20.0, 40.0)


def low_pass(volume: np.ndarray, pixel_size: float, blur_angstrom: float) -> np.ndarray:
    """The map with its Fourier amplitudes scaled by ``exp(-2 (k blur)^2)``."""
    k = np.fft.fftfreq(volume.shape[0], d=pixel_size)
    k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    return np.real(np.fft.ifftn(np.fft.fftn(volume) * np.exp(-2 * k2 * blur_angstrom**2)))


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    print(f"# {' '.join(sys.argv)}")
    torch.set_num_threads(1)
    for folder in map(Path, sys.argv[1:]):
        with mrcfile.open(folder / "ground_truth.mrc") as mrc:
            volume, pixel_size = mrc.data.astype(np.float32), float(mrc.voxel_size.x)
        for blur in BLURS_ANGSTROM:
            blurred = volume if blur is None else low_pass(volume, pixel_size, blur).astype(np.float32)
            start = time.perf_counter()
            found = find_near_symmetry(torch.from_numpy(blurred))
            seconds = time.perf_counter() - start
            what = "none" if found is None else f"{found.order}-fold, correlation {found.correlation:.3f}"
            label = "as simulated" if blur is None else f"blurred {blur:.0f} Å"
            print(f"{folder.name.split('_')[0]:9s} {label:13s} {what:32s} {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
