"""A program exported from a model (``torch.export.export(model, (x,))``, the README's whole-sequence
program) calls the library's ``lrnnx_zoo::`` operators, and ``torch.export.load`` resolves them in a
fresh process only if they are registered. ``import lrnnx_zoo`` registered them while it imported
torch itself; since it imports nothing (fast CLI), ``import torch, lrnnx_zoo`` then failed to load an
S4D or FFTConv program ("We failed to resolve torch.ops.lrnnx_zoo.channel_conv"), and LRU / S4
programs failed even before (chunked_scan and shared_cauchy were never registered on import)."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo import create_layer

PACKAGE = Path(lrnnx_zoo.__file__).parent


def _load_in_fresh_process(prelude: str, paths: Dict[str, Path]) -> Dict[str, str]:
    """Run ``prelude`` in a fresh process, then load and call each program of ``paths`` (by family) in
    turn. Returns what each gave: its output's shape, or the error. One process serves every program (an
    interpreter start, ~2.5 s, saved per program) as long as a program's load and call import no
    lrnnx_zoo module, so that each finds only what the prelude registered: such an import is reported
    as that program's outcome instead."""
    code = (f"{prelude}\n"
            "import json, sys, traceback\n"
            "found = {}\n"
            f"for family, path in {json.dumps({k: str(v) for k, v in paths.items()})}.items():\n"
            "    before = set(sys.modules)\n"
            "    try:\n"
            "        program = torch.export.load(path)\n"
            "        found[family] = str(tuple(program.module()(torch.randn(2, 16, 4)).shape))\n"
            "    except Exception:\n"
            "        found[family] = traceback.format_exc()[-3000:]\n"
            "    imported = sorted(m for m in set(sys.modules) - before if m.split('.')[0] == 'lrnnx_zoo')\n"
            "    if imported:\n"
            "        found[family] = ('its load imported ' + ', '.join(imported) + ': a later program '\n"
            "                         'would not see what the prelude registered alone')\n"
            "print(json.dumps(found))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("\n")[-2])


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


@pytest.fixture(scope="module")
def fresh_loads(programs) -> Callable[[str], Dict[str, str]]:
    """``fresh_loads(prelude)``: :func:`_load_in_fresh_process` of every program, run once per prelude."""
    runs: Dict[str, Dict[str, str]] = {}

    def loads(prelude: str) -> Dict[str, str]:
        if prelude not in runs:
            runs[prelude] = _load_in_fresh_process(prelude, programs)
        return runs[prelude]
    return loads


@pytest.mark.parametrize("family", ["s4d", "lru"])
@pytest.mark.parametrize("prelude", ["import torch, lrnnx_zoo", "import lrnnx_zoo.operators, torch"])
def test_a_program_exported_from_a_model_loads_in_a_fresh_process(fresh_loads, family, prelude):
    assert fresh_loads(prelude)[family] == "(2, 16, 4)"


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
