"""How good a reconstruction is: FSC and resolution, map alignment, pose errors, the pose posterior."""

from cryospin_lab._lazy import lazy_exports

_EXPORTS = {
    "compute_fsc": ".metrics",
    "FSCCurve": ".metrics",
    "fsc_vs_ground_truth": ".metrics",
    "align_maps": ".metrics",
    "apply_map_alignment": ".metrics",
    "MapAlignment": ".metrics",
    "pose_error": ".metrics",
    "PoseError": ".metrics",
    "shift_error_angstrom": ".metrics",
    "view_posterior": ".pose_posterior",
    "ViewPosterior": ".pose_posterior",
    "head_specialisation": ".pose_posterior",
    "HeadSpecialisation": ".pose_posterior",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
