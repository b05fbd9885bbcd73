"""Device handling, checked without a GPU on PyTorch's "meta" device.

A meta tensor has a shape, a dtype and a device but no data, and an op that mixes it with a
CPU tensor fails with a device mismatch, just as mixing a CUDA tensor with a CPU one does. So a
module moved to meta and run there finds every tensor that our code creates on the CPU instead
of on its inputs' or parameters' device (what would break on CUDA), every non-CPU arm of a
device-type branch runs, and nothing is computed (the tests are fast).

A few ops have no meta kernel because their result is data: ``Tensor.item()`` (int(), float(),
bool() of a tensor), ``torch.equal`` and boolean-mask indexing. Where our code uses them, the
tests step around them (``on_meta``, the ``s4_auto`` fixture) instead of skipping: the kernel
cache compares parameters with torch.equal (switched off), and S4's step mode "auto" predicts the
diagonal form's float32 error with float() (replaced by a fixed verdict, each arm tested). S4's
internal length is a Python int beside its buffer, so it needs no help. Padded batches pass
``lengths`` on the CPU (validating them needs their values).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo import SequenceModel
from lrnnx_zoo.kernels import cauchy, cauchy_shared, keops_support, vandermonde
from lrnnx_zoo.models import ModelConfig
from lrnnx_zoo.plugins.fftconv import FFTConvS4
from lrnnx_zoo.plugins.s4 import S4
from lrnnx_zoo.ssm_kernel import SSMKernel
from lrnnx_zoo.step_forms import DiagonalStepForm

META = torch.device("meta")
LAYERS = lrnnx_zoo.list_layers()
DTYPES = [torch.float32, torch.float64]
H, N, L, B = 4, 4, 8, 2
s4_step = importlib.import_module("lrnnx_zoo.plugins.s4.step")
s4_modes = importlib.import_module("lrnnx_zoo.plugins.s4.modes")


def on_meta(module: torch.nn.Module) -> torch.nn.Module:
    """module.to("meta"), stepping around the ops without meta kernels (module docstring)."""
    module = module.to(META)
    for sub in module.modules():
        if isinstance(sub, SSMKernel):
            sub.cache_inference_kernel = False                 # torch.equal
    return module


@pytest.fixture
def s4_auto(request, monkeypatch):
    """S4's "auto" step mode without its float() error prediction: the diagonal form accepted
    ("diagonal"), or refused ("fallback", the default: then the linear form for bilinear, the
    dense form for zoh). Tests that hold an S4 kernel run both (``with_s4_auto``)."""
    if getattr(request, "param", "fallback") == "diagonal":
        monkeypatch.setattr(s4_step, "diagonal_error", lambda *args, **kwargs: 0.0)
    else:
        def refuse(*args, **kwargs):
            raise s4_step.DiagonalAccuracyError("refused for the test")
        monkeypatch.setattr(s4_modes, "diagonal_form", refuse)
    return request.param


def with_s4_auto(argnames: str, cases):
    """Parametrize ``argnames`` + s4_auto over ``cases`` (tuples whose first item names the
    layer or kernel): both arms of S4's "auto" for cases that hold an S4 kernel, one otherwise."""
    params = []
    for case in cases:
        has_s4 = case[0] == "s4" or (len(case) > 1 and isinstance(case[1], dict) and case[1].get("kernel_type") == "s4")
        label = "-".join([str(case[0])] + [f"{k}={v}" for k, v in (case[1].items() if len(case) > 1 else [])])
        for choice in (("diagonal", "fallback") if has_s4 else ("fallback",)):
            params.append(pytest.param(*case, choice, id=label + (f"-{choice}" if has_s4 else "")))
    return pytest.mark.parametrize(argnames + ",s4_auto", params, indirect=["s4_auto"])


def meta(*shape: int, dtype: torch.dtype = torch.float32, grad: bool = False) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device=META, requires_grad=grad)


def complex_of(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


# -- every registered layer ----------------------------------------------------------------------

EXTRA = {"lru": [{"backend": "fft"}, {"backend": "scan"}],
         "s4d": [{"discretization": "bilinear"}, {"backend": "torch"}],
         "s4": [{"discretization": "zoh"}, {"backend": "torch", "rank": 2, "measure": "legt"}],
         "fftconv": [{"kernel_type": "lru"}, {"kernel_type": "s4"}, {"channels": 2}]}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@with_s4_auto("name,kw", [(name, kw) for name in LAYERS for kw in [{}] + EXTRA.get(name, [])])
def test_registered_layer_runs_on_meta(name, kw, s4_auto, dtype):
    """Forward + backward (padded batch too), inference forward, kernel, step form and steps."""
    torch.manual_seed(0)
    layer = on_meta(lrnnx_zoo.create_layer(name, H, d_state=N, **kw).to(dtype))
    x = meta(B, L, H, dtype=dtype, grad=True)
    y = layer(x)
    assert y.shape == (B, L, H) and y.device == META
    y.sum().backward()
    assert x.grad.device == META
    assert all(p.grad is None or p.grad.device == META for p in layer.parameters())
    layer(x, lengths=torch.tensor([L, L // 2])).sum().backward()
    with torch.no_grad():
        assert layer.eval()(meta(B, L, H, dtype=dtype)).device == META
    assert layer.compute_kernel(L)[0].device == META
    cache = layer.allocate_inference_cache(B)
    assert cache["lrnn_state"].device == META
    for _ in range(2):
        y_t, cache = layer.step(meta(B, H, dtype=dtype), cache)
    assert y_t.shape == (B, H) and y_t.device == META and y_t.dtype == dtype


@with_s4_auto("layer", [(name,) for name in LAYERS])
def test_sequence_model_runs_on_meta(layer, s4_auto):
    """Forward + backward (with padding and each pooling), then streaming step by step."""
    for pooling, norm in ((None, "layer"), ("mean", "batch"), ("last", "layer")):
        cfg = ModelConfig(layer=layer, d_input=3, d_output=5, d_model=H, n_layers=2, layer_kwargs={"d_state": N},
                          pooling=pooling, norm=norm)
        torch.manual_seed(0)
        model = on_meta(SequenceModel(cfg))
        out = model(meta(B, L, 3))
        out.sum().backward()
        if norm == "layer":   # (a training batch norm picks valid steps by boolean indexing: no meta kernel)
            model(meta(B, L, 3), lengths=torch.tensor([L, 3])).sum().backward()
        model.eval()
        cache = model.allocate_inference_cache(B)
        for _ in range(2):
            y_t, cache = model.step(meta(B, 3), cache)
        assert y_t.shape == (B, 5) and y_t.device == META


# -- FFTConvS4 and the standalone S4 block -------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@with_s4_auto("kernel_type", [("s4d",), ("lru",), ("s4",)])
def test_fftconv_state_passing_and_step_on_meta(kernel_type, s4_auto, dtype):
    torch.manual_seed(0)
    conv = on_meta(FFTConvS4(H, channels=2, kernel_type=kernel_type, param_config={"d_state": N}).to(dtype))
    state = conv.default_state(B)
    assert state.device == META and state.dtype == complex_of(dtype)
    x = meta(B, H, L, dtype=dtype, grad=True)
    y, next_state = conv(x, state=state)
    assert y.shape == (B, 2 * H, L) and next_state.shape == state.shape and next_state.device == META
    (y.sum() + next_state.abs().sum()).backward()
    with torch.no_grad():
        conv(meta(B, H, L, dtype=dtype), state=state)
    y_t, s = conv.step(meta(B, H, dtype=dtype), state)                     # the kernel's state
    assert y_t.shape == (B, 2 * H) and s.device == META and s.shape == state.shape
    packed = torch.zeros(B, conv._step.state_size, dtype=dtype, device=META)
    y_t, s = conv.step(meta(B, H, dtype=dtype), packed)                     # the step form's real state
    assert s.device == META and s.shape == packed.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kw", [{}, {"discretization": "zoh"}, {"channels": 2, "transposed": False}],
                         ids=["bilinear", "zoh", "channels2-untransposed"])
def test_standalone_s4_on_meta(kw, dtype):
    torch.manual_seed(0)
    s4 = on_meta(S4(H, d_state=N, **kw).to(dtype))
    shape = (B, H, L) if kw.get("transposed", True) else (B, L, H)
    y, _ = s4(meta(*shape, dtype=dtype, grad=True))
    y.sum().backward()
    y, next_state = s4(meta(*shape, dtype=dtype, grad=True), state=s4.default_state(B))
    assert next_state.device == META
    (y.sum() + next_state.abs().sum()).backward()
    s4(meta(*shape, dtype=dtype, grad=True), rate=0.5)[0].sum().backward()
    for mode in ("dense", "diagonal") + (("linear",) if kw.get("discretization", "bilinear") == "bilinear" else ()):
        s4.setup_step(mode, tol=math.inf)
        state = s4.default_state(B)
        y_t, state = s4.step(meta(B, H, dtype=dtype), state)
        assert y_t.shape == (B, H) and y_t.device == META and state.device == META


def test_kernel_cache_does_not_hand_out_another_devices_kernel():
    """The inference kernel cache compares the parameters' devices too: after .to(device) the
    cached CPU kernel no longer matches (decided before any value comparison), and the next
    inference forward computes one on the new device."""
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("s4d", H, d_state=N).eval()
    with torch.no_grad():
        layer(torch.randn(B, L, H))
        snapshot = layer.kernel.__dict__["_kernel_cache"][0]
        assert layer.kernel._same_contents(snapshot)
        layer.to(META)
        assert not layer.kernel._same_contents(snapshot)
        layer.kernel.cache_inference_kernel = False          # (its later lookups use torch.equal)
        assert layer(meta(B, L, H)).device == META


# -- regressions -----------------------------------------------------------------------------------

def test_diagonal_step_form_without_skip_on_the_inputs_device():
    """DiagonalStepForm(D=None) built its zero skip matrix on the CPU: on CUDA inputs the fused
    matrix (Q R + S) failed with a device mismatch."""
    M, Hin, Hout = 3, 2, 5
    lam = torch.empty(M, dtype=torch.complex128, device=META)
    form = DiagonalStepForm(lam, torch.empty(M, Hin, dtype=torch.complex128, device=META),
                            torch.empty(Hout, M, dtype=torch.complex128, device=META))
    assert all(b.device == META for b in form.buffers())
    y, s = form(meta(B, Hin), meta(B, 2 * M))
    assert y.shape == (B, Hout) and s.shape == (B, 2 * M)


@pytest.fixture
def keops_cpu_only(monkeypatch):
    """A pykeops that builds CPU kernels but no GPU ones (no CUDA libraries), "auto" told to pick
    keops at any size on the accelerator ("meta" here), and the keops entry points booby-trapped."""
    probed = []

    def probe(device_type="cpu"):
        probed.append(device_type)
        return (True, None) if device_type == "cpu" else (False, "CUDA libraries not found")

    monkeypatch.delenv(keops_support.DISABLE_ENV_VAR, raising=False)
    monkeypatch.setattr(keops_support, "_probe", probe)
    keops_support.reset_keops_cache()
    monkeypatch.setitem(cauchy_shared.KEOPS_MIN_TERMS, "meta", 0)
    monkeypatch.setitem(vandermonde._KEOPS_MIN_TERMS, "meta", 0)

    def boom(*args, **kwargs):
        raise AssertionError("auto chose keops on a device where it cannot run")
    for mod, name in ((cauchy_shared, "cauchy_conj_keops"), (cauchy, "cauchy_conj_keops"),
                      (vandermonde, "vandermonde_keops")):
        monkeypatch.setattr(mod, name, boom)
    yield probed
    keops_support.reset_keops_cache()


def test_auto_backends_ask_keops_about_the_tensors_device(keops_cpu_only):
    """"auto" took the CPU probe's verdict for every device: on a GPU it picked keops (the S4
    Cauchy kernel at any size) although pykeops could build CPU kernels only, and failed."""
    v = torch.empty(3, 6, dtype=torch.complex64, device=META)
    w = torch.empty(3, 6, dtype=torch.complex64, device=META)
    z = torch.empty(5, dtype=torch.complex64, device=META)
    assert cauchy_shared.cauchy_conj_auto(v, z, w).shape == (3, 5)
    assert cauchy.cauchy_conj(v, z, w).shape == (3, 5)
    assert vandermonde.vandermonde(v, w, 7).shape == (3, 7)
    assert "meta" in keops_cpu_only and keops_support.keops_available() is True
    assert keops_support.keops_available(META) is False


def test_keops_availability_is_per_device_type(keops_cpu_only):
    assert keops_support.keops_available("cpu") is True
    assert keops_support.keops_available("cuda:0") is False
    assert keops_support.keops_unavailable_reason(torch.device("cuda", 1)) == "CUDA libraries not found"
    assert keops_support.keops_unavailable_reason() is None
    assert keops_cpu_only.count("cuda") == 1                                  # cached per type
    with pytest.raises(RuntimeError, match="not usable here on cuda: CUDA libraries not found.*torch"):
        keops_support.require_keops("test feature", "cuda")
    keops_support.require_keops("test feature")                              # the CPU is fine


def test_keops_probe_refuses_devices_keops_cannot_run_on():
    ok, reason = keops_support._probe("meta")
    assert not ok and "cpu and cuda only" in reason


@with_s4_auto("kernel_type", [("s4d",), ("lru",), ("s4",)])
def test_fftconv_step_form_follows_device_move_and_cast(kernel_type, s4_auto):
    """FFTConvS4 keeps its step form out of the module tree; after a step on the CPU, .to(device)
    left it there and the next step failed with a device mismatch (model.cuda() after a CPU check),
    and .double() left float32 matrices under float64 steps."""
    torch.manual_seed(0)
    conv = FFTConvS4(H, kernel_type=kernel_type, param_config={"d_state": N})
    x = torch.randn(B, H)
    conv.step(x, conv.default_state(B))
    y64, _ = conv.double().step(x.double(), conv.default_state(B))
    assert y64.dtype == torch.float64 and all(b.dtype == torch.float64 for b in conv._step.buffers())
    conv.float()
    y, _ = conv.step(x, conv.default_state(B))
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    conv = on_meta(conv)
    y, s = conv.step(meta(B, H), conv.default_state(B))
    assert y.device == META and s.device == META


@pytest.mark.parametrize("mode", ["dense", "linear", "diagonal"])
def test_s4_step_form_follows_device_move(mode):
    """S4.setup_step's form (and the diagonal mode's eigenbasis) stayed on the CPU after .to()."""
    torch.manual_seed(0)
    s4 = S4(H, d_state=N)
    s4.setup_step(mode, tol=math.inf)
    s4.step(torch.randn(B, H), s4.default_state(B))
    s4 = on_meta(s4)
    y, state = s4.step(meta(B, H), s4.default_state(B))
    assert y.device == META and state.device == META
    if mode == "diagonal":
        assert s4.kernel._basis.device == META
        x_kernel = torch.zeros(B, H, N // 2, dtype=torch.complex64, device=META)     # NPLR-basis state
        assert s4.kernel.unpack_state(s4.kernel.pack_state(x_kernel)).device == META


def test_s4_kernel_with_an_internal_length_on_meta():
    """S4's internal length is read from its Python copy, not with int() of the buffer: a kernel
    whose C holds C~ moves to meta as it is, and a longer L doubles it there, copy and buffer together."""
    from lrnnx_zoo.plugins.s4.kernel import HippoSSKernel
    torch.manual_seed(0)
    kernel = on_meta(HippoSSKernel(H, N=N, L=4))
    assert kernel.length == 4 and kernel.L.device == META
    K, _ = kernel(L=2 * L)
    assert K.shape == (1, H, 2 * L) and K.device == META and kernel.length == 2 * L
