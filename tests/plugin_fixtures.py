"""Build throwaway distributions (a module plus a dist-info with entry_points.txt) on sys.path,
so plugin discovery runs through importlib.metadata exactly as for a pip-installed package."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import textwrap
import types
from pathlib import Path
from typing import Callable, Dict, Iterator, Sequence, Tuple

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo.registry import DISABLE_AUTOLOAD_ENV

# A complete third-party family: a diagonal layer with its own step form (no lrnnx_zoo family code).
GOOD_PLUGIN = '''
import torch
from torch import nn
import lrnnx_zoo
from lrnnx_zoo.base import LTI_LRNN, mask_padding
from lrnnx_zoo.step_forms import StepForm


class EmaStep(StepForm):
    """x' = a * x + (1 - a) * u,  y = x' (one real state per channel)."""
    def __init__(self, a):
        super().__init__()
        self.register_buffer("a", a.detach().float().clone())
        self.state_size = self.d_input = self.d_output = a.shape[0]
    def forward(self, u, s):
        s = self.a * s + (1 - self.a) * u
        return s, s


class EMA(LTI_LRNN):
    """Exponential moving average per channel with a learnable decay."""
    def __init__(self, d_model, d_state=1, decay=0.9):
        super().__init__("no_discretization")
        self.d_model = d_model
        self.logit = nn.Parameter(torch.full((d_model,), float(torch.logit(torch.tensor(decay)))))
    def discretize(self):
        a = torch.sigmoid(self.logit)
        return a, 1 - a, torch.ones_like(a)
    def compute_kernel(self, L):
        a, b, _ = self.discretize()
        return b * a ** torch.arange(L, dtype=a.dtype)[:, None]          # (L, H)
    def forward(self, x, integration_timesteps=None, lengths=None):
        self.check_input(x, lengths)
        K = self.compute_kernel(x.shape[1]).T
        y = lrnnx_zoo.convolution.causal_conv(x.transpose(1, 2), K).transpose(1, 2)
        return mask_padding(y, lengths)
    def step_form(self):
        return EmaStep(torch.sigmoid(self.logit))


@lrnnx_zoo.hookimpl
def lrnnx_zoo_register_layers(registry):
    registry.add_layer("{layer_name}", EMA)


@lrnnx_zoo.hookimpl
def lrnnx_zoo_register_initializers(registry):
    registry.add_initializer("{layer_name}", "flat", lambda H: torch.zeros(H))
'''

BROKEN_IMPORT = "raise ImportError('this plugin needs a library that is not installed')\n"

RAISING_HOOK = '''
import lrnnx_zoo

class Half:
    pass

@lrnnx_zoo.hookimpl
def lrnnx_zoo_register_layers(registry):
    registry.add_layer("half_registered", type("Half", (__import__("torch").nn.Module,), {"forward": lambda s, x: x}))
    raise RuntimeError("boom while registering")
'''


def make_distribution(root: Path, dist: str, modules: Dict[str, str], entry_points: Dict[str, str],
                      version: str = "0.1.0") -> Path:
    """Write modules and ``{dist}-{version}.dist-info`` under root; returns root."""
    root.mkdir(parents=True, exist_ok=True)
    for mod, src in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(src))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    eps = "[lrnnx_zoo]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(eps)
    return root


def activate(root: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(root))
    for name in list(sys.modules):
        if name.startswith("tp_"):
            del sys.modules[name]


@contextlib.contextmanager
def installed(root, monkeypatch):
    """The distributions under ``root`` installed (on sys.path, autoloaded) while inside, gone after."""
    activate(root, monkeypatch)
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    lrnnx_zoo.reload_plugins()
    try:
        yield
    finally:
        monkeypatch.undo()
        lrnnx_zoo.reload_plugins()


def reinstall(monkeypatch, root=None):
    """Inside :func:`installed`: swap the installed distributions for those under ``root`` (None:
    uninstall them), as pip would between two runs."""
    monkeypatch.undo()
    if root is not None:
        activate(root, monkeypatch)
        monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    lrnnx_zoo.reload_plugins()


@contextlib.contextmanager
def layers_registered(plugin: str, **layers: type) -> Iterator[None]:
    """Inside: the layer classes ``layers`` (name -> class) registered in code as plugin ``plugin``
    (lrnnx_zoo.register_plugin), as a third-party package would register them; unregistered after."""
    module = types.SimpleNamespace()

    @lrnnx_zoo.hookimpl
    def lrnnx_zoo_register_layers(registry):
        for name, cls in layers.items():
            registry.add_layer(name, cls)
    module.lrnnx_zoo_register_layers = lrnnx_zoo_register_layers
    lrnnx_zoo.register_plugin(module, name=plugin)
    try:
        yield
    finally:
        lrnnx_zoo.unregister_plugin(plugin)


@contextlib.contextmanager
def hooks_registered(plugin: str, initializers: Sequence[Tuple[str, str, Callable]] = (),
                     backends: Sequence[Tuple[str, str, Callable]] = ()) -> Iterator[lrnnx_zoo.PluginInfo]:
    """Inside: a plugin ``plugin`` registered in code that adds the (layer, name, fn) ``initializers`` and
    the (kind, name, fn) ``backends`` to the loaded families, as a third-party package adding no layer
    would; yields its PluginInfo and unregisters it after."""
    module = types.SimpleNamespace()

    @lrnnx_zoo.hookimpl
    def lrnnx_zoo_register_initializers(registry):
        for layer, name, fn in initializers:
            registry.add_initializer(layer, name, fn)

    @lrnnx_zoo.hookimpl
    def lrnnx_zoo_register_kernel_backends(registry):
        for kind, name, fn in backends:
            registry.add_backend(kind, name, fn)
    module.lrnnx_zoo_register_initializers = lrnnx_zoo_register_initializers
    module.lrnnx_zoo_register_kernel_backends = lrnnx_zoo_register_kernel_backends
    info = lrnnx_zoo.register_plugin(module, name=plugin)
    try:
        yield info
    finally:
        lrnnx_zoo.unregister_plugin(plugin)


class LoopRecurrence(torch.nn.Module):
    """A layer of a third party's own making: h_t = a h_{t-1} + x_t per channel, in a Python loop,
    so forward and a step of its own run the same float ops. No streaming methods: tests add theirs."""

    def __init__(self, d_model: int, **_):
        super().__init__()
        self.d_model = d_model
        self.a = torch.nn.Parameter(torch.full((d_model,), 0.9))

    def forward(self, x, integration_timesteps=None, lengths=None):
        h, ys = torch.zeros_like(x[:, 0]), []
        for t in range(x.shape[1]):
            h = self.a * h + x[:, t]
            ys.append(h)
        return torch.stack(ys, 1)


#: The README's plugin guide example, a module file that tests load without installing it.
EMA_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ema_plugin" / "lrnnx_ema.py"


@contextlib.contextmanager
def example_ema_plugin(module_name: str) -> Iterator[types.ModuleType]:
    """The example module (:data:`EMA_EXAMPLE`) loaded as ``module_name`` and registered as plugin "ema"
    over the built-in families only (third-party autoloading off) while inside; gone after."""
    mp = pytest.MonkeyPatch()
    mp.setenv(DISABLE_AUTOLOAD_ENV, "1")
    lrnnx_zoo.reload_plugins()
    try:
        spec = importlib.util.spec_from_file_location(module_name, EMA_EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        mp.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
        lrnnx_zoo.register_plugin(module, name="ema")
        yield module
    finally:
        mp.undo()
        lrnnx_zoo.reload_plugins()
