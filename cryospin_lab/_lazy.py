"""Lazy re-exports for package ``__init__`` files (PEP 562): a name's module is imported on first use.

``import cryospin_lab`` and ``import cryospin_lab.physics`` then cost nothing
(no torch), and importing one module of a subpackage does not import its
siblings; the command line's ``--help`` and its input checks stay fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a public name to its module.

    A module path starting with ``.`` is relative to ``package``; a name equal to
    the module's last component (``"datasets": ".simulate.datasets"``) is the
    module itself. The value is cached in the package's namespace after the
    first lookup.
    """

    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        imported = importlib.import_module(module, package)
        # a name that is its module's own last component exports the module itself
        value = imported if module.rpartition(".")[2] == name else getattr(imported, name)
        globals_of_package = importlib.import_module(package).__dict__
        globals_of_package[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(importlib.import_module(package).__dict__) | set(exports))

    return __getattr__, __dir__
