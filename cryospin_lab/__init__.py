"""cryospin-lab: ab-initio cryo-EM reconstruction with semi-amortized pose inference.

The engine package. It never imports the notebook UI (``cryospin_lab.widgets``)
nor ipywidgets/plotly/nglview/IPython, so it runs headless.
"""

__version__ = "0.1.0"
