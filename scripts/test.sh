#!/usr/bin/env bash
# Run the whole test suite in the project's own virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
# Arguments go to pytest. A path among them (a file, a folder, a node id) replaces `tests`: added to
# it, the whole suite ran as well.
for arg in "$@"; do
    case "$arg" in
        -*) ;;
        *) if [ -e "${arg%%::*}" ]; then exec .venv/bin/python -m pytest "$@"; fi ;;
    esac
done
exec .venv/bin/python -m pytest tests "$@"
