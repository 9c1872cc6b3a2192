"""The package version (one place: the front door, the CLI and simulated files' labels read it)."""

__version__ = "0.1.0"
