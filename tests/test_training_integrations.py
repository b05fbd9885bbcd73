"""Training integrations a PyTorch user combines with the layers: activation checkpointing, mixed
precision (torch.autocast, GradScaler), gradient accumulation with evaluation between steps,
weight averaging, DistributedDataParallel. Small models throughout (d_model <= 16, L <= 128)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import lrnnx_zoo
from lrnnx_zoo import SequenceModel, create_layer
from lrnnx_zoo.convolution import FFTConvS4
from lrnnx_zoo.models import ModelConfig

FAMILIES = lrnnx_zoo.list_layers()

#: The layers whose kernel or convolution would contain a real matrix product (the Vandermonde
#: product, the state passing's block sums): (name, create_layer arguments).
KERNEL_LAYERS = [("s4d", {"d_state": 8}), ("s4", {"d_state": 8}), ("fftconv", {"d_state": 8}),
                 ("fftconv", {"d_state": 8, "kernel_type": "lru"})]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach()).norm() / b.detach().norm())


def small_model(layer: str, dtype: torch.dtype = torch.float32, **config) -> SequenceModel:
    torch.manual_seed(0)
    kwargs = {"d_state": 8}
    return SequenceModel(ModelConfig(layer=layer, d_input=3, d_output=2, d_model=8, n_layers=2,
                                     layer_kwargs=kwargs, **config)).to(dtype)


# -- mixed precision ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, kwargs", KERNEL_LAYERS, ids=lambda v: str(v))
@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
def test_kernel_and_convolution_stay_float32_under_autocast(name, kwargs, grad):
    # The layers promise that under torch.autocast their kernel and convolution compute in float32
    # (base.float32_under_autocast). The Vandermonde product (S4D's kernel, FFTConv's s4d and lru
    # kernels) is a real matmul, which autocast ran in bfloat16: a float32 input gave outputs 2.5e-3
    # (S4D, FFTConv's s4d kernel), 2.0e-3 (its lru kernel) off the float32 ones, gradients 7.5e-3
    # and 3.3e-3. Tolerance: the same float32 computation, rounding only (measured 0); bfloat16
    # keeps 8 bits (4e-3 relative per rounding).
    torch.manual_seed(0)
    layer = create_layer(name, 8, **kwargs)
    x = torch.randn(2, 128, 8)

    def run(amp: bool):
        torch.manual_seed(1)
        model = copy.deepcopy(layer)
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = model(x)
        if not grad:
            return y, []
        y.float().square().sum().backward()
        return y.detach(), [p.grad for p in model.parameters()]

    (y, grads), (ref, ref_grads) = run(True), run(False)
    assert y.dtype == torch.float32
    assert relative(y, ref) < 1e-5
    for (n, _), g, r in zip(layer.named_parameters(), grads, ref_grads):
        assert relative(g, r) < 1e-5, n


def test_state_passing_stays_float32_under_autocast():
    # FFTConvS4's state passing (truncated backpropagation through time over chunks) computes the
    # zero-input response through the Vandermonde product and the next state through a real matmul
    # of the input's blocks: both ran in bfloat16 under autocast (y 2.5e-3, next state 1.7e-3 off).
    # Tolerance as above.
    torch.manual_seed(0)
    conv = FFTConvS4(8, transposed=False, d_state=8)
    x, state = torch.randn(2, 64, 8), torch.randn(2, 8, 4, dtype=torch.complex64)
    ref_y, ref_state = conv(x, state=state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, next_state = conv(x, state=state)
    assert next_state.dtype == ref_state.dtype
    assert relative(y, ref_y) < 1e-5
    assert float((next_state - ref_state).detach().norm() / ref_state.detach().norm()) < 1e-5


@pytest.mark.parametrize("name", [n for n in lrnnx_zoo.list_backends("ssm_kernel")])
def test_inference_kernel_cached_under_autocast_is_float32(name):
    # A kernel cached by an evaluation under autocast was the one later float32 evaluations reused:
    # whatever autocast had done to its generation (S4D's: 2.5e-3 off) stayed in every no_grad
    # forward after the autocast region, until the weights changed. Cached kernels are computed
    # with autocast off, so one computed inside the region is the float32 one. The probe here is a
    # matmul, what any kernel (a third party's too) may contain. Tolerance: float32 rounding.
    torch.manual_seed(0)
    kernel = lrnnx_zoo.get_backend("ssm_kernel", name.split(".", 1)[1])(4, 8)
    a, b = torch.randn(16, 64), torch.randn(64, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        K = kernel.cached_kernel(("probe",), lambda: a @ b)
    with torch.no_grad():
        again = kernel.cached_kernel(("probe",), lambda: a @ b)
    assert again is K                                         # reused, so it must be right
    assert K.dtype == torch.float32
    torch.testing.assert_close(K, a @ b, rtol=1e-6, atol=1e-5)
