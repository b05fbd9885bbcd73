"""Paths of lrnnx_zoo.convolution's public functions that a coverage run of the suite found unexercised:
opt_ssm_forward with a full (L, H_out, H) kernel, forward-mode AD through the real convolution's
hand-written Function (dual tensors on inputs that require grad), and fft_conv's refusals."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from lrnnx_zoo.convolution import causal_conv, fft_conv, opt_ssm_forward


def _direct_mimo_conv(x: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """y[b, t, k] = sum_{j <= t} sum_h K[j, k, h] x[b, t - j, h], by loops (the definition)."""
    B, L, _ = x.shape
    y = torch.zeros(B, L, K.shape[1], dtype=x.dtype)
    for t in range(L):
        for j in range(t + 1):
            y[:, t] += x[:, t - j] @ K[j].T
    return y


def test_opt_ssm_forward_with_a_full_kernel_is_the_mimo_convolution():
    # float64 throughout: FFT and direct sums agree to ~1e-15 relative; 1e-12 leaves room for L = 9.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 3, generator=g, dtype=torch.float64)
    K = torch.randn(9, 4, 3, generator=g, dtype=torch.float64)            # (L, H_out, H)
    ignored = torch.full((5, 3), float("nan"))                          # B_ and C are not read for a full kernel
    y = opt_ssm_forward(x, K, ignored, ignored)
    assert y.shape == (2, 9, 4)
    torch.testing.assert_close(y, _direct_mimo_conv(x, K), rtol=1e-12, atol=1e-12)


def test_dual_tensors_through_the_real_convolution_under_autograd():
    # u and K require grad, so causal_conv takes its hand-written Function; under a dual level it runs
    # as the variant with a jvp. The convolution is bilinear: the tangent is du * K + u * dK, compared
    # with the same sums by causal_conv itself in float64 (1e-12: two FFT round trips of O(1) values).
    g = torch.Generator().manual_seed(1)
    u = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    K = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    du, dK = torch.randn_like(u), torch.randn_like(K)
    with fwAD.dual_level():
        out = causal_conv(fwAD.make_dual(u, du), fwAD.make_dual(K, dK))
        y, tangent = fwAD.unpack_dual(out)
    with torch.no_grad():
        want = causal_conv(du, K) + causal_conv(u, dK)
        torch.testing.assert_close(y, causal_conv(u, K), rtol=1e-12, atol=1e-12)
    assert tangent is not None
    torch.testing.assert_close(tangent, want, rtol=1e-12, atol=1e-12)
    # and the backward of the same call still works (the variant keeps the base Function's)
    (gu,) = torch.autograd.grad(causal_conv(u, K).sum(), u)
    assert gu.shape == u.shape


def test_fft_conv_refusals_name_the_equation_and_what_was_given():
    x, K = torch.randn(2, 6, 3), torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"'blh,lh->blh' names 2 operands, got 3 tensors"):
        fft_conv("blh,lh->blh", x, K, K)
    with pytest.raises(TypeError, match=r"operand 'lh' of 'blh,lh->blh' must be a real or complex tensor, got list"):
        fft_conv("blh,lh->blh", x, [[1.0]])
    with pytest.raises(TypeError, match=r"got torch\.int64"):
        fft_conv("blh,lh->blh", x, torch.ones(6, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input must be \(B, L, \.\.\.\)"):
        fft_conv("b,lh->lh", torch.randn(6), K)
    with pytest.raises(ValueError, match=r"output 'bh' must keep the time axis 'l'"):
        fft_conv("blh,lh->bh", x, K)
