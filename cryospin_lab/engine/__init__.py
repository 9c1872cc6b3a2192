"""The cryoSPIN run as a generator of events: settings, trainer, branches, steps, switch rule.

``config`` (every setting once), ``trainer`` (the loop: amortized stage,
switch, direct stage), ``branch`` (one reconstruction state), ``feed`` (the
particles as the loop sees them), ``steps`` (one optimisation step of each
stage), ``switch_rule``, ``epoch_report``, ``gold_standard``, ``distributed``,
``events`` (what a run emits) and ``commands`` (what it accepts between two
steps). The engine never imports the application layer or the UI.
"""

from cryospin_lab._lazy import lazy_exports

_EXPORTS = {
    "TrainingConfig": ".config",
    "Trainer": ".trainer",
    "Branch": ".branch",
    "Phase": ".events",
    "Event": ".events",
    "Command": ".commands",
    "CommandError": ".commands",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
