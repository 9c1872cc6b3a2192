from pathlib import Path

import pytest
import torch

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
