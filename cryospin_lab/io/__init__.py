"""Files in and out: particle stacks with STAR/cryoSPARC metadata, MRC maps, checkpoints.

``particles`` (:class:`ParticleStack`, memory-mapped), ``star`` and
``cryosparc`` (readers; RELION 3.1 writer), ``metadata`` (the per-particle
table both readers fill), ``maps`` (MRC read/write, the ground truth on a
particle grid), ``checkpoint`` (atomic save, ``weights_only`` load) and
``atomic`` (every output is written to a temporary name and renamed).
"""

from cryospin_lab._lazy import lazy_exports

_EXPORTS = {
    "ParticleStack": ".particles",
    "ParticleBatch": ".particles",
    "ParticleMetadata": ".metadata",
    "read_star": ".star",
    "write_relion31_star": ".star",
    "read_cs": ".cryosparc",
    "read_map": ".maps",
    "write_map": ".maps",
    "load_ground_truth": ".maps",
    "save_checkpoint": ".checkpoint",
    "load_checkpoint": ".checkpoint",
    "latest_checkpoint": ".checkpoint",
    "atomic_path": ".atomic",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
