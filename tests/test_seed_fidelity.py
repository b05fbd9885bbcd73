"""The seed API pages (DESIGN.md, seeds/) against the code: what a user porting code written against
lrnnx or the standalone S4 module gets. Each test was a discrepancy an audit found."""

from __future__ import annotations

import pytest
import torch

from lrnnx_zoo.convolution import opt_ssm_forward
from lrnnx_zoo.plugins.lru import LRU


def test_opt_ssm_forward_names_a_kernel_in_the_base_class_layout():
    # The seed's LTI_LRNN.compute_kernel documents K as (N, L); opt_ssm_forward takes (L, N) (its own
    # page's layout, README). An (N, L) kernel failed inside einsum: "Size of label 'n' for operand 1
    # (5) does not match previous terms (9)".
    torch.manual_seed(0)
    layer = LRU(3, 5)
    lam, B, C = layer.discretize()
    K, _ = layer.compute_kernel(9, lam, B)
    x = torch.randn(2, 9, 3)
    with pytest.raises(ValueError, match=r"K looks like \(N, L\) = \(5, 9\): pass K\.T"):
        opt_ssm_forward(x, K.T, B, C)
    with pytest.raises(ValueError, match=r"^opt_ssm_forward expects x \(B, L, H\), K \(L, N\).*B_ \(3, 5\)"):
        opt_ssm_forward(x, K, B.T, C)
    torch.testing.assert_close(opt_ssm_forward(x, K, B, C), layer(x) - layer.D * x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transposed", [False, True])
def test_linear_activation_passes_its_keyword_arguments_to_either_linear_class(transposed):
    # Seed: "**kwargs - Additional keyword arguments passed to the linear layer". With transposed=True
    # they were dropped: dtype=torch.float64 built float32 weights, and a misspelt keyword passed silently.
    from lrnnx_zoo.plugins.s4 import LinearActivation
    lin = LinearActivation(3, 4, transposed=transposed, dtype=torch.float64, device="cpu")
    assert lin.weight.dtype == lin.bias.dtype == torch.float64
    with pytest.raises(TypeError, match="unexpected keyword argument 'dtpye'"):
        LinearActivation(3, 4, transposed=transposed, dtpye=torch.float64)


def test_lru_compute_kernel_refuses_the_seed_diagonal_matrix_and_misshapen_b():
    # The seed's LRU.discretize() documents A as the (N, N) diagonal matrix of Lambda; passed to
    # compute_kernel it gave (L, N, N) powers with NaN off the diagonal, and B.T came back as given.
    layer = LRU(3, 5)
    lam, B, _ = layer.discretize()
    with pytest.raises(ValueError, match=r"Lambda of shape \(N,\) = \(5,\).*got \(5, 5\).*torch\.diagonal\(A\)"):
        layer.compute_kernel(9, torch.diag(lam), B)
    with pytest.raises(ValueError, match=r"B_complex of shape \(N, H\) = \(5, 3\), got \(3, 5\)"):
        layer.compute_kernel(9, lam, B.T)
    K, B_out = layer.compute_kernel(9, lam, B)
    assert K.shape == (9, 5) and B_out is B


def test_s4_names_itself_for_a_keyword_neither_it_nor_its_kernel_takes():
    # the reference code's S4(..., verbose=True) failed as "HippoSSKernel.__init__() got an unexpected
    # keyword argument 'verbose'", a class the caller never named
    from lrnnx_zoo.plugins.s4 import S4
    with pytest.raises(TypeError, match=r"^S4 got unexpected keyword arguments \['hyper_act', 'verbose'\]: it passes "
                                        r"extra keywords to its kernel, HippoSSKernel, which takes measure, rank, "):
        S4(8, verbose=True, hyper_act=None)
    assert S4(8, measure="legt", rank=2, dt_min=0.01, n_ssm=2).kernel is not None
