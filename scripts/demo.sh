#!/usr/bin/env bash
# The main job: see README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
exec .venv/bin/python -m lrnnx_zoo.demo "$@"
