#!/usr/bin/env bash
# Run the whole test suite in the project's own virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
# Arguments go to pytest. A path among them (a file, a folder, a node id) replaces `tests`: added to
# it, the whole suite ran as well.
# The value of an option that takes one (`-k export`, `--ignore tests/x.py`) is no path to run, even
# where a file or folder has its name: `-k export` ran on one core, on pytest's own choice of paths.
value_next=""
for arg in "$@"; do
    if [ -n "$value_next" ]; then value_next=""; continue; fi
    case "$arg" in
        -k|-m|-p|-n|-o|-c|-W|--deselect|--ignore|--ignore-glob|--rootdir|--basetemp|--junitxml|--maxfail|\
        --durations|--tb|--numprocesses|--dist|--confcutdir|--log-level|--override-ini) value_next=1 ;;
        -*) ;;
        *) if [ -e "${arg%%::*}" ]; then exec .venv/bin/python -m pytest "$@"; fi ;;
    esac
done
# The whole suite runs on every core (pytest-xdist): on one it took 17 minutes here, on two 9-10.
# Asked for a number of workers (-n, --numprocesses) or without xdist (-p no:xdist): as asked.
for arg in "$@"; do
    case "$arg" in
        -n*|--numprocesses*|no:xdist) exec .venv/bin/python -m pytest tests "$@" ;;
    esac
done
exec .venv/bin/python -m pytest -n auto tests "$@"
