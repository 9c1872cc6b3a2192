"""cryospin-lab: ab-initio cryo-EM reconstruction with semi-amortized pose inference (cryoSPIN).

The front door::

    import cryospin_lab as csl

    rec = csl.Reconstruction(n_epochs=10)   # the embedded HSP90 set
    rec.start().join()
    rec.export("run")                       # map.mrc, poses.star, metrics.csv, fsc.png

Names are imported on first use, so ``import cryospin_lab`` is instant. The
subpackages, each with its own curated ``__init__``, import only downward:
``physics`` <- ``io`` and ``model`` <- ``analysis`` and ``simulate`` <-
``engine`` <- ``app`` <- ``widgets`` (the notebook UI, ``cryospin_lab.widgets``;
the engine never imports it nor ipywidgets/plotly/nglview/IPython).
"""

from cryospin_lab._lazy import lazy_exports
from cryospin_lab._version import __version__ as __version__

_EXPORTS = {
    "Reconstruction": ".app.reconstruction",
    "TrainingConfig": ".engine.config",
    "EncoderConfig": ".model.encoder",
    "Trainer": ".engine.trainer",
    "ParticleStack": ".io.particles",
    "read_map": ".io.maps",
    "write_map": ".io.maps",
    "read_star": ".io.star",
    "simulate_particles": ".simulate.simulator",
    "hsp90": ".simulate.datasets",
    "datasets": ".simulate.datasets",
    "compute_fsc": ".analysis.metrics",
    "fsc_vs_ground_truth": ".analysis.metrics",
    "pose_error": ".analysis.metrics",
    "view_posterior": ".analysis.pose_posterior",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
