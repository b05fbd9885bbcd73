"""The contract every registered layer keeps, whoever registered it (timm-style: one test
parametrised over the registry, so a new layer is checked the moment it registers).

Tolerances: float32 comparisons between modes use 1e-4 relative to max|y| over L=1024: the modes
round differently (FFT vs recurrence) and the error of a float32 FFT of length 2L grows like
eps * log(L) * ||K||_1, about 1e-6..1e-5 here; 1e-4 leaves room without hiding a wrong formula,
which shows up as O(1) errors.
"""

from __future__ import annotations

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo.step_forms import check_step_form

LAYERS = lrnnx_zoo.list_layers()
H, N = 16, 8


def make(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return lrnnx_zoo.create_layer(name, H, d_state=N, **kw).eval()


def run_steps(layer, x: torch.Tensor) -> torch.Tensor:
    cache = layer.allocate_inference_cache(x.shape[0])
    ys = []
    for t in range(x.shape[1]):
        y, cache = layer.step(x[:, t], cache)
        ys.append(y)
    return torch.stack(ys, 1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_builtin_families_registered():
    assert {"lru", "s4d"} <= set(LAYERS)


@pytest.mark.parametrize("name", LAYERS)
def test_shapes_and_interface(name):
    layer = make(name)
    y = layer(torch.randn(3, 50, H))
    assert isinstance(y, torch.Tensor) and y.shape == (3, 50, H) and y.dtype == torch.float32
    form = layer.step_form()
    assert isinstance(form.state_size, int) and form.state_size > 0
    s = torch.zeros(3, form.state_size)
    y_t, s_next = form(torch.randn(3, H), s)
    assert y_t.shape == (3, H) and s_next.shape == s.shape
    for t in list(form.buffers()):
        assert not t.is_complex(), "step forms carry real tensors only (ONNX has no complex dtype)"


@pytest.mark.parametrize("name", ["fftconv", "lru", "s4", "s4d"])
@pytest.mark.parametrize("grad", [False, True])
def test_builtin_layers_give_contiguous_outputs(name, grad):
    # A (B, H, L) result handed back as a transposed (B, L, H) view made the next layers (an
    # activation, a Linear) and their backward copy with a row-sized stride: a block of S4D, GELU
    # and Linear trained 1.4x slower at (8, 1024, 128). The training path (grad) is the one that did.
    layer = make(name).train(grad)
    x = torch.randn(3, 50, H, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        y = layer(x)
    assert y.is_contiguous(), f"{name}: y strides {y.stride()} for shape {tuple(y.shape)}"


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("shape", [(0, 10, H), (2, 0, H)], ids=["empty batch", "empty sequence"])
def test_empty_input_gives_an_empty_output(name, shape):
    layer = make(name)
    x = torch.randn(*shape)
    with torch.no_grad():
        assert layer(x).shape == shape
    y = layer(x.requires_grad_())
    assert y.shape == shape
    y.sum().backward()                                   # the graph holds (with zero gradients)
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("name", LAYERS)
def test_integer_input_is_refused_clearly(name):
    with pytest.raises(TypeError, match="floating-point input.*torch.int64"):
        make(name)(torch.ones(2, 5, H, dtype=torch.long))


# float32 over L=1024 to 1e-4 (module docstring). float64 over L=256 to 1e-10: a float64 layer's
# step form is built from the float64 discretisation in float64 (not built in float32 and
# converted) and the cache defaults to the parameters' dtype, so the modes agree to ~1e-13 (FFT
# rounding eps * log L), where float32 forms would leave ~1e-6.
@pytest.mark.parametrize("dtype, L, tol", [(torch.float32, 1024, 1e-4), (torch.float64, 256, 1e-10)],
                         ids=["float32-L1024", "float64-L256"])
@pytest.mark.parametrize("name", LAYERS)
def test_convolution_matches_step_mode(name, dtype, L, tol):
    layer = make(name).to(dtype)
    x = torch.randn(2, L, H, dtype=dtype)
    with torch.no_grad():
        y_conv = layer(x)
        y_step = run_steps(layer, x)
    assert y_step.dtype == dtype
    assert rel_err(y_step, y_conv) < tol


@pytest.mark.parametrize("name", LAYERS)
def test_causal(name):
    layer = make(name)
    x = torch.randn(2, 64, H)
    x2 = x.clone()
    x2[:, 40] += 10.0
    with torch.no_grad():
        y, y2 = layer(x), layer(x2)
    torch.testing.assert_close(y[:, :40], y2[:, :40], rtol=0, atol=1e-5)
    assert (y[:, 40:] - y2[:, 40:]).abs().max() > 1e-3


def _accepts(name: str, arg: str) -> bool:
    import inspect
    from lrnnx_zoo.registry import get_layer_class
    return arg in inspect.signature(get_layer_class(name).__init__).parameters


# Bidirectional variants too, wherever a layer offers one: their reverse pass must start at each
# sequence's own end, which only a padded batch shows.
LENGTH_CASES = [(n, {}) for n in LAYERS] + [(n, {"bidirectional": True}) for n in LAYERS if _accepts(n, "bidirectional")]


@pytest.mark.parametrize("name,kw", LENGTH_CASES)
def test_lengths_padded_batch_equals_alone(name, kw):
    layer = make(name, **kw)
    lengths = torch.tensor([30, 64, 7])
    x = torch.randn(3, 64, H)
    with torch.no_grad():
        y = layer(x, lengths=lengths)
        for b, n in enumerate(lengths.tolist()):
            alone = layer(x[b:b + 1, :n])
            torch.testing.assert_close(y[b, :n], alone[0], rtol=1e-5, atol=1e-5)
            assert torch.all(y[b, n:] == 0)


@pytest.mark.parametrize("name", LAYERS)
def test_gradcheck_float64(name):
    layer = lrnnx_zoo.create_layer(name, 3, d_state=4).double()
    x = torch.randn(1, 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,), eps=1e-6, atol=1e-6)
    params = list(layer.parameters())
    if not params:       # a layer with fixed coefficients (buffers) has nothing more to check
        return
    out = layer(x).square().sum()
    grads = torch.autograd.grad(out, params, allow_unused=True)
    unused = [n for (n, _), g in zip(layer.named_parameters(), grads) if g is None]
    assert not unused, f"every parameter receives a gradient; none reached {unused}"


@pytest.mark.parametrize("name", LAYERS)
def test_wrong_input_shapes(name):
    layer = make(name)
    with pytest.raises(ValueError, match=r"\(batch, length, d_model=16\)"):
        layer(torch.randn(2, 10, H + 1))
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.randn(10, H))
    cache = layer.allocate_inference_cache(2)
    with pytest.raises(ValueError, match=r"\(batch=2, d_model=16\)"):
        layer.step(torch.randn(3, H), cache)


@pytest.mark.parametrize("name", LAYERS)
def test_step_form_keeps_the_step_form_contract(name):
    # the contract as the README and DESIGN.md state it (an nn.Module with an int state_size, a real
    # (y, s_next) of the declared sizes), not a StepForm subclass, which a plugin's form need not be
    check_step_form(make(name).step_form(), f"{name}.step_form()", H)


@pytest.mark.parametrize("name", LAYERS)
def test_inference_mode_equals_no_grad(name):
    # torch.inference_mode() tensors have no version counter (the kernel cache reads it).
    layer = make(name)
    x = torch.randn(2, 40, H)
    with torch.no_grad():
        y = layer(x)
    with torch.inference_mode():
        y_inf, y_inf2 = layer(x), layer(x)                  # the second call hits the kernel cache
    torch.testing.assert_close(y_inf, y, rtol=0, atol=0)
    torch.testing.assert_close(y_inf2, y, rtol=0, atol=0)
    with torch.no_grad():                                   # and outside it again
        torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("name,kw", LENGTH_CASES)
def test_padding_content_never_reaches_valid_outputs(name, kw):
    # An FFT spreads rounding (and NaN/inf) over the whole sequence, so the padding is zeroed
    # before the convolution: huge or NaN padding gives the outputs of zero padding, to float
    # rounding (1e-6 of max|y|), and padded outputs are exactly zero.
    layer = make(name, **kw)
    lengths = torch.tensor([9, 32])
    x = torch.randn(2, 32, H)
    x[0, 9:] = 0.0
    with torch.no_grad():
        y0 = layer(x, lengths=lengths)
        for fill in (1e6, float("nan"), float("inf")):
            xp = x.clone()
            xp[0, 9:] = fill
            y = layer(xp, lengths=lengths)
            assert torch.all(y[0, 9:] == 0)
            assert rel_err(y[:, :9], y0[:, :9]) < 1e-6 and rel_err(y[1], y0[1]) < 1e-6


@pytest.mark.parametrize("name", LAYERS)
def test_bad_lengths_and_sizes_are_refused_clearly(name):
    layer = make(name)
    x = torch.randn(2, 10, H)
    for bad in (torch.tensor([5.0, 7.5]), torch.tensor([True, False])):
        with pytest.raises(TypeError, match="lengths must hold integers"):
            layer(x, lengths=bad)
    with pytest.raises(TypeError, match="float32 or float64, got torch.float16"):
        layer(x.half())
    for kw in ({"d_model": 0}, {"d_model": -3}, {"d_state": 2.0}, {"d_state": 0}):
        args = {"d_model": H, "d_state": N, **kw}
        with pytest.raises(ValueError, match=f"{next(iter(kw))}"):
            lrnnx_zoo.create_layer(name, args.pop("d_model"), **args)


@pytest.mark.parametrize("name", LAYERS)
def test_time_invariant_layers_refuse_integration_timesteps(name):
    # A time-invariant layer has one step size for the whole sequence: LRU, S4D and fftconv
    # ignored integration_timesteps without a word (the outputs of a uniform grid); S4 refused them.
    layer = make(name)
    if not isinstance(layer, lrnnx_zoo.LTI_LRNN):
        pytest.skip("a time-varying layer may take integration_timesteps")
    x = torch.randn(2, 10, H)
    with pytest.raises(ValueError, match=r"expected integration_timesteps=None, got a tensor of shape \(2, 10\)"):
        layer(x, integration_timesteps=torch.ones(2, 10))
    layer(x, integration_timesteps=None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", LAYERS)
def test_half_precision_parameters_are_refused_clearly_on_the_cpu(name, dtype):
    # layer.half() / .bfloat16() failed deep inside ("Unsupported dtype BFloat16", "exp_vml_cpu not
    # implemented for 'ComplexHalf'"), with a float32 input and, for the LRU, under autocast too.
    layer = make(name).to(dtype)
    x = torch.randn(2, 10, H)
    with pytest.raises(TypeError, match=rf"computes in float32 or float64, but holds {dtype} parameters"):
        layer(x)
    with torch.autocast("cpu", dtype=dtype), pytest.raises(TypeError, match=rf"holds {dtype} parameters"):
        layer(x.to(dtype))
    layer.float()(x)                                   # the way out the message gives


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fftconv_block_refuses_half_precision_parameters_on_the_cpu(dtype):
    from lrnnx_zoo.plugins.fftconv import FFTConvS4
    with pytest.raises(TypeError, match=rf"FFTConvS4 on the CPU computes in float32 or float64, but holds {dtype}"):
        FFTConvS4(H, d_state=N).to(dtype)(torch.randn(2, H, 10))


@pytest.mark.parametrize("change", ["optimizer step", "load_state_dict", "in-place edit"])
@pytest.mark.parametrize("name", LAYERS)
def test_step_refuses_a_cache_made_before_the_weights_changed(name, change):
    # Training while streaming, or loading weights into a streaming layer: the cache's step form
    # kept the old weights and stepped on with them, silently.
    layer = make(name)
    x = torch.randn(2, 8, H)
    cache = layer.allocate_inference_cache(2)
    with torch.no_grad():
        layer.step(x[:, 0], cache)
    if change == "optimizer step":
        opt = torch.optim.AdamW(layer.parameters(), lr=0.05)
        layer(x).square().sum().backward()
        opt.step()
    elif change == "load_state_dict":
        other = lrnnx_zoo.create_layer(name, H, d_state=N)   # other weights, also for a deterministic init
        with torch.no_grad():
            next(other.parameters()).mul_(0.5)
        layer.load_state_dict(other.state_dict())
    else:
        with torch.no_grad():
            next(layer.parameters()).mul_(0.5)
    with torch.no_grad(), pytest.raises(RuntimeError, match="weights changed since this cache was made.*"
                                                               "allocate_inference_cache"):
        layer.step(x[:, 1], cache)
    with torch.no_grad():         # a new cache steps with the new weights: the convolution's outputs
        torch.testing.assert_close(run_steps(layer, x), layer(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", LAYERS)
def test_step_carries_on_when_a_longer_forward_only_restores_the_weights(name):
    # S4 keeps C~ = C (I - A^L) for its kernel length and rewrites it in place for a longer input:
    # the version counters move, the system does not, and the stream must not be refused.
    layer = make(name)
    x = torch.randn(1, 40, H)
    with torch.no_grad():
        cache = layer.allocate_inference_cache(1)
        first = torch.stack([layer.step(x[:, t], cache)[0] for t in range(20)], 1)
        layer(torch.randn(1, 300, H))
        rest = torch.stack([layer.step(x[:, t], cache)[0] for t in range(20, 40)], 1)
        torch.testing.assert_close(torch.cat([first, rest], 1), layer(x), rtol=1e-4, atol=1e-5)
