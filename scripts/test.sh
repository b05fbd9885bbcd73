#!/usr/bin/env bash
# Run the whole test suite in the project's own virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
exec .venv/bin/python -m pytest tests "$@"
