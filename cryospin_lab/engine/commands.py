"""Commands the outside world sends a running reconstruction (applied between two steps)."""

from __future__ import annotations

import enum

__all__ = ["Command", "CommandError"]


class Command(enum.Enum):
    """What the outside world can ask of a running reconstruction."""

    SWITCH_NOW = "switch_now"
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    FORK = "fork"


class CommandError(Exception):
    """Raised by ``Steppable.apply_command`` to reject a command (published as a LogEvent, run goes on)."""
