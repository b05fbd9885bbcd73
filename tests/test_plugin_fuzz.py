"""A third-party plugin author's mistakes, pushed through the whole pipeline (registry, SequenceModel,
export): each fails in one message naming the layer and saying what was expected and what came
back, instead of a torch error two modules later or an exporter's traceback."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import lrnnx_zoo
from lrnnx_zoo.export import ExportError, to_onnx, to_torch_export, to_torchscript
from lrnnx_zoo.step_forms import StepFormError, stored
from plugin_fixtures import GOOD_PLUGIN, layers_registered

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_ema = types.ModuleType("tp_ema_fuzz")
exec(GOOD_PLUGIN.replace("{layer_name}", "ema_fuzz"), _ema.__dict__)
EMA = _ema.EMA


class _Form(nn.Module):
    """s' = a s + (1 - a) u, y = s', then ``out`` applied to (y, s') (the mistake under test)."""

    def __init__(self, a: torch.Tensor, out=lambda y, s: (y, s)) -> None:
        super().__init__()
        self.register_buffer("a", stored(a))
        self.state_size = a.shape[0]
        self.out = out

    def forward(self, u, s):
        s = self.a * s + (1 - self.a) * u
        return self.out(s, s)


def _with_form(out):
    class Layer(EMA):
        def step_form(self):
            return _Form(torch.sigmoid(self.logit.double()), out)
    return Layer


def _model(name: str, **kw) -> lrnnx_zoo.SequenceModel:
    return lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer=name, d_input=3, d_output=2, d_model=4, n_layers=2,
                                                         **kw)).eval()


WRONG_DTYPES = {
    "y_float64": (lambda y, s: (y.double(), s), "y torch.float64 and s_next torch.float32"),
    "y_half": (lambda y, s: (y.half(), s), "y torch.float16 and s_next torch.float32"),
    "y_int": (lambda y, s: (y.round().long(), s), "y torch.int64 and s_next torch.float32"),
    "state_float64": (lambda y, s: (y, s.double()), "y torch.float32 and s_next torch.float64"),
}


@pytest.mark.parametrize("case", sorted(WRONG_DTYPES))
def test_a_step_form_answering_in_another_dtype_is_named(case, tmp_path):
    # passed the form check, then failed in the next block ("mat1 and mat2 must have the same dtype"), in
    # gelu ("not implemented for 'Long'"), in ONNX shape inference, or (a float64 state) blamed the
    # caller's x at the next step
    out, got = WRONG_DTYPES[case]
    expected = (r"step_form\(\) must return a form whose forward\(u, s\) returns y and s_next in the dtype of u "
                r"and s \(torch.float32, its buffers'\); it returned " + got)
    with layers_registered("fuzz_dtypes", wrong_dtype=_with_form(out)):
        model = _model("wrong_dtype")
        with pytest.raises(StepFormError, match=r"^Layer." + expected):
            model.allocate_inference_cache(2)
        with pytest.raises(StepFormError, match=expected):
            model.prefill(torch.randn(2, 5, 3))
        for export in (to_onnx, to_torchscript, to_torch_export):
            with pytest.raises(ExportError, match=r"blocks.0.layer \(Layer\)." + expected):
                export(model, tmp_path / "m.out")
    assert not list(tmp_path.iterdir())


class _Float64Forward(EMA):
    def forward(self, x, integration_timesteps=None, lengths=None):
        return super().forward(x, integration_timesteps, lengths).double()


def test_a_layer_answering_in_another_dtype_is_named():
    # a float64 output of a float32 layer failed in the block's Linear: "expected m1 and m2 to have the same dtype"
    with layers_registered("fuzz_forward_dtype", f64_forward=_Float64Forward):
        model = _model("f64_forward")
        for run in (model, model.prefill):
            with pytest.raises(TypeError, match=r"_Float64Forward.(forward|prefill) must give a tensor of its "
                                                r"input's dtype \(torch.float32\) to SequenceModel, got torch.float64"):
                run(torch.randn(2, 5, 3))


def test_an_int8_graph_off_by_more_than_its_tolerance_blames_the_quantisation(monkeypatch, tmp_path):
    # the float graph had just passed, yet the message said "the layer's step_form() and its forward
    # disagree": a plugin author went looking for a bug in a correct step form
    from lrnnx_zoo.export import ValidationError, onnx_export
    monkeypatch.setattr(onnx_export, "INT8_RELATIVE_TOLERANCE", 1e-9)
    with layers_registered("fuzz_int8", ema_int8=EMA):
        with pytest.raises(ValidationError, match=r"^onnxruntime-int8 step graph disagrees .* Not written. The float32 "
                                                  r"graph passed; int8 quantisation of the dense layers") as info:
            to_onnx(_model("ema_int8"), tmp_path / "q.onnx", quantize="int8")
    assert "step_form" not in str(info.value)
    assert not list(tmp_path.iterdir())
