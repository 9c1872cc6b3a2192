"""Notebook UI for cryospin-lab, imported as ``cryospin_lab.widgets``.

This folder is mapped to ``cryospin_lab.widgets`` in ``pyproject.toml``; it may
import the engine (``cryospin_lab``) but the engine never imports it. It needs
the ``lab`` extra (ipywidgets 8, plotly with anywidget, nglview 3.1.4).

Start here::

    from cryospin_lab.widgets import launch
    bench = launch(n_epochs=10)   # the embedded HSP90 set; press Start
    bench

Layout: ``pump`` (the one UI pump and the ``Panel`` base), ``_plotly``
(FigureWidget whose stored state follows updates), ``_plotly_module``
(plotly's browser code served once per page, not sent with every figure), one module per panel
(``controls`` with its ``settings_form``, ``heads``, ``curves``, ``volume``,
``posterior``, ``specialisation``) and ``workbench`` (all of them together). Names are
imported on first use (PEP 562), so importing one panel module does not import
the others.
"""

from cryospin_lab._lazy import lazy_exports

_EXPORTS = {
    "Workbench": ".workbench",
    "launch": ".workbench",
    "watch": ".workbench",
    "replay": ".playback",
    "Replay": ".playback",
    "UIPump": ".pump",
    "Panel": ".pump",
    "ControlsPanel": ".controls",
    "SettingsForm": ".settings_form",
    "HeadAssignmentsPanel": ".heads",
    "FSCPanel": ".curves",
    "PoseErrorPanel": ".curves",
    "LossPanel": ".curves",
    "VolumePanel": ".volume",
    "PosteriorPanel": ".posterior",
    "HeadSpecialisationPanel": ".specialisation",
    "sync_state": "._plotly",
    "SyncedFigureWidget": "._plotly",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
