"""A program exported from a model (``torch.export.export(model, (x,))``, the README's whole-sequence
program) calls the library's ``lrnnx_zoo::`` operators, and ``torch.export.load`` resolves them in a
fresh process only if they are registered. ``import lrnnx_zoo`` registered them while it imported
torch itself; since it imports nothing (fast CLI), ``import torch, lrnnx_zoo`` then failed to load an
S4D or FFTConv program ("We failed to resolve torch.ops.lrnnx_zoo.channel_conv"), and LRU / S4
programs failed even before (chunked_scan and shared_cauchy were never registered on import)."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo import create_layer

PACKAGE = Path(lrnnx_zoo.__file__).parent


def _load_in_fresh_process(prelude: str, path: Path) -> subprocess.CompletedProcess:
    code = (f"{prelude}\n"
            f"program = torch.export.load({str(path)!r})\n"
            "y = program.module()(torch.randn(2, 16, 4))\n"
            "print(tuple(y.shape))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def programs(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("programs")
    paths = {}
    for family in ("s4d", "lru"):          # channel_conv; chunked_scan
        torch.manual_seed(0)
        layer = create_layer(family, d_model=4, d_state=4).eval()
        with torch.no_grad():
            program = torch.export.export(copy.deepcopy(layer), (torch.randn(2, 16, 4),))
        targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
        assert any(t.startswith("lrnnx_zoo.") for t in targets), targets   # the case under test
        paths[family] = folder / f"{family}.pt2"
        torch.export.save(program, str(paths[family]))
    return paths


@pytest.mark.parametrize("family", ["s4d", "lru"])
@pytest.mark.parametrize("prelude", ["import torch, lrnnx_zoo", "import lrnnx_zoo.operators, torch"])
def test_a_program_exported_from_a_model_loads_in_a_fresh_process(programs, family, prelude):
    done = _load_in_fresh_process(prelude, programs[family])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-2] == "(2, 16, 4)"


def test_importing_the_package_without_torch_still_imports_no_torch():
    done = subprocess.run([sys.executable, "-c", "import sys, lrnnx_zoo; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def test_operators_lists_and_registers_every_operator_the_package_defines():
    defined = set()
    for source in PACKAGE.rglob("*.py"):
        defined |= set(re.findall(r'custom_op\(\s*"lrnnx_zoo::(\w+)"', source.read_text(encoding="utf-8")))
    from lrnnx_zoo import operators
    assert defined and defined == set(operators.NAMES)
    for name in operators.NAMES:
        getattr(torch.ops.lrnnx_zoo, name)          # AttributeError where not registered
