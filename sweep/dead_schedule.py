"""Whether a sweep's dead-latent remedies can act in its schedule.

A latent counts as dead once it has been silent for ``train.dead_tokens`` training rows, so
none can be before that many rows are trained. Resampling (``train.resample_dead``) that ends
(``train.resample_stop``) before then, or an AuxK weight on a sweep shorter than that, is
switched on and does nothing: said before training, as a warning (its runs are still right).
"""

from __future__ import annotations

import math

from sweep.archs import Architecture
from sweep.config import TrainConfig


def never_acts_note(train: TrainConfig, arch: Architecture, steps: int) -> str | None:
    """A warning when resampling, or an AuxK weight set by hand, cannot act in ``steps``
    steps of ``train.batch_size`` rows; else None. (AuxK on by default warns of nothing: a
    short sweep with the default weight is no choice the user made.)"""
    if arch.resamples and train.resample_dead > 0:
        return _resampling_note(train, steps)
    custom = train.auxk_alpha not in (0, TrainConfig.auxk_alpha)
    trained_before_last = (steps - 1) * train.batch_size  # (AuxK reads the mask before a step)
    if arch.knob == "k" and custom and trained_before_last < train.dead_tokens:
        return (
            f"train.auxk_alpha={train.auxk_alpha:g} never acts here: a latent counts as dead "
            f"after train.dead_tokens={train.dead_tokens:,} rows and the last step comes after "
            f"{trained_before_last:,}; lower train.dead_tokens"
        )
    return None


def _resampling_note(train: TrainConfig, steps: int) -> str | None:
    """Why no resampling step can find a dead latent (resampling after step s sees s batches),
    or None. Resampling steps: multiples of ``resample_dead`` up to ``resample_stop`` of
    training, never the last step (:func:`sweep.worker._resample_due`)."""
    every, stop = train.resample_dead, train.resample_stop
    end = min(math.floor(stop * steps), steps - 1)
    last = end // every * every
    if last < every:
        return (
            f"train.resample_dead={every} never resamples here: resampling ends at step {end} "
            f"of {steps} (train.resample_stop={stop:g}); lower train.resample_dead"
        )
    seen = last * train.batch_size
    if seen < train.dead_tokens:
        return (
            f"train.resample_dead={every} never resamples here: a latent counts as dead after "
            f"train.dead_tokens={train.dead_tokens:,} rows, and the last resampling (step {last} "
            f"of {steps}, train.resample_stop={stop:g}) comes after {seen:,}; lower "
            f"train.dead_tokens (to {seen:,} at most) or raise train.resample_stop"
        )
    return None
