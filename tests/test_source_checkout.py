"""lrnnx_zoo imported from a source checkout that shadows the installed package (`python -m pytest`
or `python -c` in the checkout's root puts it first on sys.path): the built-in families live in its
plugins/ folder, which only an install maps to lrnnx_zoo.plugins, so none loads. A plugin author
running the contract suite as `python -m pytest tests/test_layer_contract.py -k mine` saw all 21
cases fail with "no backends of kind 'vandermonde'" from their own layer; now each built-in's
error says where lrnnx_zoo came from and what to do, and the test suite stops before collecting.

The checkout is simulated: a folder with pyproject.toml, plugins/ and a link to this lrnnx_zoo,
first on sys.path, with the editable install's import hook (which maps lrnnx_zoo.plugins wherever
lrnnx_zoo came from) taken off sys.meta_path, as a regular install has none.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import lrnnx_zoo
from lrnnx_zoo.registry import source_checkout

PACKAGE = Path(lrnnx_zoo.__file__).resolve().parent
TESTS = Path(__file__).resolve().parent


def _checkout(root: Path) -> Path:
    root.mkdir()
    (root / "pyproject.toml").write_text("[project]\nname = 'lrnnx-zoo'\n")
    (root / "plugins").mkdir()
    os.symlink(PACKAGE, root / "lrnnx_zoo")
    return root


PRELUDE = ("import sys\n"
           "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n"
           "sys.path.insert(0, {root!r})\n"
           "import lrnnx_zoo\n"
           "assert lrnnx_zoo.__file__.startswith({root!r}), lrnnx_zoo.__file__\n")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")


def test_source_checkout_is_recognised_only_beside_pyproject_and_plugins(tmp_path):
    root = _checkout(tmp_path / "co")
    assert source_checkout(str(root / "lrnnx_zoo")) == str(root)
    (root / "pyproject.toml").unlink()
    assert source_checkout(str(root / "lrnnx_zoo")) is None
    assert source_checkout(str(PACKAGE)) in (None, str(PACKAGE.parent))   # this repository is one too


def test_a_builtin_family_that_failed_from_a_checkout_says_what_to_do(tmp_path):
    root = str(_checkout(tmp_path / "co"))
    proc = _run(PRELUDE.format(root=root) +
                "errors = [p.error for p in lrnnx_zoo.list_plugins() if p.builtin and not p.ok]\n"
                "print(len(errors)); print(errors[0])\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    count, error = proc.stdout.split("\n", 1)
    assert int(count) >= 4
    assert f"imported from the source checkout {root}" in error and f"pip install -e {root}" in error, error
    assert "`pytest` (not `python -m pytest`)" in error


def test_the_test_suite_stops_before_collecting_when_the_builtins_did_not_load(tmp_path):
    root = str(_checkout(tmp_path / "co"))
    proc = _run(PRELUDE.format(root=root) +
                "import pytest\n"
                f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '--collect-only', {str(TESTS / 'test_base.py')!r}]))\n")
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "built-in families" in proc.stderr and "source checkout" in proc.stderr, proc.stderr[-2000:]
