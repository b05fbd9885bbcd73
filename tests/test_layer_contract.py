"""The contract every registered layer keeps, whoever registered it (timm-style: one test
parametrised over the registry, so a new layer is checked the moment it registers).

The checks are lrnnx_zoo.testing's (the kit a plugin author runs from an installed lrnnx-zoo:
``check_layer(name)``), one test case per layer and check; their tolerances are stated there
(float32 modes to 1e-4 of max|y| over L=1024, float64 to 1e-10 over L=256). ONNX export, the kit's
slowest check, is left to test_export.py, which exports every registered layer's model to ONNX,
TorchScript and torch.export and validates each.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo.registry import get_layer_class
from lrnnx_zoo.testing import CHECKS, layer_checks

LAYERS = lrnnx_zoo.list_layers()
H, N = 16, 8


def _accepts(name: str, arg: str) -> bool:
    return arg in inspect.signature(get_layer_class(name).__init__).parameters


# Bidirectional variants too, wherever a layer offers one, with every check the kit gives them (those
# that need no streaming): their reverse pass must start at each sequence's own end, which only a padded
# batch shows, and the rest of the contract holds for them as the kit says (0.6 s for both such layers).
CASES = [pytest.param(c, id=c.id) for name in LAYERS for c in layer_checks(name, H, N, onnx=False)]
CASES += [pytest.param(c, id=f"{c.id}-bidirectional") for name in LAYERS if _accepts(name, "bidirectional")
          for c in layer_checks(name, H, N, bidirectional=True)]


def test_builtin_families_registered():
    assert {"lru", "s4d"} <= set(LAYERS)


@pytest.mark.parametrize("check", CASES)
def test_layer_keeps_the_contract(check):
    check()


def test_every_check_runs_on_every_layer():
    # a check the kit adds reaches every registered layer here (ONNX aside, see the docstring), and
    # bidirectional layers get every check that needs no streaming
    ran = {(p.values[0].layer, p.values[0].name) for p in CASES}
    assert ran >= {(name, check) for name in LAYERS for check in CHECKS if check != "onnx"}
    two_way = {(p.values[0].layer, p.values[0].name) for p in CASES if p.id.endswith("-bidirectional")}
    assert two_way == {(name, check) for name in LAYERS if _accepts(name, "bidirectional")
                       for check, c in CHECKS.items() if not c.streaming}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fftconv_block_refuses_half_precision_parameters_on_the_cpu(dtype):
    from lrnnx_zoo.plugins.fftconv import FFTConvS4
    with pytest.raises(TypeError, match=rf"FFTConvS4 on the CPU computes in float32 or float64, but holds {dtype}"):
        FFTConvS4(H, d_state=N).to(dtype)(torch.randn(2, H, 10))
