"""Checkpoints: atomic writes, weights_only loading, RNG round trip, config dataclass round trip."""

from __future__ import annotations

import enum
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch

from cryospin_lab.io import checkpoint
from cryospin_lab.io.checkpoint import (
    checkpoint_path,
    config_from_dict,
    config_to_dict,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


class LossKind(enum.Enum):
    L2 = "l2"
    L1_MODULUS = "l1_modulus"


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True)
class RunConfig:
    n_heads: int = 7
    loss: LossKind = LossKind.L2
    encoder: OptimizerConfig = OptimizerConfig()
    decoder: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=5e-3))
    switch_epoch: int | None = None
    frequency_schedule: tuple[int, ...] = ()
    preset: Literal["paper", "cpu"] = "cpu"
    out_dir: Path = Path("out")


class NotAllowed:
    """An arbitrary Python object: weights_only loading must refuse it."""


def small_training_state() -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05, betas=(0.9, 0.9))
    model(torch.randn(5, 3)).square().sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def test_save_load_round_trip_of_a_training_state(tmp_path):
    state = small_training_state()
    payload = {
        **state,
        "epoch": 3,
        "phase": "direct",
        "pose_table": torch.randn(10, 3, 3, dtype=torch.float64),
        "config": config_to_dict(RunConfig(switch_epoch=4)),
        "rng": rng_state(),
    }
    path = save_checkpoint(tmp_path / "checkpoints" / "epoch_0003.pt", payload)
    assert path == tmp_path / "checkpoints" / "epoch_0003.pt"
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["phase"] == "direct"
    assert torch.equal(loaded["pose_table"], payload["pose_table"])
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.9)
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert config_from_dict(RunConfig, loaded["config"]) == RunConfig(switch_epoch=4)
    assert sorted(p.name for p in path.parent.iterdir()) == ["epoch_0003.pt"]  # no temp file left


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "epoch_0001.pt"
    save_checkpoint(path, {"version": 1, "weights": torch.ones(1000)})
    real_save = torch.save

    def crash_mid_write(obj, file, *args, **kwargs):
        real_save({"version": 2, "weights": torch.zeros(1000)}, file)  # some bytes reach the temp file
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"version": 2, "weights": torch.zeros(1000)})
    monkeypatch.undo()
    loaded = load_checkpoint(path)
    assert loaded["version"] == 1 and torch.equal(loaded["weights"], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_0001.pt"]  # the temp file was removed


def test_load_refuses_arbitrary_python_objects_with_the_file_name(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.ones(2), "extra": NotAllowed()}, path)  # written without our checks
    with pytest.raises(ValueError, match=r"evil\.pt: refused to load: .*NotAllowed"):
        load_checkpoint(path)


def test_save_refuses_what_weights_only_could_not_load_back(tmp_path):
    with pytest.raises(ValueError, match=r"payload\['stats'\]\['mean'\] is a numpy.ndarray.*torch.as_tensor"):
        save_checkpoint(tmp_path / "a.pt", {"stats": {"mean": np.zeros(3)}})
    with pytest.raises(ValueError, match=r"payload\['loss'\] is a numpy.float64"):
        save_checkpoint(tmp_path / "a.pt", {"loss": np.float64(1.0)})
    with pytest.raises(ValueError, match=r"payload\['kind'\] is a .*LossKind"):
        save_checkpoint(tmp_path / "a.pt", {"kind": LossKind.L2})
    assert list(tmp_path.iterdir()) == []


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.pt"):
        load_checkpoint(tmp_path / "gone.pt")
    bad = tmp_path / "epoch_0002.pt"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match=r"epoch_0002\.pt: not a readable checkpoint"):
        load_checkpoint(bad)


def draw_everything() -> list[float]:
    return [
        random.random(),
        random.gauss(0, 1),
        *np.random.standard_normal(3).tolist(),
        *np.random.randint(0, 1000, 2).tolist(),
        *torch.rand(3).tolist(),
        *torch.randn(3).tolist(),
    ]


def test_rng_state_round_trip_reproduces_the_same_random_numbers(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draw_everything()  # leaves a cached Gaussian in random and numpy (odd counts)
    saved = rng_state()
    save_checkpoint(tmp_path / "rng.pt", {"rng": saved})
    expected = draw_everything()
    assert draw_everything() != expected  # the generators moved on
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert draw_everything() == expected
    with pytest.raises(ValueError, match=r"missing \['numpy'\]"):
        set_rng_state({"python": saved["python"], "torch": saved["torch"]})


def test_config_round_trip_through_plain_dicts():
    config = RunConfig(
        n_heads=3,
        loss=LossKind.L1_MODULUS,
        encoder=OptimizerConfig(lr=2e-4, betas=(0.8, 0.99)),
        switch_epoch=5,
        frequency_schedule=(8, 16, 32),
        preset="paper",
        out_dir=Path("/tmp/run"),
    )
    plain = config_to_dict(config)
    assert plain["loss"] == "l1_modulus" and plain["encoder"] == {"lr": 2e-4, "betas": [0.8, 0.99]}
    assert plain["out_dir"] == "/tmp/run" and plain["frequency_schedule"] == [8, 16, 32]
    assert json.loads(json.dumps(plain)) == plain  # JSON-ready as well as weights_only-ready
    checkpoint._check_loadable(plain, "config")
    rebuilt = config_from_dict(RunConfig, plain)
    assert rebuilt == config and isinstance(rebuilt.encoder.betas, tuple)
    assert config_from_dict(RunConfig, config_to_dict(RunConfig())) == RunConfig()

    assert config_from_dict(RunConfig, {"n_heads": 5}) == RunConfig(n_heads=5)  # missing: defaults
    with pytest.raises(ValueError, match=r"RunConfig: unknown field\(s\) \['n_head'\]"):
        config_from_dict(RunConfig, {"n_head": 5})
    with pytest.raises(ValueError, match="RunConfig.loss.*'l3'"):
        config_from_dict(RunConfig, {"loss": "l3"})
    with pytest.raises(ValueError, match=r"RunConfig.encoder: .*unknown field\(s\) \['momentum'\]|momentum"):
        config_from_dict(RunConfig, {"encoder": {"momentum": 0.9}})
    with pytest.raises(ValueError, match="RunConfig.n_heads: expected int"):
        config_from_dict(RunConfig, {"n_heads": "7"})


def test_latest_checkpoint_picks_the_highest_epoch_and_keeps_old_ones(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for epoch in (1, 10, 2):
        save_checkpoint(checkpoint_path(tmp_path, epoch), {"epoch": epoch})
    (tmp_path / ".epoch_0011.pt.abc.tmp").write_bytes(b"partial")
    (tmp_path / "epoch_final.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    assert checkpoint_path(tmp_path, 3).name == "epoch_0003.pt"
    latest = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "epoch_0010.pt" and load_checkpoint(latest)["epoch"] == 10
    assert len(list(tmp_path.glob("epoch_00*.pt"))) == 3
