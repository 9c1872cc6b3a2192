"""Checkpoints: atomic ``torch.save``, safe ``torch.load(weights_only=True)``, RNG state and config dicts.

* ``save_checkpoint(path, payload)`` first checks that ``payload`` holds only what
  ``weights_only=True`` can load back (dicts, lists, tuples, sets, str, bytes,
  numbers, bools, None, tensors, ``torch.Size``/``dtype``/``device``) and names the
  offending entry otherwise (a numpy array or numpy scalar is the usual culprit),
  then writes a temporary file in the same directory, flushes and fsyncs it and
  renames it over ``path`` with ``os.replace`` (atomic on POSIX and Windows): an
  interrupted save leaves the previous checkpoint intact.
* ``load_checkpoint`` never unpickles arbitrary objects: ``weights_only=True``
  only; a file holding anything else is refused with a ValueError naming it and
  the refused object. Only ``torch.save``'s zip format is read (legacy
  pre-1.6 files and garbage are reported as "not a readable checkpoint").
* ``rng_state()`` / ``set_rng_state()``: Python ``random``, numpy's global
  generator, torch's CPU generator and (when CUDA is available) every CUDA
  device's generator, as tensors, ints, floats and strings. Generators a trainer
  owns (``torch.Generator.get_state()`` is a tensor; numpy ``Generator``'s
  ``bit_generator.state`` is a dict of str/int) can be stored as they are.
* ``config_to_dict`` / ``config_from_dict``: frozen config dataclasses to plain
  dicts (nested dataclasses as dicts, tuples as lists, enums as their value,
  paths as strings) and back, guided by the field annotations. Unknown keys are
  an error (a setting silently ignored would change the run); missing keys take
  the dataclass default.
* Files are named ``epoch_XXXX.pt`` (``checkpoint_path``); old ones are kept;
  ``latest_checkpoint(directory)`` returns the highest epoch.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import os
import pickle
import random
import re
import shutil
import types
import typing
import warnings
import zipfile
from pathlib import Path, PurePath
from typing import Any, TypeVar

import numpy as np
import torch

from cryospin_lab.io.atomic import atomic_path

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_path",
    "latest_checkpoint",
    "rng_state",
    "set_rng_state",
    "config_to_dict",
    "config_from_dict",
]

T = TypeVar("T")

_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")
# Exact types torch.load(weights_only=True) accepts (subclasses such as IntEnum or
# namedtuples are pickled by class and refused, hence the exact-type check).
_PLAIN_TYPES = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)


# ----------------------------------------------------------------------------- save / load


def _check_loadable(obj: Any, where: str) -> None:
    """Raise ValueError naming the first entry of ``obj`` that weights_only loading would refuse."""
    kind = type(obj)
    if kind in _PLAIN_TYPES or isinstance(obj, torch.Tensor) or kind is torch.Size:
        return
    if kind in (dict, collections.OrderedDict):
        for key, value in obj.items():
            _check_loadable(key, f"{where} key {key!r}")
            _check_loadable(value, f"{where}[{key!r}]")
        return
    if kind in (list, tuple, set):
        for i, value in enumerate(obj):
            _check_loadable(value, f"{where}[{i}]")
        return
    hint = (
        " (convert numpy values with torch.as_tensor(...) or .item())" if kind.__module__ == "numpy" else ""
    )
    raise ValueError(
        f"{where} is a {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only=True) "
        f"cannot load back{hint}"
    )


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` to ``path`` atomically (temp file + fsync + rename); return the path."""
    path = Path(path)
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: a checkpoint payload must be a dict, got {type(payload).__name__}")
    _check_loadable(payload, f"{path}: payload")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        torch.save(payload, file)
        file.flush()
        os.fsync(file.fileno())
    _fsync_directory(path.parent)
    return path


def tensor_bytes(obj: Any) -> int:
    """Bytes held by the tensors in a nested payload (dicts, lists, tuples): about its size on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def check_output_dir(directory: str | os.PathLike, need_bytes: int, what: str = "checkpoints") -> Path:
    """Create ``directory`` and prove it can take ``need_bytes`` of ``what``; return it.

    Raises OSError naming the folder when it cannot be created, a probe file cannot be written
    there (read-only, permissions), or the file system has less free space than ``need_bytes``:
    a clear error before a run starts, not when its first checkpoint fails hours later.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}"
        with open(probe, "wb") as file:
            file.write(b"\0" * 4096)
            file.flush()
            os.fsync(file.fileno())
        probe.unlink()
    except OSError as err:
        raise OSError(f"{directory}: cannot write {what} there ({err.strerror or err})") from err
    free = shutil.disk_usage(directory).free
    if free < need_bytes:
        raise OSError(
            f"{directory}: {free / 1e6:.0f} MB free, but the {what} of this run need about "
            f"{need_bytes / 1e6:.0f} MB; free some space or choose another output folder"
        )
    return directory


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no arbitrary pickles)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives; anything else is not ours
        raise ValueError(f"{path}: not a readable checkpoint (not a torch.save zip archive)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: refused to load: it holds {_refused_object(err)}, which torch.load(weights_only=True) "
            "does not allow; only checkpoints written by cryospin_lab are loaded, never arbitrary pickles"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: checkpoint holds a {type(payload).__name__}, expected a dict")
    return payload


def _refused_object(err: Exception) -> str:
    """What torch's weights-only unpickler refused, from its (long) message."""
    text = str(err)
    match = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if match:
        return f"the Python object {match.group(1)}"
    match = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(\n\n|$)", text, flags=re.S)
    return f"content ({match.group(1).strip()})" if match else "content"


def checkpoint_path(directory: str | os.PathLike, epoch: int) -> Path:
    """``directory / epoch_XXXX.pt`` for ``epoch`` (zero-padded to 4 digits)."""
    if epoch < 0:
        raise ValueError(f"checkpoint epoch must be >= 0, got {epoch}")
    return Path(directory) / f"epoch_{epoch:04d}.pt"


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The ``epoch_XXXX.pt`` in ``directory`` with the highest epoch, None if there is none."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [
        (int(match.group(1)), entry)
        for entry in directory.iterdir()
        if (match := _EPOCH_FILE.match(entry.name)) and entry.is_file()
    ]
    return max(found)[1] if found else None


# ----------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """States of Python ``random``, numpy's global RNG, torch CPU and CUDA generators (weights_only-safe)."""
    version, mt_state, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": {
            "version": int(version),
            "state": torch.tensor(mt_state, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generators saved by :func:`rng_state`."""
    missing = [key for key in ("python", "numpy", "torch") if key not in state]
    if missing:
        raise ValueError(f"RNG state is missing {missing} (keys: {sorted(state)})")
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["bit_generator"],
            npy["keys"].numpy().astype(np.uint32),
            int(npy["pos"]),
            int(npy["has_gauss"]),
            float(npy["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None:
        if torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            warnings.warn(
                f"RNG state holds {len(cuda)} CUDA generator(s) but this machine has "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}; CUDA RNG not restored",
                stacklevel=2,
            )


# ----------------------------------------------------------------------------- configs


def config_to_dict(config: Any) -> dict:
    """A dataclass instance as a plain dict (nested dataclasses, lists for tuples, enum values, str paths)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise ValueError(f"config_to_dict expects a dataclass instance, got {type(config).__name__}")
    return _plain(config)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or type(value) in (str, int, float, bool):
        return value
    raise ValueError(f"config value {value!r} of type {type(value).__name__} has no plain-dict form")


def config_from_dict(cls: type[T], data: dict) -> T:
    """Rebuild ``cls`` (a dataclass) from :func:`config_to_dict`'s output, guided by field annotations."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise ValueError(f"config_from_dict expects a dataclass type, got {cls!r}")
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a dict, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown} (known: {sorted(fields)})")
    values = {name: _typed(hints[name], value, f"{cls.__name__}.{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except TypeError as err:
        raise ValueError(f"{cls.__name__}: cannot build from {sorted(data)} ({err})") from err


def _typed(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _typed(arg, value, where)
            except (ValueError, TypeError) as err:
                errors.append(str(err))
        raise ValueError(f"{where}: {value!r} matches none of {args} ({'; '.join(errors)})")
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{where}: {value!r} is not one of {args}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list for {hint}, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if not args:
            return tuple(value)
        if len(args) != len(value):
            raise ValueError(f"{where}: expected {len(args)} items for {hint}, got {len(value)}")
        return tuple(_typed(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is list:
        return [_typed(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        return {k: _typed(args[1], v, f"{where}[{k!r}]") for k, v in value.items()} if args else dict(value)
    if isinstance(hint, type):
        if dataclasses.is_dataclass(hint):
            return config_from_dict(hint, value)
        if issubclass(hint, enum.Enum):
            try:
                return hint(value)
            except ValueError:
                raise ValueError(f"{where}: {value!r} is not a {hint.__name__} value") from None
        if issubclass(hint, PurePath):
            return hint(value)
        if hint is float and type(value) is int:
            return float(value)
        if hint in (str, int, float, bool) and type(value) is not hint:
            raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value
