"""lrnnx_zoo.modal.powers: lam^l by doubling (no autograd) and as exp(l log lam) (autograd,
torch.compile), both against powers formed in long double (x87 80-bit, 64-bit mantissa)."""

import numpy as np
import pytest
import torch

from lrnnx_zoo.modal import (SQUARED_FACTORS_BELOW, _powers_by_doubling, block_length, block_powers,
                             channel_final_state, decayed_response, powers)


def log_poles(*shape: int) -> torch.Tensor:
    """Stable poles: |lam| in [0.9, 1) and phases up to 3 rad, the range of trained S4D / LRU modes."""
    g = torch.Generator().manual_seed(0)
    r = 0.9 + 0.1 * torch.rand(*shape, generator=g, dtype=torch.float64)
    return torch.complex(torch.log(r), 3 * torch.rand(*shape, generator=g, dtype=torch.float64))


def long_double_powers(log_lam: torch.Tensor, L: int) -> np.ndarray:
    ll = log_lam.numpy().astype(np.clongdouble)
    return np.exp(np.arange(L, dtype=np.longdouble).reshape(L, *([1] * ll.ndim)) * ll)


@pytest.mark.parametrize("L", [0, 1, 2, 3, 37, 1000, 1024])
def test_powers_by_doubling_match_long_double(L):
    # Each power is a product of at most log2(L) factors, each an exponential of an exact exponent:
    # a few ulps of complex128 (measured under 1e-15). exp(l log lam) rounds its exponent: up to
    # 2.3e-13 at L=1024.
    log_lam = log_poles(64)
    got = powers(log_lam, L, torch.complex128)
    assert got.shape == (L, 64) and got.dtype == torch.complex128
    if L:
        assert np.abs(got.numpy() - long_double_powers(log_lam, L)).max() < 4e-15


@pytest.mark.parametrize("L", [37, 1024, 65536])
def test_powers_rounded_to_complex64_square_their_small_factors(L):
    # For a complex64 result the factors below lam^64 are squared, not exponentials (<= 32 ulps of
    # complex128, measured under 1e-14 at L=1024): nothing of it survives the rounding to complex64.
    log_lam = log_poles(16)
    ref = long_double_powers(log_lam, L)
    squared = _powers_by_doubling(log_lam, L, squared_below=SQUARED_FACTORS_BELOW)
    assert np.abs(squared.numpy() - ref).max() < 3e-14
    got = powers(log_lam, L, torch.complex64)
    assert got.dtype == torch.complex64
    assert np.abs(got.numpy() - ref.astype(np.complex64)).max() <= 2 ** -24 * 1.01   # one rounding, at most


def test_powers_keep_the_shape_and_default_dtype():
    log_lam = log_poles(3, 5).to(torch.complex64)
    got = powers(log_lam, 9)
    assert got.shape == (9, 3, 5) and got.dtype == torch.complex64
    ref = torch.from_numpy(long_double_powers(log_lam.to(torch.complex128), 9).astype(np.complex128))
    torch.testing.assert_close(got, ref.to(torch.complex64), rtol=0, atol=1.2e-7)   # float32 rounding, once


def test_powers_under_autograd_agree_and_differentiate():
    # The differentiable path (exp of float64 exponents) and the doubling agree to ~l |log lam| ulps.
    log_lam = log_poles(16).requires_grad_()
    with_grad = powers(log_lam, 300, torch.complex128)
    with torch.no_grad():
        without = powers(log_lam, 300, torch.complex128)
    assert (with_grad.detach() - without).abs().max() < 1e-12
    (grad,) = torch.autograd.grad(with_grad.real.sum(), log_lam)
    l = torch.arange(300, dtype=torch.float64).unsqueeze(1)
    expected = (l * without).sum(0).conj()       # d/d(log lam) of Re(sum_l lam^l), torch's convention
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("L", [1, 5, 64, 1000])
def test_block_powers_give_every_power(L):
    # sum_j lam^{L-1-j} v_j = sum_k outer_k sum_i inner_i v_{kc+i} (v zero-padded in front to n c)
    log_lam = log_poles(4, 6)
    c, inner, outer = block_powers(log_lam, L, torch.complex128)
    n = outer.shape[0]
    assert n * c >= L and inner.shape == (c, 4, 6) and outer.shape == (n, 4, 6)
    every = (outer.unsqueeze(1) * inner.unsqueeze(0)).reshape(n * c, 4, 6)        # lam^{nc-1-m}, m = k c + i
    ref = torch.from_numpy(long_double_powers(log_lam, n * c).astype(np.complex128)).flip(0)
    assert (every - ref).abs().max() < 1e-14      # the two factors' few ulps each, and this product's


@pytest.mark.parametrize("L", [0, 1, 7, 128, 1024, 4096])
@pytest.mark.parametrize("rows", [1, 3, 16, 128, 10_000])
def test_block_length_balances_the_block_sums_against_the_powers(L, rows):
    # Session 28: c = sqrt(rows L): the rows' block sums (rows * n a mode) and the inner powers (c)
    # come out about as many, within 2x, and never more than c + n powers in all are formed. With
    # c = sqrt(L) at batch 128 the block sums were 11x the powers.
    c = block_length(L, rows)
    n = -(-L // c)
    assert 1 <= c <= max(L, 1) and n * c >= L
    if L >= 7 and c < L:
        assert 0.5 <= rows * n / c <= 2.0
    assert block_length(L, 1) == max(1, int(L ** 0.5))      # one row: the fewest powers, as before


@pytest.mark.parametrize("Bsz", [1, 16, 128])
@pytest.mark.parametrize("L", [128, 1024])
def test_batched_final_state_and_decayed_response_stay_float32_accurate(Bsz, L):
    # Longer inner sums at large batches (c up to L): float32 sums of up to L terms. Measured
    # 1e-7 - 4e-7 of max |x| against float64 (H=128, M=32 and H=256, M=128, L up to 4096); 2e-6 bounds it.
    H, M = 8, 6
    log_lam = log_poles(H, M)
    g = torch.Generator().manual_seed(1)
    B = torch.randn(H, M, generator=g, dtype=torch.complex128)
    u = torch.randn(Bsz, H, L, generator=g, dtype=torch.float64)
    state = torch.randn(Bsz, H, M, generator=g, dtype=torch.complex128)
    ref = channel_final_state(u, log_lam, B, state, torch.complex128)
    t = torch.arange(L, dtype=torch.float64).reshape(L, 1, 1)
    decays = torch.exp((L - 1 - t) * log_lam)                                    # lam^{L-1-j}: (L, H, M)
    exact = torch.einsum("bhl,lhm->bhm", u.to(decays.dtype), decays) * B + torch.exp(L * log_lam) * state
    assert ((ref - exact).abs().max() / exact.abs().max()) < 1e-12
    got = channel_final_state(u.float(), log_lam, B.to(torch.complex64), state.to(torch.complex64), torch.complex64)
    assert got.dtype == torch.complex64 and ((got - ref).abs().max() / ref.abs().max()) < 2e-6
    w = state * B
    response = decayed_response(w, log_lam, L)                                     # (Bsz, H, L)
    direct = 2 * (w.unsqueeze(-1) * torch.exp(t.reshape(1, 1, 1, L) * log_lam.unsqueeze(-1))).sum(2).real
    assert ((response - direct).abs().max() / direct.abs().max()) < 1e-12
    got = decayed_response(w.to(torch.complex64), log_lam, L)
    assert ((got - direct).abs().max() / direct.abs().max()) < 2e-6


def test_powers_under_torch_func_transforms_and_forward_ad():
    # The doubling writes with out=, which vmap, jvp and torch.func's grad refuse (inside grad a
    # parameter's wrapper does not say it requires grad): those take the differentiable formula.
    log_lam = log_poles(2, 5)
    plain = powers(log_lam, 40, torch.complex128)
    batched = torch.func.vmap(lambda ll: powers(ll, 40, torch.complex128))(log_lam)
    assert (batched - plain.transpose(0, 1)).abs().max() < 1e-12
    tangent = torch.ones_like(log_lam)
    value, derivative = torch.func.jvp(lambda ll: powers(ll, 40, torch.complex128), (log_lam,), (tangent,))
    l = torch.arange(40, dtype=torch.float64).reshape(40, 1, 1)
    assert (value - plain).abs().max() < 1e-12 and (derivative - l * plain).abs().max() < 1e-9
    g = torch.func.grad(lambda ll: powers(ll, 40, torch.complex128).real.sum())(log_lam)
    assert (g - (l * plain).sum(0).conj()).abs().max() < 1e-9
