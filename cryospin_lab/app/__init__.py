"""Running a reconstruction: the notebook object, its background thread, the event bus, results, the CLI."""

from cryospin_lab._lazy import lazy_exports

_EXPORTS = {
    "Reconstruction": ".reconstruction",
    "ParticleView": ".reconstruction",
    "Runner": ".runner",
    "EventBus": ".bus",
    "Subscription": ".bus",
    "ResultWriter": ".results",
    "EventLogWriter": ".event_file",
    "EventLogFollower": ".event_file",
    "read_events": ".event_file",
    "RecordedRun": ".recorded",
    "main": ".cli",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
