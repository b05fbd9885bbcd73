"""A plugin's step_form() is checked where a stream or a graph is made (one trial step from zeros):
each way of breaking the contract (the README's "Writing a plugin") gets a StepFormError saying what
was expected and what came back, eagerly at allocate_inference_cache and as an ExportError at export.
They failed at the second step, inside a matmul, or deep inside torch.onnx ("No ONNX function found
... submit a PR to PyTorch")."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import lrnnx_zoo
from lrnnx_zoo.export import ExportError, to_onnx
from lrnnx_zoo.step_forms import StepFormError, check_step_form, stored
from plugin_fixtures import GOOD_PLUGIN

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_ema = types.ModuleType("tp_ema_forms")
exec(GOOD_PLUGIN.replace("{layer_name}", "ema_forms"), _ema.__dict__)
EMA = _ema.EMA


class _Form(nn.Module):
    """A hand-written form (no StepForm base, as the contract allows): s' = a s + (1 - a) u, y = s'."""

    def __init__(self, a: torch.Tensor, size: object) -> None:
        super().__init__()
        self.register_buffer("a", stored(a))
        self.state_size = size

    def forward(self, u, s):
        s = self.a * s + (1 - self.a) * u
        return s, s


def _a(layer):
    return torch.sigmoid(layer.logit.double())


class NotImplementedForm(EMA):
    step_form = lrnnx_zoo.LTI_LRNN.step_form


class FloatSize(EMA):
    def step_form(self):
        return _Form(_a(self), float(self.d_model))


class TensorSize(EMA):
    def step_form(self):
        return _Form(_a(self), torch.tensor(self.d_model))


class SizeNotItsState(EMA):
    def step_form(self):
        return _Form(_a(self), 2 * self.d_model)


class OutputOnly(EMA):
    def step_form(self):
        form = _Form(_a(self), self.d_model)
        form.forward = lambda u, s: _Form.forward(form, u, s)[0]
        return form


class NotAModule(EMA):
    def step_form(self):
        return lambda u, s: (s, s)


class ComplexOps(EMA):
    def step_form(self):
        form = _Form(_a(self), self.d_model)

        def forward(u, s):
            z = torch.complex(s, torch.zeros_like(s)) * torch.exp(1j * form.a)   # a natural first try
            s = z.real * form.a + (1 - form.a) * u
            return s, s
        form.forward = forward
        return form


CASES = {
    "float_size": (FloatSize, r"an nn.Module with an int state_size >= 0; got _Form with state_size=4.0"),
    "tensor_size": (TensorSize, r"an nn.Module with an int state_size >= 0; got _Form with state_size=tensor\(4\)"),
    "size_not_its_state": (SizeNotItsState, r"a form whose forward\(u, s\) runs on zeros u \(2, 4\) and s \(2, "
                                            r"state_size=8\); it raised RuntimeError: The size of tensor a"),
    "output_only": (OutputOnly, r"a form whose forward\(u, s\) returns \(y, s_next\), two tensors; it returned "
                                r"a Tensor"),
    "not_a_module": (NotAModule, r"an nn.Module with an int state_size >= 0; got function"),
    "complex_ops": (ComplexOps, r"real tensors and plain ops only .*; its forward formed a complex tensor \(complex\)"),
}


@pytest.fixture(scope="module")
def malformed():
    @lrnnx_zoo.hookimpl
    def lrnnx_zoo_register_layers(registry):
        for name, (cls, _) in CASES.items():
            registry.add_layer(name, cls)
        registry.add_layer("not_implemented", NotImplementedForm)
    plugin = types.ModuleType("tp_malformed_forms")
    plugin.lrnnx_zoo_register_layers = lrnnx_zoo_register_layers
    lrnnx_zoo.register_plugin(plugin, "malformed_forms")
    yield
    lrnnx_zoo.unregister_plugin("malformed_forms")


def _model(name):
    return lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer=name, d_input=1, d_output=1, d_model=4, n_layers=1))


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_broken_step_form_is_named_when_a_stream_or_a_graph_is_made(malformed, name, tmp_path):
    cls, expected = CASES[name]
    layer = lrnnx_zoo.create_layer(name, 4)
    with torch.no_grad():
        assert layer(torch.randn(2, 5, 4)).shape == (2, 5, 4)            # convolution mode is not its business
    with pytest.raises(StepFormError, match=rf"{cls.__name__}.step_form\(\) must return " + expected):
        layer.allocate_inference_cache(2)
    with pytest.raises(StepFormError, match=expected):
        _model(name).allocate_inference_cache(2)
    with pytest.raises(ExportError, match=r"blocks.0.layer \(" + cls.__name__ + r"\).step_form\(\) must return "
                       + expected):
        to_onnx(_model(name), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_an_unimplemented_step_form_says_so(malformed):
    with pytest.raises(NotImplementedError, match=r"NotImplementedForm.step_form\(\) is not implemented: step "
                                                  r"mode .* run a layer's step form"):
        lrnnx_zoo.create_layer("not_implemented", 4).allocate_inference_cache(1)


def test_every_registered_layers_form_passes_the_check():
    # the built-in forms (and any installed plugin's) keep to the contract they are held to
    for name in sorted(set(lrnnx_zoo.list_layers()) - set(CASES) - {"not_implemented"}):
        layer = lrnnx_zoo.create_layer(name, 6, d_state=4)
        check_step_form(layer.step_form(), f"{name}.step_form()", 6)


def test_a_form_that_is_no_stepform_subclass_keeps_its_state_in_a_sequence():
    # SequentialStepForm ran a plugin's own form (no StepForm base) as a stateless map: state_size 0,
    # and its (y, s) tuple handed to the next part
    from lrnnx_zoo.step_forms import SequentialStepForm
    a = torch.tensor([0.5, 0.9, 0.99, 0.2], dtype=torch.float64)
    lin = nn.Linear(4, 4)
    seq = SequentialStepForm(lin, _Form(a, 4))
    assert seq.state_size == 4
    u, s = torch.randn(3, 4), torch.randn(3, 4)
    with torch.no_grad():
        y, s_next = seq(u, s)
        expected = a.float() * s + (1 - a.float()) * lin(u)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(s_next, expected, rtol=0, atol=0)
