"""Tests for lrnnx_zoo.kernels.vandermonde (K[l] = sum_n v_n exp(l log_lam_n), S4D Vandermonde kernel)."""

from __future__ import annotations

import math

import pytest
import torch

from lrnnx_zoo.kernels.keops_support import keops_available, keops_unavailable_reason
from lrnnx_zoo.kernels.vandermonde import (
    vandermonde,
    vandermonde_keops,
    vandermonde_torch,
)

C128 = torch.complex128


def naive(v: torch.Tensor, log_lam: torch.Tensor, L: int, conj: bool = True) -> torch.Tensor:
    """Float64 reference that forms the whole (..., N, L) Vandermonde matrix."""
    ell = torch.arange(L, dtype=torch.float64)
    K = (v.to(C128).unsqueeze(-1) * torch.exp(log_lam.to(C128).unsqueeze(-1) * ell)).sum(-2)
    return 2 * K.real if conj else K


def rand_log_lam(*shape: int, gen: torch.Generator, dtype=C128, max_decay: float = 0.5):
    """log of eigenvalues with |lam| <= 1: Re in [-max_decay, 0], Im in [-pi, pi]."""
    re = -max_decay * torch.rand(*shape, generator=gen, dtype=torch.float64)
    im = math.pi * (2 * torch.rand(*shape, generator=gen, dtype=torch.float64) - 1)
    return torch.complex(re, im).to(dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (norm-relative: elementwise relative error is meaningless where K ~ 0)."""
    return ((a.to(b.dtype) - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# ----------------------------------------------------------------------------------------------
# torch backend
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("conj", [True, False])
@pytest.mark.parametrize("L", [1, 5, 64, 257])
def test_torch_matches_naive_float64(gen, conj, L):
    v = torch.randn(3, 4, 6, dtype=C128, generator=gen)
    log_lam = rand_log_lam(4, 6, gen=gen)            # broadcasts against v's (3, 4) batch
    got = vandermonde_torch(v, log_lam, L, conj=conj)
    assert got.shape == (3, 4, L)
    assert got.dtype == (torch.float64 if conj else C128)
    torch.testing.assert_close(got, naive(v, log_lam, L, conj), rtol=1e-12, atol=1e-12)


def test_geometric_series_closed_form(gen):
    # sum_{l<L} v lam^l = v (1 - lam^L) / (1 - lam) for a single mode.
    v = torch.tensor([0.7 - 0.2j], dtype=C128)
    log_lam = torch.tensor([-0.01 + 0.3j], dtype=C128)
    L = 300
    K = vandermonde_torch(v, log_lam, L, conj=False)
    lam = torch.exp(log_lam)
    expected = (v * (1 - lam**L) / (1 - lam))[0]
    torch.testing.assert_close(K.sum(-1), expected, rtol=1e-12, atol=0)
    # conj=True is 2 Re of the same.
    torch.testing.assert_close(vandermonde_torch(v, log_lam, L).sum(-1), 2 * expected.real,
                               rtol=1e-12, atol=0)


def test_real_inputs_are_accepted():
    v = torch.tensor([1.0, 2.0], dtype=torch.float64)
    log_lam = torch.tensor([-0.5, -0.1], dtype=torch.float64)
    ell = torch.arange(8, dtype=torch.float64)
    expected = 2 * (torch.exp(-0.5 * ell) + 2 * torch.exp(-0.1 * ell))
    torch.testing.assert_close(vandermonde_torch(v, log_lam, 8), expected)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 100, 1000])
def test_chunking_invariance(gen, chunk):
    v = torch.randn(2, 5, dtype=C128, generator=gen)
    log_lam = rand_log_lam(2, 5, gen=gen, max_decay=0.05)
    ref = vandermonde_torch(v, log_lam, 100)
    torch.testing.assert_close(vandermonde_torch(v, log_lam, 100, chunk_size=chunk), ref,
                               rtol=1e-12, atol=1e-12)


def test_float32_accuracy_at_L_65536(gen):
    # Required accuracy: within 1e-5 (norm-relative) of float64 at L = 65536 for |lam| <= 1,
    # including undamped modes (|lam| = 1) whose phase l * Im(log_lam) reaches ~2e5 rad.
    H, N, L = 2, 8, 65536
    log_lam = rand_log_lam(H, N, gen=gen, dtype=torch.complex64, max_decay=1e-4)
    log_lam[:, 0] = torch.complex(torch.zeros(H), log_lam[:, 0].imag)      # |lam| = 1 exactly
    v = torch.randn(H, N, dtype=torch.complex64, generator=gen)
    ref = naive(v, log_lam, L)             # float64 from the same float32 inputs
    got = vandermonde_torch(v, log_lam, L)
    assert got.dtype == torch.float32
    assert rel_err(got, ref) < 1e-5
    got_c = vandermonde_torch(v, log_lam, L, conj=False)
    assert rel_err(got_c, naive(v, log_lam, L, conj=False)) < 1e-5


@pytest.mark.parametrize("conj", [True, False])
def test_gradcheck(gen, conj):
    v = torch.randn(2, 3, dtype=C128, generator=gen, requires_grad=True)
    log_lam = rand_log_lam(2, 3, gen=gen).requires_grad_()
    fn = lambda a, b: vandermonde_torch(a, b, 11, conj=conj, chunk_size=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (v, log_lam))
    # the hand-written backward recomputes differentiably when a graph of the gradient is asked for
    assert torch.autograd.gradgradcheck(fn, (v, log_lam))


def test_zero_length():
    v = torch.ones(3, 2, dtype=torch.complex64)
    assert vandermonde_torch(v, v, 0).shape == (3, 0)
    assert vandermonde_torch(v, v, 0, conj=False).dtype == torch.complex64


# ----------------------------------------------------------------------------------------------
# errors and dispatch
# ----------------------------------------------------------------------------------------------

def test_shape_errors_name_expected_and_given():
    v = torch.ones(4, 3, dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"last \(state\) dimension N.*\(4, 3\).*\(4, 5\)"):
        vandermonde_torch(v, torch.ones(4, 5, dtype=torch.complex64), 8)
    with pytest.raises(ValueError, match="do not broadcast"):
        vandermonde_torch(v, torch.ones(2, 3, dtype=torch.complex64), 8)
    with pytest.raises(ValueError, match=r"vandermonde_torch: batch dims of v \(4, 3\) and log_lam \(2, 3\)"):
        vandermonde_torch(v, torch.ones(2, 3, dtype=torch.complex64), 8)    # its own words, not broadcast_shape's
    with pytest.raises(ValueError, match="non-negative int"):
        vandermonde_torch(v, v, -1)
    with pytest.raises(ValueError, match="chunk_size"):
        vandermonde_torch(v, v, 8, chunk_size=0)


def test_unknown_backend_lists_valid_ones():
    v = torch.ones(2, dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"'cuda'.*auto.*torch.*keops"):
        vandermonde(v, v, 4, backend="cuda")


def test_auto_and_torch_backends_agree(gen):
    v = torch.randn(3, 4, dtype=torch.complex64, generator=gen)
    log_lam = rand_log_lam(3, 4, gen=gen, dtype=torch.complex64)
    ref = vandermonde_torch(v, log_lam, 50)
    torch.testing.assert_close(vandermonde(v, log_lam, 50, backend="torch"), ref)
    torch.testing.assert_close(vandermonde(v, log_lam, 50), ref)   # auto -> torch on CPU


def test_keops_backend_unavailable_raises_with_fix(monkeypatch):
    monkeypatch.setenv("LRNNX_ZOO_DISABLE_KEOPS", "1")
    v = torch.ones(2, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match='backend="torch"'):
        vandermonde(v, v, 4, backend="keops")
    # auto silently falls back to torch.
    assert vandermonde(v, v, 4).shape == (4,)


# ----------------------------------------------------------------------------------------------
# keops backend
# ----------------------------------------------------------------------------------------------

needs_keops = pytest.mark.skipif(
    not keops_available(), reason=f"pykeops unusable: {keops_unavailable_reason()}")


@needs_keops
@pytest.mark.parametrize("dtype", [torch.complex64, C128])
def test_keops_matches_torch_and_grads(gen, dtype):
    v = torch.randn(2, 3, 5, dtype=dtype, generator=gen)
    log_lam = rand_log_lam(3, 5, gen=gen, dtype=dtype, max_decay=0.01)
    L = 300
    tol = 1e-12 if dtype == C128 else 1e-5
    va, la = v.clone().requires_grad_(), log_lam.clone().requires_grad_()
    vb, lb = v.clone().requires_grad_(), log_lam.clone().requires_grad_()
    Kk = vandermonde_keops(va, la, L)
    Kt = vandermonde_torch(vb, lb, L)
    assert Kk.shape == Kt.shape == (2, 3, L) and Kk.dtype == Kt.dtype
    assert rel_err(Kk, naive(v, log_lam, L)) < tol
    assert rel_err(Kt, Kk.double()) < tol
    g = torch.randn(Kt.shape, generator=gen, dtype=Kt.dtype)
    (Kk * g).sum().backward()
    (Kt * g).sum().backward()
    assert rel_err(va.grad, vb.grad.to(C128)) < 10 * tol
    assert rel_err(la.grad, lb.grad.to(C128)) < 10 * tol


@needs_keops
def test_keops_complex_output_and_dispatch(gen):
    v = torch.randn(4, 6, dtype=C128, generator=gen)
    log_lam = rand_log_lam(4, 6, gen=gen, max_decay=0.01)
    K = vandermonde(v, log_lam, 129, conj=False, backend="keops")
    assert K.dtype == C128 and K.shape == (4, 129)
    torch.testing.assert_close(K, naive(v, log_lam, 129, conj=False), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("conj", [True, False])
@pytest.mark.parametrize("case", ["broadcast", "real v", "real log_lam", "float32"])
def test_backward_matches_autograd_of_the_plain_product(gen, conj, case):
    # The backward (one matmul against the saved factors) against autograd through the same
    # factorised computation, in float64 where both are exact to rounding (1e-10 relative), and
    # in float32 against float64 autograd (1e-4 relative: L=300 sums of float32 terms).
    from lrnnx_zoo.kernels.vandermonde import _factors, _kernel_from_factors
    v = torch.randn(3, 4, 5, dtype=C128, generator=gen)            # (C, H, N) against (H, N)
    log_lam = rand_log_lam(4, 5, gen=gen)
    if case == "real v":
        v = v.real.contiguous()
    if case == "real log_lam":
        log_lam = log_lam.real.contiguous()
    L, T = 300, 16

    def grads(v, log_lam, fast):
        v, log_lam = v.clone().requires_grad_(), log_lam.clone().requires_grad_()
        rdt = torch.float64 if (v.real if v.is_complex() else v).dtype == torch.float64 else torch.float32
        K = (vandermonde_torch(v, log_lam, L, conj=conj, chunk_size=T) if fast else
             _kernel_from_factors(v, _factors(log_lam, T, -(-L // T), rdt), L, conj, rdt))
        w_dtype = C128 if K.is_complex() else torch.float64                  # the same w for both precisions
        w = torch.randn(K.shape, dtype=w_dtype, generator=torch.Generator().manual_seed(1)).to(K.dtype)
        return torch.autograd.grad((K * w.conj()).real.sum(), (v, log_lam))

    ref = grads(v, log_lam, fast=False)
    if case == "float32":
        got = grads(v.to(torch.complex64), log_lam, fast=True)      # float32 product, float64 exponents
        tol = 1e-4
    else:
        got = grads(v, log_lam, fast=True)
        tol = 1e-10
    for a, b, x in zip(got, ref, (v, log_lam)):
        assert a.shape == b.shape == x.shape
        assert rel_err(a.to(b.dtype), b) < tol


@pytest.mark.parametrize("conj", [True, False])
def test_vandermonde_second_derivatives(conj):
    # The backward, differentiated, rebuilds its factors from log_lam (the saved ones are constants to
    # autograd); gradgradcheck in float64 with its default tolerances, through plain autograd.
    g = torch.Generator().manual_seed(4)
    c = lambda *s: torch.complex(torch.randn(*s, generator=g, dtype=torch.float64),
                                 torch.randn(*s, generator=g, dtype=torch.float64))
    v, log_lam = c(2, 3).requires_grad_(), (0.1 * c(2, 3) - 0.2).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda v, a: vandermonde_torch(v, a, 11, conj=conj, chunk_size=4), (v, log_lam))


# ----------------------------------------------------------------------------------------------
# many rows sharing one lam: a state's zero-input response (lrnnx_zoo.modal.decayed_response)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("L", [0, 1, 7, 64, 1000])
@pytest.mark.parametrize("dtype,tol", [(torch.complex128, 1e-12), (torch.complex64, 2e-6)])
def test_decayed_response_is_the_vandermonde_product_of_each_row(gen, L, dtype, tol):
    # One (c, H, M) block of powers shared by every row of weights, against the float64 reference per
    # row. complex128: ~1e-15 measured; complex64 (powers rounded once, float32 products over 2M terms):
    # ~2e-7; a block off by one power (lam^{kc} vs lam^{kc+1}) is off by O(1 - |lam|), 1e-2 or more.
    from lrnnx_zoo.modal import decayed_response
    H, M = 3, 5
    log_lam = rand_log_lam(H, M, gen=gen, max_decay=0.05)
    w = torch.complex(torch.randn(4, 2, H, M, generator=gen, dtype=torch.float64),
                      torch.randn(4, 2, H, M, generator=gen, dtype=torch.float64)).to(dtype)
    got = decayed_response(w, log_lam, L)
    assert got.shape == (4, 2, H, L) and got.dtype == w.real.dtype
    if L:
        assert rel_err(got, naive(w, log_lam.expand_as(w), L)) < tol
    with torch.autograd.set_grad_enabled(True):                      # differentiable in w (a state's gradient)
        w64 = w.to(torch.complex128).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: decayed_response(t, log_lam, min(L, 9)), (w64[:1, :1],))
