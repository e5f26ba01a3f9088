"""Helpers of ``scripts/bench_frontier.py``: SmolLM2 from its GGUF (:mod:`.smollm2`), English
text (:mod:`.corpus`), the CLI runs of sweep and SAELens (:mod:`.runs`), one evaluation of
every dictionary (:mod:`.evaluate`) and the FVU-vs-L0 frontiers (:mod:`.envelope`).
``saelens_train.py`` is a standalone script run by ``.venv-saelens``'s Python."""
