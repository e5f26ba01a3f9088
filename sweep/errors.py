"""Errors a user can act on. The CLI prints their message on one line and exits non-zero."""

from __future__ import annotations


class SweepError(Exception):
    """A problem with the user's input or environment; the message names it and the fix."""


class StoreError(SweepError):
    """A chunk store is missing, incomplete, damaged or does not fit the config."""


class RunDirError(SweepError):
    """A sweep or run folder cannot be written, or holds something that conflicts."""


def task_error_reason(err: Exception) -> str:
    """The last line of what a failed Ray task raised (its cause), for a one-line message."""
    cause = getattr(err, "cause", None)
    text = str(cause) if cause is not None else str(err)
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__
