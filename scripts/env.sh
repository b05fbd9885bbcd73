#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv and install lrnnx-zoo into it.
# torch is pinned to 2.13.0 and taken as a CPU build where one can be had: a wheel pip finds
# without an index (a local wheelhouse in its find-links), else PyTorch's CPU index (PyPI's Linux
# torch is the multi-GB CUDA build), else whatever pip's own index serves.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.lrnnx-zoo-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q --no-index --no-deps "torch==2.13.0" 2>/dev/null \
    || .venv/bin/python -m pip install -q --timeout 30 --retries 1 --no-deps "torch==2.13.0" \
         --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
    || true
  .venv/bin/python -m pip install -q "torch==2.13.0"      # its dependencies (and torch, if neither above could)
  .venv/bin/python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
