"""The settings form of a new run, built from the run's settings (``engine.config.SETTINGS``).

The particle file, the box, the heads, the epochs and the switch come first;
every other setting is under "all settings", one field each with its help as
the tooltip and its default, so a setting added to ``TrainingConfig`` appears
here without a change to this file. A field's type follows the setting: a
checkbox, a number box within the setting's bounds, a list of its choices, or
text (``0.9,0.9`` for a pair).
"""

from __future__ import annotations

from typing import Any

import ipywidgets as w

from cryospin_lab.engine.config import SETTINGS, default_rotation_features, setting_value
from cryospin_lab.engine.settings import Setting
from cryospin_lab.simulate.molecules import MOLECULES

__all__ = ["FORM_KEYS", "SettingsForm"]

FIRST = ("n_heads", "n_epochs")  # shown above "all settings", with the switch
# the keywords the form fills; "molecule" and "n_simulated" choose data to simulate (data_source.py)
FORM_KEYS = frozenset(SETTINGS) | {"particles", "box_size", "molecule", "n_simulated"}
_STYLE = {"description_width": "170px"}
_BIG = 10**9  # upper bound of an integer field whose setting has none


def _field(item: Setting) -> w.Widget:
    """The widget of one setting, holding its default."""
    check = item.input_check or item.check
    common = dict(description=item.name.replace("_", " "), tooltip=item.help, style=_STYLE)
    if item.type is bool:
        return w.Checkbox(value=item.default, indent=False, **common)
    if check.choices is not None and item.type is not bool:
        return w.Dropdown(options=list(check.choices), value=item.default, **common)
    if item.type is int:
        low = int(check.low) if check.low is not None else 0
        high = int(check.high) if check.high is not None else _BIG
        return w.BoundedIntText(value=item.default, min=low, max=high, **common)
    if item.type is float:
        return w.FloatText(value=item.default, **common)
    if item.type is tuple:
        return w.Text(value=",".join(str(v) for v in item.default), **common)
    return w.Text(value=str(item.default), **common)


def _value(item: Setting, widget: w.Widget) -> Any:
    value = widget.value
    if item.type is tuple:
        return item.parse(value)  # ValueError with the setting's phrase, shown by the panel
    return value


class SettingsForm:
    """The form; :meth:`values` gives ``Reconstruction``'s keywords, :meth:`fill` shows a run's."""

    def __init__(self) -> None:
        self.molecule = w.Dropdown(
            options=[("none: the particles below", "")] + [(f"{m.name}: {m.description}", m.name)
                                                           for m in MOLECULES.values()],
            value="", description="simulate a molecule", style=_STYLE, layout=w.Layout(width="560px"),
        )  # fmt: skip
        self.n_simulated = w.BoundedIntText(
            value=10000, min=100, max=200000, description="images to simulate", style=_STYLE
        )
        self.dataset = w.Text(
            description="particles", placeholder="empty: embedded HSP90 set; STAR, .cs, or a PDB/mmCIF/MRC "
            "to simulate", style=_STYLE, layout=w.Layout(width="560px"),
        )  # fmt: skip
        self.box_size = w.BoundedIntText(
            value=0, min=0, max=1024, description="box size (0: native)", style=_STYLE
        )
        self.fields = {name: _field(item) for name, item in SETTINGS.items() if name != "switch"}
        # the form gives every setting, so apply_settings never chooses rotation_features for it:
        # the dropdown follows the shifts box by the same rule
        self.fields["estimate_shifts"].observe(self._shifts_toggled, names="value")
        switch = SETTINGS["switch"]
        self.switch_rule = w.Dropdown(
            options=["auto", "never", "at epoch"], value=switch.default, description="switch", style=_STYLE,
            tooltip=switch.help,
        )  # fmt: skip
        self.switch_epoch = w.BoundedIntText(
            value=10, min=0, max=_BIG, description="switch epoch", style=_STYLE
        )
        others = [widget for name, widget in self.fields.items() if name not in FIRST]
        self.all_settings = w.Accordion(children=[w.VBox(others)], selected_index=None)
        self.all_settings.set_title(0, "all settings")
        self.widget = w.Accordion(
            children=[
                w.VBox(
                    [
                        w.HTML("<small>Used when Start builds a new run (no run yet, the run ended, "
                               "or these differ from the current run's settings).</small>"),
                        w.HBox([self.molecule, self.n_simulated]), self.dataset, self.box_size,
                        *(self.fields[name] for name in FIRST),
                        w.HBox([self.switch_rule, self.switch_epoch]), self.all_settings,
                    ]
                )
            ],
            selected_index=None,
        )  # fmt: skip
        self.widget.set_title(0, "settings for a new run")

    def _shifts_toggled(self, change) -> None:
        self.fields["rotation_features"].value = default_rotation_features(change["new"])

    def values(self) -> dict[str, Any]:
        """The form as keywords for ``Reconstruction`` (every setting, the particles and the box)."""
        rule = self.switch_rule.value
        values: dict[str, Any] = {
            "molecule": self.molecule.value,
            "n_simulated": self.n_simulated.value,
            "particles": self.dataset.value.strip() or None,
            "box_size": self.box_size.value or None,
            "switch": str(self.switch_epoch.value) if rule == "at epoch" else rule,
        }
        values.update((name, _value(SETTINGS[name], widget)) for name, widget in self.fields.items())
        return values

    def fill(self, rec) -> None:
        """Show the settings of the reconstruction ``rec``."""
        config = rec.config
        self.molecule.value = ""
        self.dataset.value = str(rec.particles_path)
        self.box_size.value = int(rec.box_size)
        for name, widget in self.fields.items():
            value = setting_value(config, SETTINGS[name].path)
            if SETTINGS[name].type is tuple:
                value = ",".join(str(v) for v in value)
            if isinstance(widget, w.Dropdown) and value not in widget.options:  # e.g. device "cuda:1"
                widget.options = [*widget.options, value]
            widget.value = value
        if str(config.switch) in ("auto", "never"):
            self.switch_rule.value = str(config.switch)
        else:
            self.switch_rule.value = "at epoch"
            self.switch_epoch.value = int(config.switch)
