"""Atomic file writing: every output of the project goes through :func:`atomic_path`."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path"]


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """A temporary path beside ``path``; renamed over it only if the block succeeds.

    The temporary file (``.NAME.XXXX<suffix>`` in the same folder, so the rename
    is atomic) gets the permissions a plain ``open()`` would give (mkstemp makes
    it 0600); on any exception, Ctrl-C included, it is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
