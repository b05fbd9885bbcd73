"""Bad input and PyTorch integration found by session 20's audit: each case was accepted silently
(wrong numbers), left a module unusable, or failed deep inside torch with no word of the argument.
Tiny sizes; float32 unless stated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo import hippo
from lrnnx_zoo.convolution import fft_conv
from lrnnx_zoo.discretization import zoh_resample_diag
from lrnnx_zoo.plugins.fftconv import FFTConvS4
from lrnnx_zoo.plugins.s4 import S4, HippoSSKernel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", ["s4d", "lru", "s4", "fftconv"])
def test_a_layer_refuses_another_layers_cache(name):
    # it stepped with the other layer's weights: exactly that layer's output, ~3.9 off its own
    a, b = lrnnx_zoo.create_layer(name, 4, d_state=4), lrnnx_zoo.create_layer(name, 4, d_state=4)
    other = b.allocate_inference_cache(2)
    with pytest.raises(ValueError, match=r"this cache was made by another layer"):
        a.step(torch.randn(2, 4), other)
    assert a.step(torch.randn(2, 4), a.allocate_inference_cache(2))[0].shape == (2, 4)


@pytest.mark.parametrize("tol", [float("nan"), 0.0, -1.0, "x", True])
def test_s4_step_tolerance_must_be_a_positive_number(tol):
    # NaN switched the diagonal form's accuracy check off: steps 198% off the convolution
    with pytest.raises(ValueError, match=r"need tol to be a number > 0"):
        S4(4, d_state=32).setup_step("diagonal", tol=tol)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"trainable": "no"}, TypeError, r"trainable\['dt'\] to be a bool"),
    ({"trainable": {"dt": "no"}}, TypeError, r"trainable\['dt'\] to be a bool"),
    ({"lr": float("nan")}, ValueError, r"finite number >= 0"),
    ({"lr": -1.0}, ValueError, r"finite number >= 0"),
    ({"lr": "x"}, TypeError, r"a number >= 0"),
    ({"wd": -1}, ValueError, r"finite number >= 0")])
def test_s4_kernel_options_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        lrnnx_zoo.create_layer("s4", 4, d_state=4, **kwargs)


def test_param_groups_refuse_negative_or_nan_learning_rates():
    from lrnnx_zoo.training import param_groups
    model = lrnnx_zoo.create_layer("s4d", 4, d_state=4)
    for bad in (-1e-2, float("nan")):   # AdamW checks its own default lr, never a group's: uphill training
        with pytest.raises(ValueError, match=r"param_groups needs lr to be a finite number >= 0"):
            param_groups(model, lr=bad, weight_decay=0.0, ssm_lr=None)
    with pytest.raises(TypeError, match=r"param_groups needs ssm_lr to be a number >= 0"):
        param_groups(model, lr=1e-3, weight_decay=0.0, ssm_lr="fast")


def test_registering_a_name_twice_on_an_s4_kernel_is_refused():
    k = HippoSSKernel(4, N=4)
    with pytest.raises(ValueError, match=r"'w' is already registered"):
        k.register("w", torch.zeros(3), trainable=True)


def test_a_failed_kernel_call_leaves_the_kernel_as_it_was(monkeypatch):
    # L=2**33 ran out of memory after C~ had been extended for it, and every later call, L=5 too,
    # did the same: the layer was unusable
    from lrnnx_zoo.plugins.s4 import kernel as kernel_module
    k = HippoSSKernel(4, N=4)
    K5 = k(L=5)[0]
    C, length = k.C.detach().clone(), k.length

    def fail(*args, **kwargs):
        raise MemoryError("out of memory (simulated)")
    monkeypatch.setattr(kernel_module, "bilinear_kernel", fail)
    with pytest.raises(MemoryError):
        k(L=4096)
    monkeypatch.undo()
    assert k.length == length and torch.equal(k.C.detach(), C)
    assert torch.equal(k(L=5)[0], K5)


@pytest.mark.parametrize("bad", [2.5, "3", True, -1])
def test_s4_kernel_lengths_are_integers(bad):
    with pytest.raises(ValueError, match=r"needs L to be an integer >= 0"):
        HippoSSKernel(4, N=4)(L=bad)
    with pytest.raises((ValueError, TypeError)):
        HippoSSKernel(4, N=4, L=bad)
    assert HippoSSKernel(4, N=4)(L=torch.tensor(3))[0].shape == (1, 4, 3)   # a 0-d int tensor is a length


@pytest.mark.parametrize("make", [lambda: S4(4, d_state=4).eval(), lambda: lrnnx_zoo.create_layer("lru", 4),
                                  lambda: FFTConvS4(4)])
def test_an_input_on_another_device_is_named(make):
    # a meta input to the seed S4 came back as uninitialised CPU memory (values like -1.6e29)
    layer = make()
    shape = (2, 4, 6) if getattr(layer, "transposed", False) else (2, 6, 4)
    with torch.no_grad(), pytest.raises(ValueError, match=r"the input is on meta, the parameters on cpu"):
        layer(torch.empty(*shape, device="meta"))


def test_hippo_checks_dtypes_and_measure_arguments():
    with pytest.raises(TypeError, match=r"dtype must be a real floating torch.dtype"):
        hippo.rank_correction("legs", 4, dtype=torch.long)       # sqrt(n + 1/2) truncated to integers
    with pytest.raises(TypeError, match=r"dtype must be a real floating torch.dtype"):
        hippo.nplr("legs", 4, dtype="float32")
    with pytest.raises(ValueError, match=r"'lagt' needs beta > 0"):
        hippo.transition("lagt", 4, beta=-1.0)                    # an unstable A came back
    with pytest.raises(ValueError, match=r"'lagt' needs beta > 0"):
        lrnnx_zoo.create_layer("s4", 4, d_state=4, measure="lagt", measure_args={"beta": -1.0})
    with pytest.raises(TypeError, match=r"L must be an int"):
        hippo.krylov(2.5, torch.eye(3), torch.ones(3))
    with pytest.raises(TypeError, match=r"L must be an int"):
        hippo.power(True, torch.eye(3))
    with pytest.raises(ValueError, match=r"krylov needs b \(\.\.\., N\) for A"):
        hippo.krylov(4, torch.eye(3), torch.ones(2))


@pytest.mark.parametrize("rate", [0.0, -1.0, float("nan")])
def test_zoh_resampling_needs_a_positive_rate(rate):
    with pytest.raises(ValueError, match=r"rate to be a finite number > 0"):
        zoh_resample_diag(torch.tensor([-0.1 + 0.2j]), None, rate)


def test_fft_conv_takes_real_projections_and_mixed_precision():
    # "both inputs should have same dtype" for the documented projection use with real operands
    x, K, C = torch.randn(2, 6, 3), torch.randn(6, 3), torch.randn(4, 3)
    direct = torch.stack([sum(K[s] * x[:, t - s] for s in range(t + 1)) for t in range(6)], 1) @ C.T
    torch.testing.assert_close(fft_conv("blh,lh,kh->blk", x, K, C), direct, rtol=1e-5, atol=1e-5)
    assert fft_conv("blh,lh->blh", x.double(), K).dtype == torch.float64
    with pytest.raises(ValueError, match=r"axis 'h' of 'blh,lh,kh->blk' is 3 long in operand 'blh' and 5"):
        fft_conv("blh,lh,kh->blk", x, K, torch.randn(4, 5))


@pytest.mark.parametrize("rate", [True, torch.tensor([0.5, 1.0])])
def test_fftconv_checks_the_rate_with_a_warm_kernel_cache(rate):
    block, x = FFTConvS4(4).eval(), torch.randn(2, 4, 20)
    with torch.no_grad():
        block(x)                                                # the kernel's cache now holds rate 1
        with pytest.raises(ValueError, match=r"FFTConvS4 needs rate"):
            block(x, rate=rate)


@pytest.mark.parametrize("n_ssm", [4.0, True, "4"])
def test_n_ssm_is_a_size(n_ssm):
    with pytest.raises(ValueError, match=r"n_ssm to be an integer >= 1"):
        lrnnx_zoo.create_layer("s4", 4, d_state=4, n_ssm=n_ssm)


@pytest.mark.parametrize("make", [lambda: S4(4, d_state=4), lambda: FFTConvS4(4), lambda: FFTConvS4(4, kernel_type="lru")])
@pytest.mark.parametrize("batch", [2.0, "2", None, -1])
def test_default_state_batch_sizes_are_integers(make, batch):
    with pytest.raises(ValueError, match=r"default_state\(\*batch_shape\) needs batch sizes that are integers"):
        make().default_state(batch)


def test_a_per_channel_form_refuses_a_skip_of_another_shape():
    from lrnnx_zoo.plugins.s4d import S4DKernel
    with pytest.raises(ValueError, match=r"expects D of shape \(channels=1, H=4\) or None, got \(7,\)"):
        S4DKernel(4, 4).step_form(D=torch.randn(7))
    with pytest.raises(ValueError, match=r"expects D of shape \(channels=1, H=4\) or None, got \(4, 4\)"):
        HippoSSKernel(4, N=4).step_form("dense", D=torch.randn(4, 4))


def test_the_step_module_refuses_a_state_of_another_width():
    from lrnnx_zoo.export import build_step_module
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer="s4d", d_input=2, d_output=2, d_model=4, n_layers=1))
    step = build_step_module(model)
    with pytest.raises(ValueError, match=rf"StepModule expects state of shape \(batch, {step.state_size}\)"):
        step(torch.zeros(2, 2), torch.zeros(2, step.state_size + 5))     # sliced silently before
    with pytest.raises(ValueError, match=r"StepModule expects x of shape \(batch, 2\)"):
        step(torch.zeros(2, 3), torch.zeros(2, step.state_size))


# -- PyTorch integration ----------------------------------------------------------------------

def test_a_parametrized_s4_output_matrix_runs():
    # weight_norm on kernel.C moved it to parametrizations.C.original: KeyError 'C' in forward
    layer = lrnnx_zoo.create_layer("s4", 4, d_state=8)
    torch.nn.utils.parametrizations.weight_norm(layer.kernel, "C")
    y = layer(torch.randn(2, 24, 4))
    assert y.shape == (2, 24, 4) and torch.isfinite(y).all()


def test_s4_parameters_are_contiguous():
    # P came as a permuted view: parameters_to_vector and safetensors' save_file refused it
    layer = lrnnx_zoo.create_layer("s4", 4, d_state=8, rank=2, measure="legt")
    assert all(p.is_contiguous() for p in layer.parameters())
    assert torch.nn.utils.parameters_to_vector(layer.parameters()).numel() == sum(p.numel() for p in layer.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_layer_is_refused_in_step_mode_too(dtype):
    # forward refused it, step ran in it: bfloat16 S4D steps were 0.165 off float32
    layer = lrnnx_zoo.create_layer("s4d", 4, d_state=4).to(dtype)
    with pytest.raises(TypeError, match=rf"holds {dtype} parameters: convert it"):
        layer.allocate_inference_cache(2)


def test_lengths_compile_as_one_graph():
    # check_lengths' value check was a data-dependent branch: fullgraph=True failed for every family
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer="s4d", d_input=2, d_output=2, d_model=4, n_layers=1,
                                                          pooling="mean")).eval()
    x, lengths = torch.randn(2, 10, 2), torch.tensor([10, 6])
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, lengths), model(x, lengths), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layer", ["s4d", "lru"])
def test_nan_padding_leaves_the_gradients_finite(layer):
    # the output was finite, but the encoder's weight gradient summed 0 * NaN: one step, NaN weights
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer=layer, d_input=2, d_output=3, d_model=4, n_layers=1,
                                                          pooling="mean", layer_kwargs={"d_state": 4}))
    x, lengths = torch.randn(2, 8, 2), torch.tensor([8, 5])
    x[1, 5:] = float("nan")
    model(x, lengths).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_model_level_arguments_are_named():
    with pytest.raises(TypeError, match=r"SequenceModel needs a ModelConfig \(or its dict\), got None"):
        lrnnx_zoo.SequenceModel(None)
    with pytest.raises(ValueError, match=r"layer_kwargs holds d_model=16; .* set ModelConfig.d_model instead"):
        lrnnx_zoo.ModelConfig(layer="s4d", d_input=1, d_output=1, layer_kwargs={"d_model": 16})
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer="s4d", d_input=1, d_output=1, d_model=4, n_layers=1))
    with pytest.raises(TypeError, match=r"needs dtype to be a floating torch.dtype or None, got torch.int64"):
        model.allocate_inference_cache(2, dtype=torch.long)      # it advised model.to(torch.int64)


def test_tying_an_s4_kernels_C_alone_is_refused_and_whole_kernels_tie():
    # b read a's C~ (for a's length) with its own length: 0.21 off, silently
    a, b = lrnnx_zoo.create_layer("s4", 4, d_state=8).eval(), lrnnx_zoo.create_layer("s4", 4, d_state=8).eval()
    for name in ("C", "log_dt", "w", "P", "B"):
        setattr(b.kernel, name, getattr(a.kernel, name))
    x = torch.randn(1, 24, 4)
    with torch.no_grad():
        a(x)
        with pytest.raises(RuntimeError, match=r"its C is another S4 kernel's parameter \(tied weights\), which "
                                               r"holds C~ for that kernel's length L=24, while this kernel's length "
                                               r"is L=0"):
            b(x)
        c = lrnnx_zoo.create_layer("s4", 4, d_state=8).eval()
        c.kernel, c.D = a.kernel, a.D                           # whole kernels: one length
        torch.testing.assert_close(c(x), a(x), rtol=0, atol=0)


def test_more_arguments_are_named():
    from lrnnx_zoo.kernels.cauchy import cauchy_conj
    with pytest.raises(ValueError, match=r"do not broadcast|must broadcast"):
        cauchy_conj(torch.randn(3, 4, dtype=torch.cfloat), torch.randn(5, dtype=torch.cfloat),
                    torch.randn(2, 4, dtype=torch.cfloat))
    with pytest.raises(TypeError, match=r"param_config to be a dict"):
        FFTConvS4(4, param_config="x")
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer="s4d", d_input=1, d_output=1, d_model=4, n_layers=1))
    with pytest.raises(TypeError, match=r"save_directory must be a folder path"):
        model.save_pretrained(None)


# Session 27: sizes of numpy's and torch's integer types. A sweep's np.int64(16) (np.arange,
# np.random.choice) was refused by every layer as not "an integer >= 1", and ModelConfig refused it
# as d_model while taking it inside layer_kwargs; torch's own modules take it.
NUMPY_SIZES = [np.int64, np.int32, torch.tensor]


@pytest.mark.parametrize("name", ["s4d", "lru", "s4", "fftconv"])
@pytest.mark.parametrize("size", NUMPY_SIZES, ids=["np.int64", "np.int32", "tensor"])
def test_integer_sizes_of_numpy_and_torch_types_build_the_same_layer(name, size):
    torch.manual_seed(0)
    plain = lrnnx_zoo.create_layer(name, 6, d_state=4)
    torch.manual_seed(0)
    other = lrnnx_zoo.create_layer(name, size(6), d_state=size(4))
    assert type(other.d_model) is int and type(other.d_state) is int    # kept as Python ints
    x = torch.randn(2, 9, 6)
    assert torch.equal(plain(x), other(x))
    cache = other.allocate_inference_cache(batch_size=size(2))
    assert other.step(x[:, 0], cache)[0].shape == (2, 6)


@pytest.mark.parametrize("bad", [True, 6.0, torch.tensor(6.0), torch.tensor(True), torch.tensor([6]), 0])
def test_sizes_that_are_not_positive_integers_are_still_refused(bad):
    for value in (bad, np.bool_(True), np.float64(6.0), np.int64(-1)):
        with pytest.raises(ValueError, match=r"^S4D needs d_model to be an integer >= 1"):
            lrnnx_zoo.create_layer("s4d", value)


def test_a_model_config_of_numpy_scalars_saves_and_loads(tmp_path):
    import json
    config = lrnnx_zoo.ModelConfig(layer="s4d", d_input=np.int64(2), d_output=np.int32(3), d_model=torch.tensor(8),
                                   n_layers=np.int64(2), dropout=np.float32(0.25), layer_kwargs={"d_state": np.int64(4)})
    assert [type(getattr(config, k)) for k in ("d_input", "d_output", "d_model", "n_layers", "dropout")] == \
        [int, int, int, int, float]
    model = lrnnx_zoo.SequenceModel(config).eval()
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["model"]
    assert (saved["d_model"], saved["n_layers"], saved["layer_kwargs"]) == (8, 2, {"d_state": 4})
    x = torch.randn(2, 5, 2)
    assert torch.equal(lrnnx_zoo.from_pretrained(tmp_path / "m").eval()(x), model(x))
    assert model.allocate_inference_cache(batch_size=np.int64(2)) is not None
    with pytest.raises(TypeError, match=r"ModelConfig.d_model must be a positive int, got np.float64\(8.0\)"):
        lrnnx_zoo.ModelConfig(layer="s4d", d_input=1, d_output=1, d_model=np.float64(8.0))


def test_hippo_and_default_state_take_numpy_integers():
    assert torch.equal(hippo.transition("legs", np.int64(6))[0], hippo.transition("legs", 6)[0])
    assert torch.equal(hippo.nplr("legs", np.int32(8))[0], hippo.nplr("legs", 8)[0])
    A = torch.randn(3, 3)
    assert torch.equal(hippo.power(np.int64(5), A), hippo.power(5, A))
    assert S4(4, d_state=4).default_state(np.int64(2)).shape == S4(4, d_state=4).default_state(2).shape
    with pytest.raises(TypeError, match=r"N must be an int, got True"):
        hippo.transition("legs", True)


def test_export_opset_takes_numpy_integers_and_refuses_the_rest():
    # Session 28: the last size that refused np.int64 (a sweep over opsets); kept as a Python int,
    # since torch.onnx.export and onnx's helpers want one.
    from lrnnx_zoo.export.onnx_export import resolve_opset
    from lrnnx_zoo.export.options import MAX_OPSET
    opset, _ = resolve_opset(np.int64(MAX_OPSET), "dynamo", [])
    assert opset == MAX_OPSET and type(opset) is int
    for bad in (True, np.bool_(True), float(MAX_OPSET), np.int64(MAX_OPSET + 1), "18"):
        with pytest.raises(ValueError, match=r"opset must be an int in \[\d+, \d+\].*got "):
            resolve_opset(bad, "dynamo", [])


@pytest.mark.parametrize("name", ["lru", "s4d", "s4", "fftconv"])
def test_step_and_cache_refuse_keywords_they_would_ignore(name):
    # Session 28 (an API fuzzer): the seed signatures' **kw were dropped silently: step(x, cache,
    # rate=0.5) stepped at rate 1, allocate_inference_cache(2, dtpye=torch.float64) made a float32
    # cache, device="meta" one on the CPU, and max_seqlen=-5 passed.
    layer = lrnnx_zoo.create_layer(name, 4, d_state=4)
    cache = layer.allocate_inference_cache(2)
    with pytest.raises(TypeError, match=rf"^{type(layer).__name__}.step takes x and the cache, got the keyword "
                                        r"rate=0.5 \(a cache steps the system it was made for"):
        layer.step(torch.randn(2, 4), cache, rate=0.5)
    with pytest.raises(TypeError, match=r"takes batch_size, max_seqlen and dtype, got keywords dtpye=torch.float64, "
                                        r"device='meta' \(the cache is made on the layer's device"):
        layer.allocate_inference_cache(2, dtpye=torch.float64, device="meta")
    with pytest.raises(ValueError, match=r"needs max_seqlen to be an integer >= 1, got -5"):
        layer.allocate_inference_cache(2, max_seqlen=-5)
    y, _ = layer.step(torch.randn(2, 4), layer.allocate_inference_cache(2, 100))    # max_seqlen unused, as before
    assert y.shape == (2, 4)


@pytest.mark.parametrize("build, message", [
    (lambda: lrnnx_zoo.create_layer("s4", 4, d_state=8, l_max=1 << 40), r"^S4Layer sizes l_max=1099511627776, d_model=4"),
    (lambda: lrnnx_zoo.create_layer("s4d", 1 << 16, d_state=1 << 16), r"^S4D sizes d_model=65536, d_state=65536"),
    (lambda: lrnnx_zoo.create_layer("lru", 1 << 40, d_state=4), r"^LRU sizes d_model=1099511627776, d_state=4"),
    (lambda: lrnnx_zoo.create_layer("fftconv", 4, d_state=4, l_max=1 << 40), r"^FFTConvS4 sizes l_max=1099511627776"),
    (lambda: S4(4, d_state=8, l_max=1 << 40), r"^S4 sizes l_max=1099511627776, d_model=4, channels=1"),
])
def test_sizes_that_describe_a_tensor_too_large_are_refused_before_building(build, message):
    # Session 28 (an API fuzzer): built directly (not through ModelConfig's budget), these reached the
    # allocator ("you tried to allocate 140737488355328 bytes"), or tried 34 GB.
    with pytest.raises(ValueError, match=message + r".* describe a tensor of [\d.e+]+ elements, more than the 1e\+09 "
                                               r"a layer builds; check these sizes$"):
        build()


def test_hippo_dense_helpers_name_the_argument_that_does_not_fit_A():
    # Session 28 (an API fuzzer): these failed inside torch ("mat1 and mat2 shapes cannot be
    # multiplied", "expected m1 and m2 to have the same dtype", "The size of tensor a (4) must match",
    # "'list' object has no attribute 'shape'"), and bilinear took dt = -0.1 or NaN.
    A = torch.randn(4, 4) * 0.1
    cases = [
        (lambda: hippo.bilinear(0.1, torch.randn(3, 4)), ValueError, r"bilinear needs a square matrix A"),
        (lambda: hippo.bilinear(0.1, A, torch.randn(5)), ValueError, r"bilinear needs B \(\.\.\., N\) for A .* N=4, got B \(5,\)"),
        (lambda: hippo.bilinear(0.1, [[1.0, 0.0], [0.0, 1.0]]), ValueError, r"bilinear needs a square matrix A .* got list"),
        (lambda: hippo.bilinear(-0.1, A), ValueError, r"bilinear needs dt to be a finite number > 0 .* got -0.1"),
        (lambda: hippo.bilinear(float("nan"), A), ValueError, r"bilinear needs dt to be a finite number > 0"),
        (lambda: hippo.bilinear("a", A), ValueError, r"bilinear needs dt to be a finite number > 0 .* got 'a'"),
        (lambda: hippo.power(4, A, torch.randn(3, 4)), ValueError, r"power needs v \(\.\.\., N, L\) for A .* got v \(3, 4\)"),
        (lambda: hippo.power(4, A.double(), torch.randn(4, 4)), TypeError, r"power needs v of A's dtype torch.float64, got torch.float32"),
        (lambda: hippo.krylov(4, A.double(), torch.randn(4)), TypeError, r"krylov needs b of A's dtype torch.float64"),
        (lambda: hippo.krylov(4, A, torch.randn(4), [1.0] * 4), TypeError, r"krylov needs c to be a torch.Tensor, got list"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    dA, dB = hippo.bilinear(0.1, A, torch.randn(4))                # valid calls unchanged
    assert dA.shape == (4, 4) and dB.shape == (4,)
    assert hippo.power(4, A, torch.randn(4, 4))[1].shape == (4,) and hippo.krylov(4, A, torch.randn(4)).shape == (4, 4)


def test_seed_linear_activation_and_activation_check_their_arguments_when_built():
    # Session 28 (an API fuzzer): LinearActivation(4, 4, activation="rellu") was accepted with
    # activate=False (refused with it), and Activation("glu", dim="a") failed at its first forward.
    from lrnnx_zoo.plugins.s4 import Activation, LinearActivation
    with pytest.raises(ValueError, match=r"unknown activation 'rellu'; valid: None, id, identity, linear, tanh, relu"):
        LinearActivation(4, 4, activation="rellu")
    with pytest.raises(TypeError, match=r"Activation needs dim to be an int \(the axis a GLU halves\), got 'a'"):
        Activation("glu", dim="a")
    assert LinearActivation(4, 3, activation="glu").out_features == 6            # valid ones as before
    assert isinstance(LinearActivation(4, 3, activation="gelu", activate=True)[1], torch.nn.GELU)
