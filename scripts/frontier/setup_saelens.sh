#!/usr/bin/env bash
# Create .venv-saelens: SAELens 6 with its own torch (CPU wheel) and transformer-lens<4,
# kept apart from sweep's .venv (sweep uses transformer-lens 4). Used by bench_frontier.py.
#   bash scripts/frontier/setup_saelens.sh            # in the repository root
#   PYTHON=python3.11 VENV=/somewhere/else bash scripts/frontier/setup_saelens.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv-saelens}"
SAE_LENS="${SAE_LENS:-sae-lens>=6,<7}"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch's CPU wheel: from the configured indexes / find-links if they hold it, else from
# PyTorch's CPU index (an unpinned torch from PyPI is the multi-GB CUDA build).
"$VENV/bin/python" -m pip install -q "torch==2.13.0+cpu" \
  || "$VENV/bin/python" -m pip install -q --retries 1 --timeout 30 "torch==2.13.0" \
       --index-url https://download.pytorch.org/whl/cpu
"$VENV/bin/python" -m pip install -q "$SAE_LENS" "transformer-lens<4" "torch==2.13.0"
"$VENV/bin/python" -c "import importlib.metadata as m, torch; print('sae-lens', m.version('sae-lens'), 'torch', torch.__version__, 'transformer-lens', m.version('transformer-lens'))"
