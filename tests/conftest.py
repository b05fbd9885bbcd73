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


def pytest_configure(config):
    """Stop before collecting when a built-in family failed to load: every test of it would fail on its
    own, far from the cause (the contract suite run with `python -m pytest` in a source checkout
    imports the checkout's lrnnx_zoo, where lrnnx_zoo.plugins does not exist, and a plugin author's
    layer then failed with "no backends of kind 'vandermonde'").

    A pytest-xdist worker gives torch its share of the cores: each of the 2 workers on this 2-core
    machine ran torch's 2-thread pools, 4 threads on 2 cores, whose hand-offs spun against each other
    (the contract, models, diagonal-family and S4 files: 32.6 s -> 13.9 s with one thread a worker)."""
    import os
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if os.environ.get("PYTEST_XDIST_WORKER") and workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    import lrnnx_zoo
    failed = [p for p in lrnnx_zoo.list_plugins() if p.builtin and not p.ok]
    if failed:
        raise pytest.UsageError(f"lrnnx-zoo's built-in families {', '.join(p.name for p in failed)} did not load "
                                f"(lrnnx_zoo from {Path(lrnnx_zoo.__file__).parent}); {failed[0].name}: "
                                f"{failed[0].error}")


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
