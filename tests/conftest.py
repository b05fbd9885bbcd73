"""Shared pytest configuration: make tests/ importable and expose the local Hub fixture and
``one_torch_thread`` (modules of tiny per-step work opt in with pytestmark)."""

import sys
from pathlib import Path

import pytest
import torch

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from hub_server import local_hub  # noqa: E402,F401  (pytest fixture: a LocalHub with huggingface_hub pointed at it)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module: per-step work is tiny, and a thread pool on a shared
    2-core machine only adds hand-off cost (``pytestmark = pytest.mark.usefixtures(...)``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def float64_default():
    """torch's default dtype float64 for one test (a layer built in it holds float64 parameters; one
    built in float32 and cast keeps float32's roundings)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)
