"""A third-party plugin author's mistakes, pushed through the whole pipeline (registry, SequenceModel,
export): each fails in one message naming the layer and saying what was expected and what came
back, instead of a torch error two modules later or an exporter's traceback."""

from __future__ import annotations

import functools
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


def test_a_step_form_that_squeezes_the_batch_is_named_at_batch_1(tmp_path):
    # passed the batch-2 trial, then failed as "L.step must give a tensor of its input's shape", as
    # "final_step_state returned shape (4,)" or in the exporter as "Dimension out of range"
    expected = (r"\(?Layer\)?.step_form\(\) must return a form whose forward\(u \(1, 4\), s \(1, 4\)\) returns y \(1, 4\) "
                r"and s_next \(1, 4\) \(state_size=4\); it returned y \(4,\) and s_next \(4,\)")
    with layers_registered("fuzz_squeeze", squeezes=_with_form(lambda y, s: (y.squeeze(), s.squeeze()))):
        model = _model("squeezes")
        with pytest.raises(StepFormError, match=expected):
            model.allocate_inference_cache(1)
        with pytest.raises(ExportError, match=expected):
            to_onnx(model, tmp_path / "m.onnx", batch=1)
    assert not list(tmp_path.iterdir())


class _SolveForm(_Form):
    """Right in eager torch, but ONNX has no linear solve."""

    def forward(self, u, s):
        s = self.a * s + (1 - self.a) * u
        s = torch.linalg.solve(2 * torch.eye(s.shape[1], dtype=s.dtype), 2 * s.T).T
        return s, s


class _BranchForm(_Form):
    """A branch on a tensor's value: torch.export cannot follow it."""

    def forward(self, u, s):
        s = self.a * s + (1 - self.a) * u
        if s.abs().max() > 1e30:
            s = s.clamp(-1e30, 1e30)
        return s, s


class _NumpyForm(_Form):
    """A step through numpy: torch.jit.trace records its result as a constant of the trace's batch."""

    def forward(self, u, s):
        s = torch.from_numpy(self.a.numpy() * s.detach().numpy()) + (1 - self.a) * u
        return s, s


class _BatchForm(_Form):
    """Its batch size as a Python number: every exporter bakes in the batch it traced at."""

    def forward(self, u, s):
        n = int(u.shape[0])
        s = self.a * s + (1 - self.a) * u
        return s.reshape(n, -1), s.reshape(n, -1)


def _layer_of(form_cls):
    class Layer(EMA):
        def step_form(self):
            return form_cls(torch.sigmoid(self.logit.double()))
    return Layer


@pytest.mark.parametrize("form_cls, export, expected", [
    (_SolveForm, to_onnx, r"^torch.onnx.export \(dynamo exporter\) could not export the step graph in blocks.1.layer "
                          r"\(Layer\).step_form\(\)'s forward: DispatchError: No ONNX function found for .*linalg_solve"),
    (_BranchForm, to_torch_export, r"^torch.export.export could not export the step graph in blocks.1.layer \(Layer\)"
                                   r".step_form\(\)'s forward: \w+: Could not guard on data-dependent expression"),
    (_SolveForm, functools.partial(to_onnx, opset=17),
     r"^torch.onnx.export \(legacy exporter\) could not export the step graph in blocks.1.layer \(Layer\)"
     r".step_form\(\)'s forward: UnsupportedOperatorError: Exporting the operator 'aten::linalg_solve'"),
    (_NumpyForm, to_torchscript, r"^the torchscript graph fails on the validation input of shape \(2, 256, 3\): "
                                 r"RuntimeError: The size of tensor a \(3\) must match .* Not written. blocks.1.layer "
                                 r"\(Layer\).step_form\(\) was traced at batch 3 and does not run the same at another "
                                 r"batch: .* Tracing warned: TracerWarning: Converting a tensor to a NumPy array"),
    # int(u.shape[0]): the dynamo exporter fixed the graph's batch, torch.export raised a constraint violation,
    # the TorchScript graph failed validation, none naming the layer
    (_BatchForm, to_onnx, r"^a dynamic batch was asked for \(batch=None\), but the exported graph fixes the batch of "
                          r".* to 3, the batch it was traced at: blocks.1.layer \(Layer\).step_form\(\) uses its "
                          r"batch size as a constant"),
    (_BatchForm, to_torch_export, r"^torch.export.export could not export the step graph in blocks.1.layer "
                                  r"\(Layer\).step_form\(\)'s forward: ConstraintViolationError: Constraints violated "
                                  r"\(batch\)! For more information, run with TORCH_LOGS=\"\+dynamic\". A step form"),
    (_BatchForm, to_torchscript, r"^the torchscript graph fails on the validation input of shape \(2, 256, 3\): "
                                 r"RuntimeError: shape '\[3, -1\]' is invalid .* Not written. blocks.1.layer \(Layer\)"
                                 r".step_form\(\) was traced at batch 3"),
    # and the legacy ONNX exporter's graph (opset <= 17) failed in ONNX Runtime, naming no layer either
    (_BatchForm, functools.partial(to_onnx, opset=17),
     r"^the exported graph fails in ONNX Runtime on the validation input of shape \(2, 256, 3\): .* Not written. "
     r"blocks.1.layer \(Layer\).step_form\(\) was traced at batch 3 and does not run the same at another batch"),
])
def test_an_exporter_failing_on_a_plugin_step_form_names_the_layer_in_one_line(form_cls, export, expected, tmp_path,
                                                                              capfd):
    # each came out as the exporter's pages of traceback ("submit a PR to PyTorch", "The following operation
    # failed in the TorchScript interpreter"), naming no layer; here the second block's form is the one
    with layers_registered("fuzz_export_ops", plain=EMA, odd=_layer_of(form_cls)):
        model = _model("plain")
        model.blocks[1].layer = lrnnx_zoo.create_layer("odd", 4)
        model.eval()
        y, cache = model.prefill(torch.randn(2, 5, 3))          # eager torch takes the form
        capfd.readouterr()
        with pytest.raises(ExportError, match=expected) as info:
            export(model, tmp_path / "m.out")
    assert len(str(info.value).splitlines()) == 1
    assert not list(tmp_path.iterdir())
    # and nothing before it: torch.export printed the partial graph (~110 lines) and symbolic_shapes a warning,
    # the legacy ONNX exporter the traced graph to stdout (~90 lines), and left its C++ log on for the process
    printed = capfd.readouterr()
    assert len(printed.err.splitlines()) <= 1, printed.err
    assert not printed.out, printed.out
    assert not torch._C._jit_is_onnx_log_enabled()


def test_a_third_party_kernel_backend_answering_out_of_contract_is_named():
    # s4d with a Vandermonde backend returning None failed inside the layer with "'NoneType' object has no
    # attribute 'to'", one returning a kernel of another length in the FFT convolution
    from lrnnx_zoo import PluginError, get_backend
    torch_vdm = get_backend("vandermonde", "torch")

    @lrnnx_zoo.hookimpl
    def lrnnx_zoo_register_kernel_backends(registry):
        registry.add_backend("vandermonde", "fz_none", lambda v, log_lam, L, conj=True: None)
        registry.add_backend("vandermonde", "fz_short", lambda v, log_lam, L, conj=True: torch_vdm(v, log_lam, L - 1, conj))
        registry.add_backend("vandermonde", "fz_good", lambda v, log_lam, L, conj=True: torch_vdm(v, log_lam, L, conj))
    plugin = types.ModuleType("tp_fuzz_backends")
    plugin.lrnnx_zoo_register_kernel_backends = lrnnx_zoo_register_kernel_backends
    lrnnx_zoo.register_plugin(plugin, "fuzz_backends")
    try:
        x = torch.randn(2, 9, 4)
        torch.manual_seed(0)
        want = lrnnx_zoo.create_layer("s4d", 4, d_state=4, backend="torch")(x)
        torch.manual_seed(0)
        torch.testing.assert_close(lrnnx_zoo.create_layer("s4d", 4, d_state=4, backend="fz_good")(x), want)
        for name, got in (("fz_none", "NoneType"), ("fz_short", r"a torch.float32 tensor of shape \(1, 4, 8\)")):
            layer = lrnnx_zoo.create_layer("s4d", 4, d_state=4, backend=name)
            with pytest.raises(PluginError, match=rf"^vandermonde backend '{name}' of plugin 'fuzz_backends' must be "
                                                  rf"fn\(v, log_lam, L, conj=True\) -> a tensor \(..., L\) for v "
                                                  rf"\(..., N\): .*, here a torch.float32 tensor of shape \(1, 4, 9\); "
                                                  rf"it returned {got}$"):
                layer(x)
    finally:
        lrnnx_zoo.unregister_plugin("fuzz_backends")


class _ChunkedForm(_Form):
    """A form with a chunk_form(T) of its own, returning what ``chunk`` makes of it."""

    chunk = None

    def chunk_form(self, T):
        return type(self).chunk(self, T)


def _one_step_only(form, T):
    class OneStep(nn.Module):
        state_size = form.state_size

        def forward(self, u, s):
            return form(u[:, -1], s)
    return OneStep()


def _raises(form, T):
    raise RuntimeError(f"no closed form for {T} steps")


@pytest.mark.parametrize("chunk, expected", [
    (lambda form, T: None, r"must return an nn.Module \(u \(B, 1, d_input\), s \(B, state_size\)\) -> \(y \(B, 1, "
                           r"d_output\), s_T\); it returned NoneType"),
    (_one_step_only, r"must return a module whose forward\(u \(2, 1, 4\), s \(2, 4\)\) returns y \(2, 1, 4\) and s_T "
                     r"\(2, 4\) in float32; it returned y \(2, 4\) and s_T \(2, 4\)"),
    (_raises, r"raised RuntimeError: no closed form for 1 steps"),
])
def test_a_plugin_forms_own_chunk_form_out_of_contract_is_named(chunk, expected, tmp_path):
    # failed as "'NoneType' object has no attribute 'modules'", inside torch.onnx ("shape '[4*s77, 4]' is
    # invalid"), or as the plugin's bare error
    form_cls = type("Form", (_ChunkedForm,), {"chunk": chunk})
    with layers_registered("fuzz_chunk_forms", own_chunks=_layer_of(form_cls)):
        model = _model("own_chunks")
        with pytest.raises(ExportError, match=r"^blocks.0.layer \(Layer\).step_form\(\).chunk_form\(1\) " + expected):
            to_onnx(model, tmp_path / "m.onnx", chunk=4)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("init, expected", [
    (lambda H, M: None, r"must return \(A, B\) tensors of shapes \(4, 3\), \(4, 3\) for d_model=4, d_state=6; got NoneType"),
    (lambda H, M: (-torch.ones(H, 2 * M, dtype=torch.cfloat), torch.ones(H, 2 * M, dtype=torch.cfloat)),
     r"must return \(A, B\) tensors of shapes \(4, 3\), \(4, 3\) .*; got \(\(4, 6\), \(4, 6\)\)"),
    (lambda H, M: (torch.ones(H, M, dtype=torch.cfloat), torch.ones(H, M, dtype=torch.cfloat)),
     r"must return finite A and B with Re\(A\) < 0 \(a stable system: S4D keeps log\(-Re A\)\); got Re\(A\) up to 1"),
])
def test_a_plugin_initializer_for_s4d_out_of_contract_is_named(init, expected):
    # None failed as "cannot unpack non-iterable NoneType object" (and "S4D takes ..."), (H, N) as a size
    # mismatch at the first forward, Re(A) >= 0 gave NaN outputs without a word
    @lrnnx_zoo.hookimpl
    def lrnnx_zoo_register_initializers(registry):
        registry.add_initializer("s4d", "fz_bad", init)
        registry.add_initializer("s4d", "fz_real", lambda H, M: (-torch.ones(H, M), torch.ones(H, M)))
    plugin = types.ModuleType("tp_fuzz_inits")
    plugin.lrnnx_zoo_register_initializers = lrnnx_zoo_register_initializers
    lrnnx_zoo.register_plugin(plugin, "fuzz_inits")
    try:
        assert torch.isfinite(lrnnx_zoo.create_layer("s4d", 4, d_state=6, init="fz_real")(torch.randn(1, 5, 4))).all()
        for layer, kw in (("s4d", {}), ("fftconv", {"kernel_type": "s4d"})):
            with pytest.raises(ValueError, match=r"^the s4d initializer 'fz_bad' " + expected):
                lrnnx_zoo.create_layer(layer, 4, d_state=6, init="fz_bad", **kw)
    finally:
        lrnnx_zoo.unregister_plugin("fuzz_inits")


def test_a_plugin_initializer_for_lru_out_of_contract_is_named():
    # the same for LRU's ring initializers: "cannot unpack non-iterable NoneType object"
    @lrnnx_zoo.hookimpl
    def lrnnx_zoo_register_initializers(registry):
        registry.add_initializer("lru", "fz_bad", lambda N, r_min, r_max, max_phase: None)
    plugin = types.ModuleType("tp_fuzz_lru_inits")
    plugin.lrnnx_zoo_register_initializers = lrnnx_zoo_register_initializers
    lrnnx_zoo.register_plugin(plugin, "fuzz_lru_inits")
    try:
        for layer, kw, size in (("lru", {}, r"d_state=6"), ("fftconv", {"kernel_type": "lru"}, r"d_model \* d_state=24")):
            with pytest.raises(ValueError, match=r"^the lru initializer 'fz_bad' must return \(nu_log, theta_log\) "
                                                 rf"tensors of shapes \(\d+,\), \(\d+,\) for {size}; got NoneType"):
                lrnnx_zoo.create_layer(layer, 4, d_state=6, init="fz_bad", **kw)
    finally:
        lrnnx_zoo.unregister_plugin("fuzz_lru_inits")


def test_a_plugin_ssm_kernel_answering_out_of_contract_is_named():
    # a kernel returning L - 1 taps was taken as given (fftconv's output silently off its own step form);
    # K alone or (H, C, L) failed in the convolution: "start (0) + length (4) exceeds dimension size (2)"
    from test_third_party_kernel import DecayKernel

    def variant(name, change):
        return type(name, (DecayKernel,), {"forward": lambda self, L, rate=1.0, state=None:
                                           change(*DecayKernel.forward(self, L, rate, state))})
    kernels = {"fz_short": (variant("Short", lambda K, Ks: (K[..., :-1], Ks)), r"\(2, 4, 8\), NoneType"),
               "fz_swapped": (variant("Swapped", lambda K, Ks: (K.transpose(0, 1), Ks)), r"\(4, 2, 9\), NoneType"),
               "fz_k_only": (variant("KOnly", lambda K, Ks: K), r"Tensor")}

    @lrnnx_zoo.hookimpl
    def lrnnx_zoo_register_kernel_backends(registry):
        for name, (cls, _) in kernels.items():
            registry.add_backend("ssm_kernel", name, cls)
    plugin = types.ModuleType("tp_fuzz_kernels")
    plugin.lrnnx_zoo_register_kernel_backends = lrnnx_zoo_register_kernel_backends
    lrnnx_zoo.register_plugin(plugin, "fuzz_kernels")
    try:
        for name, (cls, got) in kernels.items():
            layer = lrnnx_zoo.create_layer("fftconv", 4, d_state=4, kernel_type=name, channels=2)
            for grad in (True, False):              # training's kernel and inference's cached spectrum
                with torch.set_grad_enabled(grad), pytest.raises(
                        TypeError, match=rf"^{cls.__name__}.forward\(L=9, rate, state\) must return \(K \(C=2, H=4, L=9\) "
                                         rf"\(its channels, d_model\), K_state \(batch, C, H, L\) given a state, else "
                                         rf"None\); it returned {got}$"):
                    layer(torch.randn(2, 9, 4))
    finally:
        lrnnx_zoo.unregister_plugin("fuzz_kernels")


class _SharedGain(lrnnx_zoo.LTI_LRNN):
    """y = g u, whose step form holds the layer's own Parameter instead of a stored copy."""

    def __init__(self, d_model, d_state=1):
        super().__init__("no_discretization")
        self.d_model = d_model
        self.g = nn.Parameter(torch.full((d_model,), 1.5))

    def forward(self, x, integration_timesteps=None, lengths=None):
        return self.g * self.prepare_input(x, lengths, integration_timesteps)

    def step_form(self):
        form = nn.Module()
        form.g, form.state_size = self.g, 0          # the Parameter itself
        form.forward = lambda u, s: (form.g * u, s)
        return form


def test_a_step_form_holding_the_layers_parameter_leaves_the_layer_as_it_was():
    # form.to(dtype) converted the shared Parameter: a float64 layer's float32 cache turned the layer's
    # weight float32, and its steps' outputs required grad
    layer = _SharedGain(4).double()
    cache = layer.allocate_inference_cache(2, dtype=torch.float32)
    assert layer.g.dtype == torch.float64 and isinstance(layer.g, nn.Parameter)
    y, cache = layer.step(torch.randn(2, 4), cache)
    assert y.dtype == torch.float32 and not y.requires_grad
    with torch.no_grad():
        layer.g.mul_(2)
    assert float(cache["step_form"].g[0]) == 1.5                # a snapshot of the weights it was made from


def _generator_hook(registry):
    registry.add_layer("fz_never", nn.Identity)
    yield                                               # a stray yield: a call runs none of the body


async def _async_hook(registry):
    registry.add_layer("fz_never", nn.Identity)


@pytest.mark.parametrize("hook", [_generator_hook, _async_hook])
def test_a_generator_or_async_hook_fails_its_plugin_instead_of_registering_nothing(hook):
    # loaded "ok" having registered nothing (an async one warned 'coroutine ... was never awaited'), and
    # its layers were then "unknown"
    plugin = types.ModuleType("tp_fuzz_deferred")
    plugin.lrnnx_zoo_register_layers = lrnnx_zoo.hookimpl(hook)
    with pytest.raises(lrnnx_zoo.PluginError, match=r"plugin 'tp_fuzz_deferred' failed: hook _(generator|async)_hook "
                                                    r"is a generator or async function, whose body a call does not run"):
        lrnnx_zoo.register_plugin(plugin)
    assert "fz_never" not in lrnnx_zoo.list_layers()
    assert "tp_fuzz_deferred" not in [p.name for p in lrnnx_zoo.list_plugins()]


def test_at_rate_names_a_plugin_layer_without_resample():
    # a layer of a plugin's own making (no LTI_LRNN) failed as "'Lengthy' object has no attribute 'resample_'"
    from plugin_fixtures import LoopRecurrence
    with layers_registered("fuzz_rate", loop_rate=LoopRecurrence):
        model = _model("loop_rate")
        with pytest.raises(NotImplementedError, match=r"^blocks.0.layer \(LoopRecurrence\) has no resample_\(rate\), so "
                                                      r"the model cannot run at another rate"):
            model.at_rate(2)


class _MisFormed(EMA):
    """Its step form runs a^2 where forward runs a: a plugin's bug among built-in layers."""

    def step_form(self):
        return _ema.EmaStep(torch.sigmoid(self.logit) ** 2)


def test_a_failed_validation_names_the_layer_whose_step_form_disagrees(tmp_path):
    # said "the layer's step_form() and its forward disagree" without saying which of the model's layers
    from lrnnx_zoo.export import ValidationError
    from lrnnx_zoo.export.validate import disagreeing_layer
    for name in ("s4d", "lru", "s4", "fftconv"):          # every built-in layer's form agrees with its forward
        model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer=name, d_input=3, d_output=2, d_model=4, n_layers=2,
                                                              layer_kwargs={"d_state": 4}))
        assert disagreeing_layer(model.double().eval()) is None, name
    with layers_registered("fuzz_misformed", misformed=_MisFormed):
        model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer="s4d", d_input=3, d_output=2, d_model=4, n_layers=3,
                                                              layer_kwargs={"d_state": 4})).eval()
        model.blocks[1].layer = lrnnx_zoo.create_layer("misformed", 4)
        with pytest.raises(ValidationError, match=r"Not written. blocks.1.layer \(_MisFormed\), \S+ \(relative\) off its "
                                                  r"forward stepped alone: its step_form\(\) and its forward disagree.$"):
            to_onnx(model, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


class _InlineFormLayer(EMA):
    """Its step form's class is defined inside step_form(): a new class object at every call."""

    def step_form(self):
        class Form(_Form):
            pass
        return Form(torch.sigmoid(self.logit.double()))


def test_a_form_class_defined_inside_step_form_hands_its_state_over():
    # two forms of the same weights were taken for forms of other weights (same_form compared the class
    # objects): state_from_cache and cache_from_state refused a fresh cache, "weights changed since ... prefill again"
    from lrnnx_zoo.export import cache_from_state, state_from_cache
    with layers_registered("fuzz_inline_forms", inline_form=_InlineFormLayer):
        model = _model("inline_form")
        x = torch.randn(2, 6, 3)
        with torch.no_grad():
            y, cache = model.prefill(x[:, :4])
            state = state_from_cache(model, cache)
            resumed = cache_from_state(model, state)
            y_t, _ = model.step(x[:, 4], resumed)
            torch.testing.assert_close(y_t, model(x[:, :5])[:, 4], rtol=1e-5, atol=1e-6)


class _InPlaceForm(torch.nn.Module):
    """An EMA form updating its state argument in place (s.mul_ ... s.add_), returning it."""

    def __init__(self, a):
        super().__init__()
        self.register_buffer("a", stored(a))
        self.state_size = a.shape[0]

    def forward(self, u, s):
        s.mul_(self.a).add_((1 - self.a) * u)
        return s.clone(), s


def test_a_step_form_changing_its_state_in_place_is_named(tmp_path):
    # passed validation, and the TorchScript and torch.export graphs then changed the caller's state
    # tensor as well: a stream branched from a kept state (a beam, a retry) silently ran from another one
    class Layer(EMA):
        def step_form(self):
            return _InPlaceForm(torch.sigmoid(self.logit.double()))

    expected = (r"step_form\(\) must return a form whose forward\(u, s\) leaves u and s as they were \(return new "
                r"tensors\); it changed s in place")
    with layers_registered("fuzz_in_place", in_place=Layer):
        model = _model("in_place")
        with pytest.raises(StepFormError, match=r"^Layer." + expected):
            model.allocate_inference_cache(2)
        for export in (to_onnx, to_torchscript, to_torch_export):
            with pytest.raises(ExportError, match=r"blocks.0.layer \(Layer\)." + expected):
                export(model, tmp_path / "m.out")
    assert not list(tmp_path.iterdir())
