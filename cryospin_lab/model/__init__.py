"""What is learned: the multi-head pose encoder, the Hartley volume, the direct stage's pose table."""

from cryospin_lab._lazy import lazy_exports

_EXPORTS = {
    "EncoderConfig": ".encoder",
    "MultiHeadEncoder": ".encoder",
    "PoseCandidates": ".encoder",
    "HartleyVolume": ".hartley_volume",
    "PoseTable": ".pose_table",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
