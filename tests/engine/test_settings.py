"""One path for settings: every run setting reaches the command line, ``Reconstruction`` and the resume
check from its one declaration (``engine/config.py``), with the same check everywhere."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from cryospin_lab.app import cli
from cryospin_lab.app.headless import settings_from_args
from cryospin_lab.engine.config import SETTINGS, TrainingConfig, apply_settings, check_resume
from cryospin_lab.model.encoder_config import EncoderConfig

# A value other than the default for every setting, as typed on a command line.
OTHER = {
    "n_epochs": "7",
    "switch": "3",
    "batch_size": "16",
    "encoder_lr": "0.0002",
    "decoder_lr": "0.004",
    "decoder_lr_direct": "0.001",
    "pose_lr": "0.02",
    "pose_betas": "0.8,0.95",
    "shift_lr_angstrom": "0.25",
    "n_pose_steps": "3",
    "loss": "l1",
    "contrast": "1",
    "radius_start_fraction": "0.5",
    "radius_ramp_epochs": "4",
    "auto_min_epochs": "2",
    "auto_gap_rise": "1.3",
    "auto_stable_deg": "5",
    "auto_loss_plateau": "0.001",
    "auto_max_epochs": "20",
    "stall_epochs": "3",
    "stall_tolerance": "0.001",
    "stuck_check_epoch": "3",
    "stuck_min_gain": "0.05",
    "stuck_min_gain_shifted": "0.02",
    "stuck_restarts": "1",
    "rescue_every": "2",
    "rescue_nside": "2",
    "rescue_shift_step_px": "1.5",
    "rescue_idle_every": "3",
    "rescue_extra_epochs": "4",
    "rescue_extra_epochs_stuck": "12",
    "rescue_halfmap_steps": "3",
    "rebuild_map": None,  # a flag: --no-rebuild-map
    "volume_init_mantissa": "0.2",
    "n_tracked": "2",
    "volume_interval_s": "1.5",
    "seed": "4",
    "device": "cpu",
    "threads": "1",
    "checkpoint_every": "2",
    "nan_guard": "3",
    "gold_standard": None,  # a flag
    "n_heads": "3",
    "preset": "paper",
    "estimate_shifts": None,
    "max_shift_angstrom": "6.5",
    "rotation_features": "pooled",
}


def field_value(config: TrainingConfig, path: tuple[str, ...]):
    value = config
    for part in path:
        value = getattr(value, part)
    return value


def test_every_config_field_is_a_setting():
    """A field added to TrainingConfig without ``setting()`` would reach no interface: fail here."""
    fields = {f.name for f in dataclasses.fields(TrainingConfig)} - {"encoder"}
    assert fields == {s.name for s in SETTINGS.values() if s.path[0] != "encoder"}
    assert set(OTHER) == set(SETTINGS)


def test_defaults_are_the_dataclass_defaults():
    config = TrainingConfig()
    for item in SETTINGS.values():
        assert field_value(config, item.path) == item.default, item.name


def test_every_setting_is_a_command_line_option_that_reaches_the_config(tmp_path):
    argv = ["reconstruct", "particles.star", "--out", str(tmp_path)]
    for name, text in OTHER.items():
        argv += [SETTINGS[name].flag] + ([] if text is None else [text])
    args = cli.build_parser().parse_args(argv)
    given = settings_from_args(args).run
    assert set(given) == set(SETTINGS)
    config = apply_settings(TrainingConfig(), given, box_size=32, pixel_size_angstrom=2.0)
    for name, text in OTHER.items():
        value = field_value(config, SETTINGS[name].path)
        expected = (not SETTINGS[name].default) if text is None else SETTINGS[name].parse(text)
        assert value == expected and value != SETTINGS[name].default, name


def test_help_states_each_default_from_the_setting():
    text = cli.build_parser()._subparsers._group_actions[0].choices["reconstruct"].format_help()
    flat = " ".join(text.split())
    for item in SETTINGS.values():
        assert item.flag in flat
        if item.type is not bool:
            assert f"(default {item.default_text()})" in flat, item.name


def test_reconstruction_keywords_and_cli_flags_share_the_checks(tmp_path):
    """The same bad value is refused by both, with the setting's phrase."""
    parser = cli.build_parser()
    for name, bad in (("n_heads", 0), ("pose_lr", -1.0), ("loss", "l3"), ("threads", 100000)):
        item = SETTINGS[name]
        phrase = (item.input_check or item.check).what
        with pytest.raises(ValueError, match=rf"must be {phrase}, got '{bad}'"):
            item.parse(str(bad))
        with pytest.raises(SystemExit):
            parser.parse_args(["reconstruct", "p.star", "--out", str(tmp_path), item.flag, str(bad)])
        with pytest.raises(ValueError, match=rf"Reconstruction: {name} must be {phrase}, got"):
            apply_settings(TrainingConfig(), {name: bad}, prefix="Reconstruction: ")


def test_unknown_setting_is_named():
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['n_head'\]"):
        apply_settings(TrainingConfig(), {"n_head": 3})


def test_shift_bound_defaults_to_a_tenth_of_the_box():
    config = apply_settings(TrainingConfig(), {"estimate_shifts": True}, box_size=64, pixel_size_angstrom=3.0)
    assert config.encoder.estimate_shifts and config.encoder.max_shift_angstrom == pytest.approx(19.2)
    given = apply_settings(
        TrainingConfig(),
        {"estimate_shifts": True, "max_shift_angstrom": 5.0},
        box_size=64,
        pixel_size_angstrom=3,
    )
    assert given.encoder.max_shift_angstrom == 5.0


def test_estimating_shifts_pools_the_rotation_features_unless_told():
    def features(values, config=None):
        config = apply_settings(config or TrainingConfig(), values, box_size=64, pixel_size_angstrom=3.0)
        return config.encoder.rotation_features

    assert features({}) == "grid"
    assert features({"estimate_shifts": True}) == "pooled"
    assert features({"estimate_shifts": True, "rotation_features": "grid"}) == "grid"
    assert features({"rotation_features": "pooled"}) == "pooled"
    # a config built by hand (or a checkpoint's, on resume) keeps what it says
    own = TrainingConfig(encoder=EncoderConfig(estimate_shifts=True, max_shift_angstrom=9.0))
    assert features({"n_heads": 3}, own) == "grid"


def test_resume_keeps_the_run_and_takes_the_machine():
    stored = TrainingConfig(encoder=EncoderConfig(n_heads=3), seed=2, device="cpu", threads=1, n_epochs=10)
    same = check_resume(stored, {"n_heads": 3, "n_epochs": 20}, "run.pt")
    assert same.n_epochs == 20 and same.encoder.n_heads == 3 and same.seed == 2
    # machine settings: what is given now, else the default (the checkpoint may come from another machine)
    assert same.device == "auto" and same.threads == 0
    assert check_resume(stored, {"device": "cpu"}, "run.pt").device == "cpu"
    with pytest.raises(ValueError, match=r"run\.pt: --heads 5 differs from the checkpoint's 3"):
        check_resume(stored, {"n_heads": 5}, "run.pt")
    with pytest.raises(ValueError, match=r"--seed 0 differs"):
        check_resume(stored, {"seed": 0}, "run.pt")


def test_reading_the_settings_needs_no_torch():
    """The command line builds its options (and answers --help) without loading torch."""
    code = "import sys; from cryospin_lab.app import cli; cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_workbench_form_offers_every_setting():
    """Each setting has a field holding its default; set to another value, it reaches the run's config."""
    from cryospin_lab.widgets.settings_form import SettingsForm

    form = SettingsForm()
    assert set(form.fields) | {"switch"} == set(SETTINGS)

    def config_of(values):
        run = {k: v for k, v in values.items() if k in SETTINGS}
        return apply_settings(TrainingConfig(), run, box_size=32, pixel_size_angstrom=2.0)

    assert config_of(form.values()) == config_of({})
    for name, text in OTHER.items():
        if name == "switch":
            form.switch_rule.value, form.switch_epoch.value = "at epoch", int(text)
        elif text is None:
            form.fields[name].value = not SETTINGS[name].default
        else:
            value = SETTINGS[name].parse(text)
            form.fields[name].value = text if SETTINGS[name].type is tuple else value
    config = config_of(form.values())
    for name, text in OTHER.items():
        expected = (not SETTINGS[name].default) if text is None else SETTINGS[name].parse(text)
        assert field_value(config, SETTINGS[name].path) == expected, name
