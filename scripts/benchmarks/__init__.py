"""The sections of ``scripts/bench.py``, one module each (registered in :mod:`.sections`),
sharing :mod:`.timing` (timer, interleaved repeats, ratios, tables) and :mod:`.common` (sizes,
settings, stores, the per-run :class:`~.common.Context`)."""
