"""Shared pytest configuration: make tests/ importable and expose the local Hub fixture."""

import sys
from pathlib import Path

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from hub_server import local_hub  # noqa: E402,F401  (pytest fixture: a LocalHub with huggingface_hub pointed at it)
