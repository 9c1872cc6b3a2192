"""Simulated particle sets with known truth: atomic models to maps, the simulator, the embedded datasets."""

from cryospin_lab._lazy import lazy_exports

_EXPORTS = {
    "simulate_particles": ".simulator",
    "SimulationResult": ".simulator",
    "GroundTruth": ".ground_truth",
    "draw_ground_truth": ".ground_truth",
    "load_source_volume": ".simulator",
    "fitting_pixel_size": ".simulator",
    "read_model": ".atoms",
    "density_from_model": ".atoms",
    "hsp90": ".datasets",
    "bundled": ".datasets",
    "MOLECULES": ".molecules",
    "Molecule": ".molecules",
    "molecule": ".molecules",
    "default_cache_dir": ".datasets",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
