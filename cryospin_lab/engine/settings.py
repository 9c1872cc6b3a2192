"""How a run's settings are declared: each once, with its type, default, check and one line of help.

A field of :class:`~cryospin_lab.engine.config.TrainingConfig` is declared with
:func:`setting`; :data:`~cryospin_lab.engine.config.SETTINGS` collects them as
:class:`Setting` records, from which the command line's flags, the keywords
of ``Reconstruction``, the workbench's settings form and the resume check are
all built. A new setting is therefore added in one place.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "BOOL",
    "NON_NEGATIVE",
    "NON_NEGATIVE_INT",
    "POSITIVE",
    "POSITIVE_INT",
    "Check",
    "OnResume",
    "Setting",
    "int_range",
    "one_of",
    "setting",
]

# What a resumed run does with a setting: "keep" the checkpoint's (a value given again must equal
# it), let it "change" (the run's length), or take the "machine"'s (device, threads: the value given
# now, else the default; a checkpoint moves between machines).
OnResume = Literal["keep", "change", "machine"]
_SPEC = "cryospin_lab.setting"  # key of the dataclass field metadata


@dataclass(frozen=True)
class Check:
    """The values a setting accepts: a predicate and the phrase an error uses ("a positive number").

    ``low``/``high`` bound a number (for forms); ``choices`` list the values of a choice.
    """

    what: str
    ok: Callable[[Any], bool]
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None

    def __call__(self, value: Any) -> bool:
        try:
            return bool(self.ok(value))
        except (TypeError, ValueError):
            return False


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


def int_range(low: int, high: int) -> Check:
    """An integer from ``low`` to ``high``."""
    return Check(f"an integer from {low} to {high}", lambda v: _is_int(v) and low <= v <= high, low, high)


def one_of(*choices: Any, what: str | None = None) -> Check:
    """One of ``choices`` (shown as ``'a' or 'b'`` unless ``what`` says otherwise)."""
    phrase = what or " or ".join(repr(c) for c in choices)
    return Check(phrase, lambda v: not isinstance(v, bool) and v in choices, choices=tuple(choices))


POSITIVE_INT = Check("a positive integer", lambda v: _is_int(v) and v >= 1, low=1)
NON_NEGATIVE_INT = Check("an integer >= 0", lambda v: _is_int(v) and v >= 0, low=0)
POSITIVE = Check("a positive number", lambda v: _is_real(v) and 0 < v < math.inf, low=0)
NON_NEGATIVE = Check("a number >= 0", lambda v: _is_real(v) and v >= 0, low=0)
BOOL = Check("True or False", lambda v: isinstance(v, bool), choices=(False, True))


@dataclass(frozen=True)
class _Spec:
    help: str
    check: Check
    flag: str | None
    on_resume: OnResume
    input_check: Check | None
    default_help: str | None


def setting(
    default: Any,
    help: str,
    check: Check,
    *,
    flag: str | None = None,
    on_resume: OnResume = "keep",
    input_check: Check | None = None,
    default_help: str | None = None,
):
    """A dataclass field that is a user setting.

    Args:
        default: the value when the setting is not given.
        help: one line for ``--help``, the form's tooltip and the docs.
        check: what a stored value must satisfy (checked by the dataclass).
        flag: the command-line flag (default ``--`` + the name with dashes).
        on_resume: see :data:`OnResume`.
        input_check: a stricter check for a value a user types (e.g. at most 4 threads per core),
            not applied to a stored checkpoint.
        default_help: how ``--help`` states a default that is derived (instead of ``default``).
    """
    spec = _Spec(help, check, flag, on_resume, input_check, default_help)
    return field(default=default, metadata={_SPEC: spec})


def spec_of(dataclass_field) -> _Spec | None:
    """The :func:`setting` declaration of a dataclass field, None for a plain field."""
    return dataclass_field.metadata.get(_SPEC)


@dataclass(frozen=True)
class Setting:
    """One user setting of a run, as every interface sees it."""

    name: str  # the keyword (Reconstruction(n_heads=...)) and the form's key
    path: tuple[str, ...]  # where it lives in TrainingConfig: ("n_epochs",) or ("encoder", "n_heads")
    type: type  # int, float, str, bool or tuple
    default: Any
    help: str
    check: Check
    flag: str
    on_resume: OnResume = "keep"
    input_check: Check | None = None
    default_help: str | None = None

    @property
    def where(self) -> str:
        """The dotted field name in TrainingConfig (``encoder.n_heads``)."""
        return ".".join(self.path)

    def default_text(self) -> str:
        return self.default_help or str(self.default)

    def error(self, value: Any, prefix: str) -> ValueError:
        check = self.input_check or self.check
        return ValueError(f"{prefix}{self.name} must be {check.what}, got {value!r}")

    def validate(self, value: Any, prefix: str = "") -> Any:
        """``value`` as stored (an int-valued float becomes an int, a switch epoch a string), or the
        ValueError of :meth:`error` when a user may not give it."""
        if self.type is float and _is_int(value):
            value = float(value)
        if self.name == "switch" and _is_int(value):
            value = str(value)
        if not self.check(value) or (self.input_check is not None and not self.input_check(value)):
            raise self.error(value, prefix)
        return value

    def parse(self, text: str) -> Any:
        """A command-line string as this setting's value (a tuple as ``0.9,0.9``); ValueError with the
        check's phrase."""
        if self.type is int:
            try:
                value: Any = int(text)
            except ValueError:
                value = text
        elif self.type is float:
            try:
                value = float(text)
            except ValueError:
                value = text
        elif self.type is tuple:
            try:
                value = tuple(float(part) for part in text.split(","))
            except ValueError:
                value = text
        else:
            value = text.strip() if self.name == "switch" else text
            if self.name == "switch" and value.isdigit():
                value = str(int(value))
        check = self.input_check or self.check
        if not self.check(value) or not check(value):
            raise ValueError(f"must be {check.what}, got {text!r}")
        return value
