"""examples/ema_plugin, the plugin README's "Writing a plugin" walks through, works as shown:
registered, created by name, streamed, trained, exported to ONNX and run in ONNX Runtime.

The module is imported from the source tree and registered with ``lrnnx_zoo.register_plugin``,
with third-party autoloading off, so an installed copy (``pip install ./examples/ema_plugin``) or
another "ema" plugin cannot interfere; discovery through entry points is tested in test_plugins.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import lrnnx_zoo
from plugin_fixtures import example_ema_plugin

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ema_plugin"
MODULE = EXAMPLE / "lrnnx_ema.py"


@pytest.fixture(scope="module")
def ema():
    """The example module, registered as plugin "ema" over the built-in families only."""
    with example_ema_plugin("lrnnx_ema_example") as module:
        yield module


def test_pyproject_entry_point_names_the_module():
    tomllib = pytest.importorskip("tomllib")             # Python >= 3.11
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["lrnnx_zoo"] == {"ema": MODULE.stem}
    assert project["tool"]["setuptools"]["py-modules"] == [MODULE.stem]


def test_registered_and_created_by_name(ema):
    info = {p.name: p for p in lrnnx_zoo.list_plugins()}["ema"]
    assert info.ok and info.layers == ["ema"] and info.initializers == ["ema.flat"]
    layer = lrnnx_zoo.create_layer("ema", 6, d_state=4)
    assert isinstance(layer, ema.EMA) and layer(torch.randn(2, 9, 6)).shape == (2, 9, 6)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_step_agrees_with_forward(ema, dtype, tol):
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("ema", 6).to(dtype)
    x = torch.randn(2, 200, 6, dtype=dtype)
    cache = layer.allocate_inference_cache(2)
    with torch.no_grad():
        steps = torch.stack([layer.step(x[:, t], cache)[0] for t in range(x.shape[1])], 1)
        y = layer(x)
    assert steps.dtype == dtype
    torch.testing.assert_close(steps, y, rtol=0, atol=tol)


def test_model_trains_exports_to_onnx_and_streams(ema, tmp_path):
    from lrnnx_zoo.export import OnnxStreamer, to_onnx

    torch.manual_seed(0)
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer="ema", d_input=2, d_output=3,
                                                          d_model=8, n_layers=2))
    x, target = torch.randn(4, 32, 2), torch.randn(4, 32, 3)
    decay = model.blocks[0].layer.logit.detach().clone()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(model.blocks[0].layer.logit, decay), "the decay is learned"

    model.eval()
    result = to_onnx(model, tmp_path / "ema.onnx")                # validated before it is written
    assert result.metadata["lrnnx_zoo.family"] == "ema" and result.state_size == 2 * 8
    stream = OnnxStreamer(tmp_path / "ema.onnx")
    stream.reset(batch=1)
    ys = np.stack([stream.step(x[:1, t].numpy()) for t in range(x.shape[1])], 1)
    with torch.no_grad():
        np.testing.assert_allclose(ys, model(x[:1]).numpy(), rtol=0, atol=1e-5)


def test_readme_shows_this_example():
    # The README's plugin guide is this package, verbatim, so the two cannot drift apart.
    readme = (ROOT / "README.md").read_text()
    guide = readme.split("## Writing a plugin", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", guide, flags=re.S)
    python = [code for lang, code in blocks if lang == "python"]
    assert python and python[0] == MODULE.read_text(), "README's plugin module differs from lrnnx_ema.py"
    toml = [code for lang, code in blocks if lang == "toml"]
    assert toml and toml[0] in (EXAMPLE / "pyproject.toml").read_text()


def test_example_passes_the_contract_kit_in_its_own_test_suite(ema):
    # The guide tells a plugin author to run lrnnx_zoo.testing's checks in the plugin's own suite, as
    # examples/ema_plugin/test_lrnnx_ema.py does: its test is run here on each case its parametrisation
    # gives, in this process (a pytest subprocess cost 5 s more), ONNX export included. (The example
    # once failed the contract: forward() took integration_timesteps and ignored them, and its output
    # was a transposed view, not contiguous.)
    from lrnnx_zoo.testing import CHECKS
    spec = importlib.util.spec_from_file_location("test_lrnnx_ema_example", EXAMPLE / "test_lrnnx_ema.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    (mark,) = suite.test_lrnnx_zoo_contract.pytestmark
    assert mark.name == "parametrize" and mark.args[0] == "check"
    cases = mark.args[1]
    assert [p.id for p in cases] == [f"ema-{name}" for name in CHECKS]
    for case in cases:
        suite.test_lrnnx_zoo_contract(*case.values)
