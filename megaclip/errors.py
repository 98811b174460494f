"""User-facing errors: one clear message naming the problem and the fix, never a stack trace."""

from __future__ import annotations


class MegaclipError(Exception):
    """Base of every error caused by user input (config, data, checkpoint, CLI arguments).

    The CLI prints ``str(err)`` on one line and exits with status 2; tests match on the text.
    """


class ConfigError(MegaclipError):
    """A configuration file, preset or override is malformed or contradictory."""


class DataError(MegaclipError):
    """Input data (shards, images, captions, tokenizer files) is missing or unusable."""


class CheckpointError(MegaclipError):
    """A checkpoint is missing, truncated, of another architecture or of an unusable layout."""


class NumericalError(MegaclipError):
    """Training diverged: non-finite losses or gradients for too many steps in a row."""
