"""Notebook UI for cryospin-lab, imported as ``cryospin_lab.widgets``.

This folder is mapped to ``cryospin_lab.widgets`` in ``pyproject.toml``; it may
import the engine (``cryospin_lab``) but the engine never imports it. The panels
arrive with the workbench issue.
"""

__all__: list[str] = []
