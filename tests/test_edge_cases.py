"""Edge cases a user's inputs and habits reach (the edge-case audit): caches and states made under
inference_mode used later under autograd, NaN, infinite and tensor rates, empty batches in prefill,
real zero states, odd d_state, deferred initialisation on the meta device, a float64 default dtype.
Each group names the failure it was written for."""

from __future__ import annotations

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo import ModelConfig, SequenceModel

LAYERS = lrnnx_zoo.list_layers()
H, N = 6, 4


def make(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return lrnnx_zoo.create_layer(name, H, d_state=N, **kw).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# -- caches made under torch.inference_mode() -----------------------------------------------------
# A cache outlives the call that made it. Made under inference_mode its step form held inference
# tensors, which autograd cannot save: the next step outside inference_mode with an input that
# requires grad (any model's step: the encoder's parameters require grad) failed with "Inference
# tensors cannot be saved for backward".

@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("made_by", ["allocate_inference_cache", "prefill"])
def test_layer_cache_made_in_inference_mode_steps_under_autograd(name, made_by):
    layer = make(name)
    x = torch.randn(2, 12, H)
    with torch.inference_mode():
        cache = layer.allocate_inference_cache(2) if made_by == "allocate_inference_cache" else layer.prefill(x)[1]
    with torch.no_grad():
        expected = make(name)
        ref = expected.allocate_inference_cache(2) if made_by == "allocate_inference_cache" else expected.prefill(x)[1]
        y_ref, _ = expected.step(x[:, 0], ref)
    u = x[:, 0].clone().requires_grad_()
    y, cache = layer.step(u, cache)
    y.sum().backward()                                      # the graph of this one step holds
    assert u.grad is not None and u.grad.shape == u.shape
    torch.testing.assert_close(y.detach(), y_ref, rtol=0, atol=0)


@pytest.mark.parametrize("layer", LAYERS)
def test_model_prefilled_in_inference_mode_streams_without_a_context_manager(layer):
    torch.manual_seed(0)
    model = SequenceModel(ModelConfig(d_input=3, d_output=2, d_model=8, n_layers=2, layer=layer,
                                      layer_kwargs={"d_state": 4})).eval()
    x = torch.randn(2, 10, 3)
    with torch.inference_mode():
        _, cache = model.prefill(x[:, :9])
    y, cache = model.step(x[:, 9], cache)                   # grad mode on, as by default
    with torch.no_grad():
        full = model(x)
    assert rel_err(y.detach(), full[:, 9]) < 1e-5          # float32 step vs convolution (rounding only)


def _fftconv_block(kernel_type: str, **kw):
    from lrnnx_zoo.plugins.fftconv import FFTConvS4
    torch.manual_seed(0)
    return FFTConvS4(H, kernel_type=kernel_type, d_state=N, **kw).eval()


def _s4_seed(**kw):
    from lrnnx_zoo.plugins.s4 import S4
    torch.manual_seed(0)
    return S4(H, **kw)


def _s4_block():
    return _s4_seed(d_state=N, l_max=16).eval()


@pytest.mark.parametrize("kernel_type", ["s4d", "lru", "s4"])
def test_fftconv_block_stepped_first_in_inference_mode_steps_under_autograd(kernel_type):
    block = _fftconv_block(kernel_type)
    with torch.inference_mode():                            # the first step builds the step form
        _, s = block.step(torch.randn(2, H), block.default_state(2))
    u = torch.randn(2, H, requires_grad=True)
    y, _ = block.step(u, s)
    y.sum().backward()
    assert u.grad is not None


@pytest.mark.parametrize("mode", ["dense", "linear", "diagonal"])
def test_s4_block_set_up_in_inference_mode_steps_under_autograd(mode):
    block = _s4_block()
    with torch.inference_mode():
        block.setup_step(mode)
    u = torch.randn(2, H, requires_grad=True)
    y, _ = block.step(u, block.default_state(2))
    y.sum().backward()
    assert u.grad is not None


# A state returned by an inference-mode forward, passed back under autograd (evaluate, then go on
# training from where the evaluation stopped): its values are what matter; it failed with
# "Inference tensors cannot be saved for backward".
@pytest.mark.parametrize("block", ["fftconv-s4d", "fftconv-lru", "fftconv-s4", "s4"])
def test_state_from_an_inference_mode_forward_passes_under_autograd(block):
    m = _s4_block() if block == "s4" else _fftconv_block(block.split("-")[1])
    x = torch.randn(2, H, 20)
    with torch.inference_mode():
        _, s = m(x[..., :10], state=m.default_state(2))
    with torch.no_grad():
        _, s_ref = m(x[..., :10], state=m.default_state(2))
        y_ref, _ = m(x[..., 10:], state=s_ref)
    u = x[..., 10:].clone().requires_grad_()
    y, _ = m(u, state=s)
    y.sum().backward()
    assert u.grad is not None
    torch.testing.assert_close(y.detach(), y_ref, rtol=1e-6, atol=1e-6)   # same computation, other grad mode


@pytest.mark.parametrize("backend", ["fft", "scan"])
def test_lru_initial_state_from_inference_mode_passes_under_autograd(backend):
    layer = make("lru", backend=backend)
    x = torch.randn(2, 10, H)
    with torch.inference_mode():
        s = layer.final_state(x)
    u = x.clone().requires_grad_()
    layer(u, initial_state=s).sum().backward()
    layer.final_state(u, initial_state=s).abs().sum().backward()
    assert u.grad is not None


# -- rate ----------------------------------------------------------------------------------------
# With l_max set, FFTConvS4 rounded l_max * rate before any check: rate=nan gave "cannot convert
# float NaN to integer", rate=inf an OverflowError, and a 0-dim tensor rate (which works without
# l_max) "type Tensor doesn't define __round__", for FFTConvS4 and S4 alike.

def _block_with_window(which: str):
    if which == "s4":
        return _s4_seed(d_state=N, l_max=8).eval()
    return _fftconv_block(which.split("-")[1], l_max=8)


@pytest.mark.parametrize("which", ["fftconv-s4d", "fftconv-s4", "s4"])
@pytest.mark.parametrize("rate", [float("nan"), float("inf"), 0.0, -1.0, "2"])
def test_bad_rate_is_named_with_a_window(which, rate):
    with pytest.raises(ValueError, match=r"needs rate, .* to be a finite number > 0, got"):
        _block_with_window(which)(torch.randn(2, H, 20), rate=rate)


@pytest.mark.parametrize("which", ["fftconv-s4d", "fftconv-s4", "s4"])
def test_tensor_rate_equals_the_float_rate(which):
    block = _block_with_window(which)
    x = torch.randn(2, H, 20)
    with torch.no_grad():
        y_float, _ = block(x, rate=0.5)
        y_tensor, _ = block(x, rate=torch.tensor(0.5))
    torch.testing.assert_close(y_tensor, y_float, rtol=0, atol=0)        # one computation


# -- empty batches ---------------------------------------------------------------------------------
# forward takes an empty batch; a prefill of one reached allocate_inference_cache(0), whose refusal
# ("allocate_inference_cache needs batch_size to be an integer >= 1, got 0") named a call the user
# had not made. It is refused by prefill, in its own name, for every family and the model.

@pytest.mark.parametrize("name", LAYERS)
def test_layer_prefill_of_an_empty_batch_is_refused_in_its_own_name(name):
    layer = make(name)
    assert layer(torch.randn(0, 5, H)).shape == (0, 5, H)
    with pytest.raises(ValueError, match=rf"{type(layer).__name__}.prefill needs at least one sequence .* "
                                         rf"got x of shape \(0, 5, {H}\)"):
        layer.prefill(torch.randn(0, 5, H))


@pytest.mark.parametrize("name", LAYERS)
@torch.no_grad()
def test_a_float64_prompt_to_a_float32_layer_streams_on_in_float64(name):
    """forward promotes a float64 x (float64 y); prefill's cache was float32, so the stream's next
    float64 step was refused. Now the steps go on from the prompt in float64. Tolerance 1e-6 of
    max|y|: the convolution runs the float32 parameters' kernel, the steps their float64 step form."""
    layer = make(name)
    x = torch.randn(2, 20, H, dtype=torch.float64)
    y, cache = layer.prefill(x[:, :12])
    steps = torch.stack([layer.step(x[:, t], cache)[0] for t in range(12, 20)], 1)
    ref = layer(x)
    assert y.dtype == steps.dtype == torch.float64
    assert rel_err(torch.cat([y, steps], 1), ref) < 1e-6


@pytest.mark.parametrize("layer", LAYERS)
def test_model_prefill_of_an_empty_batch_is_refused_in_its_own_name(layer):
    torch.manual_seed(0)
    model = SequenceModel(ModelConfig(d_input=3, d_output=2, d_model=8, n_layers=1, layer=layer,
                                      layer_kwargs={"d_state": 4})).eval()
    with pytest.raises(ValueError, match=r"SequenceModel.prefill needs at least one sequence .* got x of shape \(0, 5, 3\)"):
        model.prefill(torch.randn(0, 5, 3))


# -- a real zero state where the kernel's state is complex -----------------------------------------
# torch.zeros(B, H, S) is the zero state a user writes without default_state. FFTConvS4.step took it
# as its "format" and returned the next state real: the imaginary parts were dropped at every step,
# and the outputs were 51% (s4d kernel) / 27% (lru kernel) off the convolution; the s4 kernel, and
# S4.step, failed on it ("imag is not implemented for tensors with non-complex dtypes"). State
# passing (forward(x, state)) already read it as complex.

@pytest.mark.parametrize("kernel_type", ["s4d", "lru", "s4"])
def test_fftconv_block_steps_from_a_real_zero_state(kernel_type):
    block = _fftconv_block(kernel_type)
    x = torch.randn(2, H, 30)
    with torch.no_grad():
        y, _ = block(x)
        s = torch.zeros(block.default_state(2).shape)
        ys = []
        for t in range(30):
            y_t, s = block.step(x[..., t], s)
            ys.append(y_t)
    assert s.is_complex()
    assert rel_err(torch.stack(ys, -1), y) < 1e-5          # float32 steps vs convolution over 30 steps


@pytest.mark.parametrize("mode", ["dense", "linear", "diagonal"])
def test_s4_block_steps_from_a_real_zero_state(mode):
    block = _s4_block()
    block.setup_step(mode)
    u = torch.randn(2, H)
    zero = block.default_state(2)
    with torch.no_grad():
        y_ref, s_ref = block.step(u, zero)
        y, s = block.step(u, torch.zeros(zero.shape))
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)     # the same zeros, as complex
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)


# -- odd d_state -----------------------------------------------------------------------------------
# S4D's refusal named the layer and d_state; S4's said "N counts real states ..." whoever was built
# with d_state (the registered layer, the seed block, FFTConvS4 with the s4 kernel).

@pytest.mark.parametrize("build, who", [
    (lambda: lrnnx_zoo.create_layer("s4", H, d_state=3), "S4Layer d_state"),
    (lambda: lrnnx_zoo.create_layer("s4d", H, d_state=3), "S4D d_state"),
    (lambda: lrnnx_zoo.create_layer("fftconv", H, d_state=3, kernel_type="s4"), "S4Kernel d_state"),
    (lambda: _s4_seed(d_state=3), "S4 d_state"),
], ids=["s4", "s4d", "fftconv-s4", "S4"])
def test_odd_d_state_is_refused_in_the_callers_terms(build, who):
    with pytest.raises(ValueError, match=rf"^{who} counts real states in conjugate pairs: an even number >= 2, got 3$"):
        build()


# -- deferred initialisation on the meta device ------------------------------------------------------
# Building under torch.device("meta") and loading real weights with assign=True spares a model's
# random initialisation; the HiPPO-based families (S4, S4D's default LegS init, fftconv with
# either) failed to build there: "Tensor.item() cannot be called on meta tensors" (the NPLR
# eigendecomposition reads values).

@pytest.mark.parametrize("name, kw", [("lru", {}), ("s4d", {}), ("s4", {}), ("s4", {"l_max": 16}),
                                      ("fftconv", {}), ("fftconv", {"kernel_type": "s4"})],
                         ids=["lru", "s4d", "s4", "s4-l_max", "fftconv", "fftconv-s4"])
def test_layer_builds_on_meta_and_takes_real_weights(name, kw):
    with torch.device("meta"):
        layer = lrnnx_zoo.create_layer(name, H, d_state=N, **kw)
    assert {t.device.type for t in [*layer.parameters(), *layer.buffers()]} == {"meta"}
    ref = make(name, **kw)
    layer.load_state_dict(ref.state_dict(), assign=True)
    x = torch.randn(2, 9, H)
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), ref(x), rtol=0, atol=0)    # the same weights


def test_model_builds_on_meta_and_takes_real_weights():
    cfg = ModelConfig(d_input=3, d_output=2, d_model=8, n_layers=2, layer="s4", layer_kwargs={"d_state": 4})
    with torch.device("meta"):
        model = SequenceModel(cfg)
    torch.manual_seed(0)
    ref = SequenceModel(cfg).eval()
    model.load_state_dict(ref.state_dict(), assign=True)
    x = torch.randn(2, 9, 3)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x), rtol=0, atol=0)


# -- torch.set_default_dtype(torch.float64) ------------------------------------------------------------
# The families cast some parameters to float32 in their constructors, so a layer built under a
# float64 default held float32 and float64 parameters mixed: the LRU's cache followed its float32
# eigenvalues and refused the float64 inputs the default makes, and every other family ran its
# kernel with float32-rounded A and dt (steps and convolution 5e-8 apart, not 1e-13).

@pytest.mark.parametrize("name", LAYERS)
def test_layer_built_under_a_float64_default_is_float64_throughout(name, float64_default):
    layer = make(name)
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    x = torch.randn(2, 64, H)                                  # float64, as the default makes it
    with torch.no_grad():
        y = layer(x)
        cache = layer.allocate_inference_cache(2)
        ys = torch.stack([layer.step(x[:, t], cache)[0] for t in range(64)], 1)
    assert y.dtype == ys.dtype == torch.float64
    assert rel_err(ys, y) < 1e-10                             # float64 modes agree to ~1e-13 (contract test)


# -- a discrete pole at exactly zero ----------------------------------------------------------------
# Bilinear S4D with dt A = -2 (init "real": A_n = -(n + 1), so mode 1 at dt = 1) has A_bar = 0, whose
# log is -inf: the kernel's 0-th power exp(0 * -inf) was NaN, and so was every output of the forward,
# while step mode was finite. Float64 parameters reach the exact zero (float32 ones round log 2).
@pytest.mark.parametrize("name", ["s4d", "fftconv"])
def test_a_bilinear_pole_at_exactly_zero_gives_the_recurrences_outputs(name, float64_default):
    kw = {"init": "real", "discretization": "bilinear", "dt_min": 1.0, "dt_max": 1.0}
    if name == "fftconv":
        kw["kernel_type"] = "s4d"
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer(name, 2, d_state=4, **kw)
    kernel = layer.kernel if name == "s4d" else layer.conv.kernel
    assert bool((kernel.discretize(dtype=torch.complex128)[0] == 0).any())      # the case itself
    x = torch.randn(3, 7, 2)
    with torch.no_grad():
        cache = layer.allocate_inference_cache(batch_size=3)
        steps = torch.stack([layer.step(x[:, t], cache)[0] for t in range(7)], 1)
        y = layer(x)
    assert rel_err(y, steps) < 1e-12             # float64: both are exact to rounding
    x.requires_grad_(True)
    layer(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in layer.parameters())


# -- one channel, one mode ----------------------------------------------------------------------------
# An S4D of d_model=1, d_state=2 held A_imag (1, 1) with strides (2, 2): contiguous to torch (one
# element), but the weights digest's view(uint8) refused it, so save_pretrained and at_rate failed.
# A_imag is compact now (test_every_parameter_and_buffer_is_compact); the digest takes such tensors too.
def test_the_weights_digest_takes_one_element_of_another_stride():
    from lrnnx_zoo.hub import state_digest
    odd = torch.view_as_real(torch.tensor([[1.5 + 2j]]))[..., 1]                # (1, 1), strides (2, 2)
    assert odd.stride() == (2, 2)
    assert state_digest({"w": odd}) == state_digest({"w": torch.tensor([[2.0]])})


@pytest.mark.parametrize("layer, kw", [("s4d", {}), ("fftconv", {"kernel_type": "s4d"})])
def test_a_one_channel_one_mode_model_saves_loads_and_resamples(layer, kw, tmp_path, float64_default):
    torch.manual_seed(0)
    model = SequenceModel(ModelConfig(layer=layer, d_input=1, d_output=1, d_model=1, n_layers=1,
                                      layer_kwargs={"d_state": 2, **kw}, norm="none")).eval()
    model.save_pretrained(tmp_path / "m")
    x = torch.randn(2, 9, 1)
    assert torch.equal(lrnnx_zoo.from_pretrained(tmp_path / "m").eval()(x), model(x))
    assert model.at_rate(2.0)(x).shape == (2, 9, 1)


# -- a step form is a snapshot ------------------------------------------------------------------------
# A float64 layer's form stored its skip D as the parameter itself (a cast to float64 of float64 is no
# copy): an in-place edit of D then changed every cache's form with it, and the running stream's check
# compared the form with itself and stepped on (a float32 layer's raised, as the README says).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", LAYERS)
def test_a_step_form_shares_no_storage_with_its_layer_and_an_edit_is_seen(name, dtype):
    layer = make(name).to(dtype)
    cache = layer.allocate_inference_cache(batch_size=1)
    weights = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), *layer.buffers()) if t.numel()}
    form = [t for t in cache["step_form"].buffers() if t is not None and t.numel()]
    assert form and not weights & {t.untyped_storage().data_ptr() for t in form}
    x = torch.randn(1, H, dtype=dtype)
    with torch.no_grad():
        layer.step(x, cache)
        skips = [p for n, p in layer.named_parameters() if n.split(".")[-1] == "D"]
        assert skips
        for skip in skips:
            skip.add_(0.5)
    with pytest.raises(RuntimeError):
        layer.step(x, cache)


# -- compact parameters ---------------------------------------------------------------------------------
# Under a float64 default S4D's A_imag was A.imag.to(float64): a strided view holding A's whole complex
# storage (twice its size, non-contiguous); at d_model=1, d_state=2 it was the (1, 1) of strides (2, 2)
# that the weights digest refused.
@pytest.mark.parametrize("width, d_state", [(6, 4), (1, 2)])
@pytest.mark.parametrize("name", LAYERS)
def test_every_parameter_and_buffer_is_compact(name, width, d_state, float64_default):
    for dtype in (torch.float32, torch.float64):
        torch.set_default_dtype(dtype)
        layer = lrnnx_zoo.create_layer(name, width, d_state=d_state)
        for key, t in (*layer.named_parameters(), *layer.named_buffers()):
            if t is not None and t.numel():
                assert t.is_contiguous() and t.reshape(-1).stride() == (1,), (key, t.stride())
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), key
