"""The ``cryospin-lab`` command line.

One pair of module-level functions per command (cryoDRGN's contract):
``add_<command>_args(parser)`` declares the options, ``run_<command>(args)``
does the work and returns the exit status.

* ``cryospin-lab simulate MODEL --out DIR [--box 64] [--apix 3.0|auto] [--n 10000]
  [--snr 0.1] [--max-shift-angstrom 0] [--no-ctf] [--seed 0]``: a particle
  stack from a PDB/mmCIF model (optionally ``.gz``) or an MRC map (its header
  voxel size is used, or ``--map-apix``; it is Fourier-cropped / trilinearly
  resampled to ``--apix`` and ``--box``, see ``simulate.simulator.load_source_volume``).
* ``cryospin-lab reconstruct PARTICLES.star --out DIR [--box D]
  [--ground-truth MAP.mrc] [--resume] [--stack-dir DIR] [RUN SETTINGS]``: a
  cryoSPIN reconstruction; the logic and the files it writes are in
  :mod:`cryospin_lab.app.headless`. Every run setting is an option
  (:func:`add_setting_args`: ``--heads N``, ``--switch auto|EPOCH|never``,
  ``--epochs N``, ...), with the help, default and check of its declaration
  in :mod:`cryospin_lab.engine.config`.
* ``cryospin-lab demo [--out runs/demo] [--n N] [--epochs N] [--device D]
  [--simulate-only]``: the default HSP90 set (``simulate.datasets.hsp90``, simulated
  once and cached), reconstructed into ``--out`` against its ground truth;
  with ``--simulate-only`` the set is only linked into ``--out``.
* ``cryospin-lab compact RUN_DIR``: each epoch's maps into ``maps.npz``, all but
  the last checkpoint deleted (``app.recorded.compact_run``): a tenth of the size, still replayable.

Bad input ends with exit status 2 (bad option) or 1 (bad file or value) and a
single ``cryospin-lab: error: ...`` line on stderr, no traceback. Ctrl-C ends
with status 130 and one line (``reconstruct`` first saves its state).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

from cryospin_lab._version import __version__

__all__ = [
    "main",
    "add_simulate_args",
    "run_simulate",
    "add_reconstruct_args",
    "run_reconstruct",
    "add_demo_args",
    "run_demo",
]

PROG = "cryospin-lab"


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse parser whose usage errors are one line (no usage block), exit status 2."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def _number_type(kind: type, *, allow_zero: bool, what: str):
    """An argparse ``type=``: parse ``kind`` (int or float), finite, > 0 (or >= 0)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value >= 0 if allow_zero else value > 0)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


_positive_int = _number_type(int, allow_zero=False, what="a positive integer")
_non_negative_int = _number_type(int, allow_zero=True, what="a non-negative integer")
_positive_float = _number_type(float, allow_zero=False, what="a positive number")
_non_negative_float = _number_type(float, allow_zero=True, what="a number >= 0")


def _int_in_range(low: int, high: int):
    """An argparse ``type=``: an integer from ``low`` to ``high`` (bounds that keep sizes allocatable)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {text!r}")
        return value

    return parse


# Simulation sizes: a D^3 map is computed on a (2D)^3 grid (atoms.density_from_model), so D = 1024
# already needs tens of GB; 10 million particles is more than any EMPIAR set.
_simulate_box = _int_in_range(4, 1024)
_n_particles = _int_in_range(1, 10_000_000)


def _device(text: str) -> str:
    import torch  # only when --device is given

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"must be a torch device such as cpu or cuda, got {text!r}"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} asked for, but torch.cuda.is_available() is False")
    return text


def _check_out_dir(out: Path) -> None:
    """--out must be a folder (or not exist yet): found before any work is done."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")


def _apix(text: str) -> float | str:
    return "auto" if text == "auto" else _positive_float(text)


def _snr(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number (or inf for no noise), got {text!r}")
    return value


def add_simulate_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``cryospin-lab simulate``."""
    parser.add_argument("model", metavar="MODEL", help="PDB/mmCIF atomic model (optionally .gz) or MRC map")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    parser.add_argument(
        "--box", type=_simulate_box, default=64, help="image size D in pixels, 4 to 1024 (default 64)"
    )
    parser.add_argument(
        "--apix",
        type=_apix,
        default=3.0,
        help="pixel size in Å, or auto: the molecule's diameter spans two thirds of the box (default 3.0)",
    )
    parser.add_argument("--n", type=_n_particles, default=10000, help="number of particles (default 10000)")
    parser.add_argument(
        "--snr",
        type=_snr,
        default=0.1,
        help="mean var(clean image) / noise variance over the box (default 0.1)",
    )
    parser.add_argument(
        "--max-shift-angstrom",
        type=_non_negative_float,
        default=0.0,
        help="shifts uniform in a disc of this radius in Å (default 0: centred)",
    )
    parser.add_argument(
        "--outliers", type=_non_negative_float, nargs=2, metavar=("FRACTION", "MAX_SHIFT_ANGSTROM"),
        default=(0.0, 0.0), help="this share of the images shifted within a disc of this radius instead",
    )  # fmt: skip
    parser.add_argument("--no-ctf", action="store_true", help="no CTF (images are plain projections)")
    parser.add_argument(
        "--defocus-um",
        type=_positive_float,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="defocus uniform in [MIN, MAX] µm (default: the real EMPIAR-10028 distribution)",
    )
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--map-apix",
        type=_positive_float,
        default=None,
        help="voxel size of an MRC map whose header has none",
    )
    parser.add_argument(
        "--device", type=_device, default=None, help="torch device for projecting (default cpu)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_simulate(args: argparse.Namespace) -> int:
    """Simulate a stack and print where it went."""
    model = Path(args.model)
    if not model.is_file():
        raise FileNotFoundError(f"MODEL file not found: {model}")
    _check_out_dir(Path(args.out))
    if args.defocus_um is not None and args.defocus_um[0] > args.defocus_um[1]:
        raise ValueError(
            f"--defocus-um MIN must be <= MAX, got {args.defocus_um[0]:g} {args.defocus_um[1]:g}"
        )
    if args.box < 4:
        raise ValueError(f"--box must be at least 4, got {args.box}")
    if args.outliers[0] > 1 or (args.outliers[0] > 0) != (args.outliers[1] > 0):
        raise ValueError(
            "--outliers FRACTION MAX_SHIFT_ANGSTROM needs a fraction in [0, 1] and, with a fraction, a "
            f"radius > 0; got {args.outliers[0]:g} {args.outliers[1]:g}"
        )
    try:
        result = _simulate(args, model)
    except ValueError as exc:
        if "voxel size" in str(exc) and args.map_apix is None:
            raise ValueError(f"{exc} (on the command line: --map-apix)") from exc
        raise
    print(result.describe(result.seconds))
    return 0


def _pixel_size(args: argparse.Namespace, model: Path) -> float:
    """``--apix``, or with ``--apix auto`` the size at which the molecule fills two thirds of the box."""
    if args.apix != "auto":
        return args.apix
    from cryospin_lab.simulate.simulator import fitting_pixel_size

    apix = fitting_pixel_size(model, args.box, map_pixel_size_angstrom=args.map_apix)
    print(f"--apix auto: {apix:g} Å/px (the molecule spans two thirds of the {args.box}-pixel box)")
    return apix


def _simulate(args: argparse.Namespace, model: Path):
    from cryospin_lab.simulate.simulator import simulate_particles

    return simulate_particles(
        model,
        out_dir=args.out,
        box_size=args.box,
        pixel_size_angstrom=_pixel_size(args, model),
        n_particles=args.n,
        snr=args.snr,
        max_shift_angstrom=args.max_shift_angstrom,
        outlier_fraction=args.outliers[0],
        outlier_max_shift_angstrom=args.outliers[1],
        ctf=not args.no_ctf,
        defocus="empiar10028" if args.defocus_um is None else tuple(args.defocus_um),
        seed=args.seed,
        progress=not args.no_progress,
        map_pixel_size_angstrom=args.map_apix,
        device=args.device,
    )


def add_setting_args(parser: argparse.ArgumentParser, names: list[str] | None = None) -> None:
    """One option per run setting (``engine.config.SETTINGS``, all or ``names``), its help, default
    and check taken from the setting. Not given, an option is None: the default in a new run, the
    checkpoint's value with ``--resume``."""
    from cryospin_lab.engine.config import SETTINGS

    group = parser.add_argument_group("run settings")
    for item in SETTINGS.values() if names is None else [SETTINGS[name] for name in names]:
        help_text = f"{item.help} (default {item.default_text()})".replace("%", "%%")
        if item.type is bool:  # the flag sets the value other than the default (--no-NAME: False)
            if item.default:
                help_text = f"{item.help} (default True; this sets False)".replace("%", "%%")
            kind = dict(action="store_const", const=not item.default)
            group.add_argument(item.flag, dest=item.name, **kind, help=help_text)
            continue
        choices = (item.input_check or item.check).choices
        metavar = {int: "N", float: "X", tuple: "A,B"}.get(item.type, "TEXT")
        if item.name == "switch":
            metavar = "auto|EPOCH|never"
        elif choices is not None and item.type is str:
            metavar = "|".join(choices)
        group.add_argument(
            item.flag, dest=item.name, type=_setting_type(item), default=None, metavar=metavar, help=help_text
        )


def _setting_type(item):
    """An argparse ``type=`` that parses and checks one setting (the error is argparse's one line)."""

    def parse(text: str):
        try:
            return item.parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = item.name
    return parse


def add_reconstruct_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``cryospin-lab reconstruct``: the files, then every run setting."""
    parser.add_argument("particles", metavar="PARTICLES", help="RELION STAR file (or cryoSPARC .cs / .mrcs)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    parser.add_argument(
        "--box", type=_positive_int, default=None, metavar="D", help="Fourier-downsample to D"
    )
    parser.add_argument(
        "--ground-truth", type=Path, default=None, metavar="MAP.mrc", help="true map: FSC and resolution"
    )
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoints")
    parser.add_argument(
        "--stack-dir", type=Path, default=None, metavar="DIR", help="look the .mrcs stacks up in DIR by name"
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="one rank of a torchrun job (also detected from WORLD_SIZE > 1): nccl on GPUs, gloo on CPU",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_setting_args(parser)


def run_reconstruct(args: argparse.Namespace) -> int:
    """Run a reconstruction (see :mod:`cryospin_lab.app.headless`)."""
    from cryospin_lab.app.headless import run_reconstruction, settings_from_args

    _check_out_dir(Path(args.out))
    return run_reconstruction(settings_from_args(args))


def add_demo_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``cryospin-lab demo``."""
    parser.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)"
    )
    parser.add_argument("--n", type=_n_particles, default=10000, help="number of particles (default 10000)")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="dataset cache (default $CRYOSPIN_LAB_CACHE or ~/.cache)"
    )
    parser.add_argument(
        "--simulate-only", action="store_true", help="only make the set and link it into --out"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_setting_args(parser, ["n_epochs", "device", "threads"])


def run_demo(args: argparse.Namespace) -> int:
    """The default HSP90 set (simulated once, then cached), reconstructed into ``--out``."""
    from cryospin_lab.simulate.datasets import hsp90

    _check_out_dir(Path(args.out))
    start = time.perf_counter()
    cached = hsp90(cache_dir=args.cache_dir, n_particles=args.n, progress=not args.no_progress)
    print(f"HSP90 (PDB 2CG9) demo set, cached in {cached.out_dir}")
    if args.simulate_only:
        return _link_demo_set(args, cached, start)
    print(cached.describe(time.perf_counter() - start))
    from cryospin_lab.app.headless import ReconstructSettings, run_reconstruction, run_settings

    settings = ReconstructSettings(
        particles_path=cached.star_path,
        out_dir=Path(args.out),
        run=run_settings(args),
        ground_truth_path=cached.ground_truth_path,
        progress=not args.no_progress,
        replace_checkpoints=True,  # a rerun of the demo starts over
    )
    return run_reconstruction(settings)


def _link_demo_set(args: argparse.Namespace, cached, start: float) -> int:
    from cryospin_lab.simulate.simulator import SimulationResult

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Star last, as in simulate: a folder with particles.star holds a complete set.
    for path in (cached.particles_path, cached.ground_truth_path, cached.summary_path, cached.star_path):
        _link_or_copy(path, out / path.name)
    result = SimulationResult.load(out)
    print(result.describe(time.perf_counter() - start))
    return 0


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (copy across file systems), replacing ``target`` atomically."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)


def add_compact_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run folder (reconstruct's or demo's --out)")


def run_compact(args: argparse.Namespace) -> int:
    from cryospin_lab.app.recorded import compact_run

    result = compact_run(args.run_dir)
    mb = f"{result.bytes_before / 2**20:.1f} MB -> {result.bytes_after / 2**20:.1f} MB"
    print(f"{result.maps_path}: epochs {result.epochs[0]}-{result.epochs[-1]}; {mb}, last checkpoint kept")
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one ``cryospin-lab: warning: ...`` line (no source file and line)."""
    text = " ".join(str(message).split())
    (file or sys.stderr).write(f"{PROG}: warning: {text}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(prog=PROG, description="Ab-initio cryo-EM reconstruction with cryoSPIN.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineErrorParser)
    for name, add_args, run, help_text in (
        (
            "simulate",
            add_simulate_args,
            run_simulate,
            "simulate a particle stack from an atomic model or map",
        ),
        ("reconstruct", add_reconstruct_args, run_reconstruct, "ab-initio reconstruction with cryoSPIN"),
        ("demo", add_demo_args, run_demo, "reconstruct the default HSP90 dataset (simulated once)"),
        ("compact", add_compact_args, run_compact, "keep a run's maps for replay, only its last checkpoint"),
    ):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        add_args(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cryospin-lab`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a one-line usage error
        return int(exc.code or 0)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.run(args)
    except (FileNotFoundError, ValueError, OSError) as exc:
        message = " ".join(str(exc).split())
        sys.stderr.write(f"{PROG}: error: {message}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
