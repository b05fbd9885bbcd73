"""Tests for lrnnx_zoo.scan: s_t = lam * s_{t-1} + x_t (LRU recurrence)."""

from __future__ import annotations

import math

import pytest
import torch

from lrnnx_zoo.scan import diagonal_scan, sequential_scan

C128 = torch.complex128


def rand_lam(*shape: int, gen: torch.Generator, r_min: float = 0.5, r_max: float = 1.0,
             dtype=C128) -> torch.Tensor:
    """Complex eigenvalues with r_min <= |lam| <= r_max and any phase."""
    r = r_min + (r_max - r_min) * torch.rand(*shape, generator=gen, dtype=torch.float64)
    theta = math.pi * (2 * torch.rand(*shape, generator=gen, dtype=torch.float64) - 1)
    return torch.polar(r, theta).to(dtype)


def closed_form(lam: torch.Tensor, x: torch.Tensor, s0: torch.Tensor | None) -> torch.Tensor:
    """s_t = lam^{t+1} s0 + sum_{k<=t} lam^{t-k} x_k, with an explicit (L, L) matrix per mode."""
    L = x.shape[1]
    t = torch.arange(L)
    d = (t[:, None] - t[None, :]).clamp(min=0).to(torch.float64)
    M = torch.where(t[:, None] >= t[None, :], torch.ones((), dtype=x.dtype), torch.zeros((), dtype=x.dtype))
    P = M.unsqueeze(-1) * lam ** d.unsqueeze(-1)                   # (L, L, N)
    out = torch.einsum("tkn,bkn->btn", P, x)
    if s0 is not None:
        out = out + lam ** (t.to(torch.float64) + 1).unsqueeze(-1) * s0.unsqueeze(1)
    return out


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(7)


# ----------------------------------------------------------------------------------------------
# forward values
# ----------------------------------------------------------------------------------------------

def test_sequential_matches_closed_form(gen):
    lam = rand_lam(4, gen=gen)
    x = torch.randn(2, 30, 4, dtype=C128, generator=gen)
    s0 = torch.randn(2, 4, dtype=C128, generator=gen)
    torch.testing.assert_close(sequential_scan(lam, x, s0), closed_form(lam, x, s0))


@pytest.mark.parametrize("L", [1, 2, 15, 16, 17, 100, 1000])
@pytest.mark.parametrize("chunk", [None, 2, 3, 16])
@pytest.mark.parametrize("per_batch_lam", [False, True])
def test_matches_sequential_float64(gen, L, chunk, per_batch_lam):
    B, N = 3, 5
    lam = rand_lam(B if per_batch_lam else 1, N, gen=gen)
    lam = lam if per_batch_lam else lam[0]
    x = torch.randn(B, L, N, dtype=C128, generator=gen)
    s0 = torch.randn(B, N, dtype=C128, generator=gen)
    for init in (None, s0):
        got = diagonal_scan(lam, x, init, chunk_size=chunk)
        assert got.shape == (B, L, N)
        torch.testing.assert_close(got, sequential_scan(lam, x, init), rtol=1e-10, atol=1e-10)


def test_reverse_is_flipped_forward(gen):
    lam = rand_lam(4, gen=gen)
    x = torch.randn(2, 77, 4, dtype=C128, generator=gen)
    s0 = torch.randn(2, 4, dtype=C128, generator=gen)
    got = diagonal_scan(lam, x, s0, reverse=True, chunk_size=4)
    torch.testing.assert_close(got, sequential_scan(lam, x.flip(1), s0).flip(1))


def test_float32_long_sequence_near_unit_circle(gen):
    # |lam| = 0.999 keeps ~1/(1-|lam|) = 1000 terms alive in every state, so float32 rounding
    # accumulates over ~1000 multiply-adds: ~sqrt(1000) * 6e-8 ~ 2e-6 typical. 1e-5 relative to
    # the largest state leaves margin for that, while any algorithmic slip (a wrong power of lam,
    # a dropped carry) shows up at O(1e-3) or more.
    B, L, N = 2, 4096, 16
    lam = rand_lam(N, gen=gen, r_min=0.999, r_max=0.999, dtype=torch.complex64)
    x = torch.randn(B, L, N, dtype=torch.complex64, generator=gen)
    s0 = torch.randn(B, N, dtype=torch.complex64, generator=gen)
    ref = sequential_scan(lam.to(C128), x.to(C128), s0.to(C128))
    got = diagonal_scan(lam, x, s0)
    assert got.dtype == torch.complex64
    assert ((got.to(C128) - ref).abs().max() / ref.abs().max()).item() < 1e-5
    loop32 = sequential_scan(lam, x, s0)
    assert ((got - loop32).abs().max() / loop32.abs().max()).item() < 1e-5


def test_lam_dtype_complex128_lam_with_complex64_states(gen):
    # |lam| = 0.99999: a complex64 lam is off by up to ~6e-8, so lam^k by ~k * 6e-8 (1e-3 at
    # k = 16384); the states were 1.5e-4 / 2.1e-4 (forward / reverse) of max|s| from complex128.
    # With lam_dtype=complex128 the powers are exact; what is left, 1.4e-6 / 1.6e-6, comes from the
    # steps within chunks (lam rounded to complex64 for at most T = 64 steps, at each of the few
    # recursion levels, ~64 * 3e-8) and complex64 adds. 3e-6 leaves 2x. x and the result stay complex64.
    B, L, N = 2, 16384, 8
    lam = rand_lam(N, gen=gen, r_min=0.99999, r_max=0.99999)                      # complex128
    x = torch.randn(B, L, N, dtype=torch.complex64, generator=gen)
    s0 = torch.randn(B, N, dtype=torch.complex64, generator=gen)
    for reverse in (False, True):
        ref = diagonal_scan(lam, x.to(C128), s0.to(C128), reverse=reverse)
        got = diagonal_scan(lam, x, s0, reverse=reverse, lam_dtype=C128)
        assert got.dtype == torch.complex64
        assert ((got.to(C128) - ref).abs().max() / ref.abs().max()).item() < 3e-6, reverse


def test_lam_dtype_promotion_rules(gen):
    lam = rand_lam(4, gen=gen)
    x32 = torch.randn(2, 20, 4, generator=gen)
    # lam's kind, x's precision: a complex lam makes a float32 x complex64, not complex128.
    assert diagonal_scan(lam, x32, lam_dtype=C128).dtype == torch.complex64
    assert diagonal_scan(lam, x32).dtype == C128                  # default: one promoted dtype
    # A real lam_dtype names the precision; a complex lam stays complex.
    want = diagonal_scan(lam, x32.to(C128))
    torch.testing.assert_close(diagonal_scan(lam, x32, lam_dtype=torch.float64).to(C128), want,
                               rtol=1e-6, atol=1e-6)
    # Real lam and x stay real; lam_dtype never lowers lam below x's precision.
    lam_r = torch.rand(4, generator=gen, dtype=torch.float64)
    assert diagonal_scan(lam_r, x32, lam_dtype=torch.float64).dtype == torch.float32
    x64 = x32.double()
    torch.testing.assert_close(diagonal_scan(lam_r, x64, lam_dtype=torch.float32), sequential_scan(lam_r, x64))
    with pytest.raises(TypeError, match="lam_dtype"):
        diagonal_scan(lam, x32, lam_dtype=torch.int64)


def test_state_passing_splits_a_sequence(gen):
    # Scanning [x1, x2] equals scanning x1, then x2 from x1's last state.
    lam = rand_lam(6, gen=gen)
    x = torch.randn(2, 90, 6, dtype=C128, generator=gen)
    full = diagonal_scan(lam, x)
    first = diagonal_scan(lam, x[:, :40])
    second = diagonal_scan(lam, x[:, 40:], first[:, -1])
    torch.testing.assert_close(torch.cat([first, second], 1), full)


def test_initial_state_broadcast_and_zero(gen):
    lam = rand_lam(3, gen=gen)
    x = torch.randn(4, 20, 3, dtype=C128, generator=gen)
    s0 = torch.randn(3, dtype=C128, generator=gen)
    torch.testing.assert_close(diagonal_scan(lam, x, s0), sequential_scan(lam, x, s0.expand(4, 3)))
    torch.testing.assert_close(diagonal_scan(lam, x, torch.zeros(4, 3, dtype=C128)),
                               diagonal_scan(lam, x))


def test_real_and_mixed_dtypes(gen):
    lam = torch.rand(4, generator=gen, dtype=torch.float64) * 2 - 1     # incl. negative lam
    x = torch.randn(2, 50, 4, generator=gen, dtype=torch.float64)
    got = diagonal_scan(lam, x, chunk_size=4)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, sequential_scan(lam, x))
    xc = torch.randn(2, 50, 4, generator=gen, dtype=C128)
    torch.testing.assert_close(diagonal_scan(lam, xc, chunk_size=4), sequential_scan(lam, xc))
    # lam = 0 (no memory) and lam = 1 (running sum) are exact edge cases.
    torch.testing.assert_close(diagonal_scan(torch.zeros(4, dtype=torch.float64), x), x)
    torch.testing.assert_close(diagonal_scan(torch.ones(4, dtype=torch.float64), x), x.cumsum(1))


def test_empty_sequence():
    x = torch.zeros(2, 0, 3, dtype=torch.complex64)
    assert diagonal_scan(torch.ones(3, dtype=torch.complex64), x).shape == (2, 0, 3)
    assert sequential_scan(torch.ones(3, dtype=torch.complex64), x).shape == (2, 0, 3)


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_batch_lam", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("chunk", [2, 3, None])
def test_gradcheck_complex(gen, per_batch_lam, reverse, chunk):
    lam = (rand_lam(2, 3, gen=gen) if per_batch_lam else rand_lam(3, gen=gen)).requires_grad_()
    x = torch.randn(2, 9, 3, dtype=C128, generator=gen, requires_grad=True)
    s0 = torch.randn(2, 3, dtype=C128, generator=gen, requires_grad=True)
    fn = lambda a, b, c: diagonal_scan(a, b, c, reverse=reverse, chunk_size=chunk)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (lam, x, s0))


def test_gradgradcheck(gen):
    lam = rand_lam(3, gen=gen).requires_grad_()
    x = torch.randn(2, 7, 3, dtype=C128, generator=gen, requires_grad=True)
    s0 = torch.randn(2, 3, dtype=C128, generator=gen, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b, c: diagonal_scan(a, b, c, chunk_size=2),
                                        (lam, x, s0))


def test_gradcheck_real_and_mixed(gen):
    lam = (torch.rand(3, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_()
    x = torch.randn(2, 9, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    xc = torch.randn(2, 9, 3, generator=gen, dtype=C128, requires_grad=True)
    lamc = rand_lam(3, gen=gen).requires_grad_()
    s0 = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: diagonal_scan(a, b, c, chunk_size=2), (lam, x, s0))
    assert torch.autograd.gradcheck(lambda a, b: diagonal_scan(a, b, chunk_size=2), (lam, xc))
    assert torch.autograd.gradcheck(lambda a, b: diagonal_scan(a, b, chunk_size=2), (lamc, x))


@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck_lam_dtype(gen, reverse):
    # gradcheck needs double inputs: lam_dtype's path (lam cast apart from x, its gradient cast
    # back) in complex128 throughout, then with real x (made complex by lam's kind).
    lam = rand_lam(3, gen=gen).requires_grad_()
    x = torch.randn(2, 9, 3, dtype=C128, generator=gen, requires_grad=True)
    xr = torch.randn(2, 9, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    s0 = torch.randn(2, 3, dtype=C128, generator=gen, requires_grad=True)
    fn = lambda a, b, c=None: diagonal_scan(a, b, c, reverse=reverse, chunk_size=2,  # noqa: E731
                                            lam_dtype=C128)
    assert torch.autograd.gradcheck(fn, (lam, x, s0))
    assert torch.autograd.gradcheck(fn, (lam, xr))
    assert torch.autograd.gradgradcheck(fn, (lam, x, s0))


def test_lam_dtype_mixed_precision_gradients(gen):
    # complex64 x and s0 with a complex128 lam: every gradient has its input's dtype and matches
    # the all-complex128 gradients to float32 rounding (|lam| <= 0.999: ~1000-term sums).
    lam = rand_lam(4, gen=gen, r_min=0.99, r_max=0.999)
    x = torch.randn(2, 3000, 4, dtype=torch.complex64, generator=gen)
    s0 = torch.randn(2, 4, dtype=torch.complex64, generator=gen)
    g = torch.randn(2, 3000, 4, dtype=torch.complex64, generator=gen)
    grads = []
    for cast in (lambda t: t, lambda t: t.to(C128)):
        inputs = [lam.clone().requires_grad_()] + [cast(t).detach().requires_grad_() for t in (x, s0)]
        diagonal_scan(*inputs, lam_dtype=C128).backward(cast(g))
        grads.append([t.grad for t in inputs])
    for got, want in zip(*grads):
        assert got.dtype == (C128 if got.shape == lam.shape else torch.complex64)
        assert ((got.to(C128) - want).abs().max() / want.abs().max()).item() < 1e-5


def test_backward_matches_autograd_through_loop(gen):
    lam = rand_lam(4, gen=gen, r_min=0.9)
    x = torch.randn(3, 200, 4, dtype=C128, generator=gen)
    s0 = torch.randn(3, 4, dtype=C128, generator=gen)
    g = torch.randn(3, 200, 4, dtype=C128, generator=gen)
    grads = []
    for fn in (diagonal_scan, sequential_scan):
        inputs = [t.clone().requires_grad_() for t in (lam, x, s0)]
        fn(*inputs).backward(g)
        grads.append([t.grad for t in inputs])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------

def test_shape_errors_name_expected_and_given():
    x = torch.zeros(2, 10, 4, dtype=torch.complex64)
    lam = torch.ones(4, dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"expected x of shape \(B, L, N\), got \(10, 4\)"):
        diagonal_scan(lam, x[0])
    with pytest.raises(ValueError, match=r"expected lam of shape \(N,\) or \(B, N\) = \(4,\) or "
                                         r"\(2, 4\).*got \(5,\)"):
        diagonal_scan(torch.ones(5), x)
    with pytest.raises(ValueError, match=r"got \(3, 4\)"):
        diagonal_scan(torch.ones(3, 4), x)
    with pytest.raises(ValueError, match=r"expected initial_state of shape \(B, N\) = \(2, 4\), "
                                         r"got \(2, 5\)"):
        diagonal_scan(lam, x, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="chunk_size"):
        diagonal_scan(lam, x, chunk_size=1)
    with pytest.raises(TypeError, match="floating or complex"):
        diagonal_scan(torch.ones(4, dtype=torch.int64), torch.ones(2, 3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating or complex"):
        diagonal_scan(torch.ones(4), torch.ones(2, 3, 4, dtype=torch.int64), lam_dtype=torch.float64)


def _aten_op_counts(fn):
    """The aten ops ``fn()`` dispatches, counted by name."""
    from aten_log import AtenLog
    with AtenLog() as log:
        fn()
    return log.counts()


def test_a_short_scan_takes_its_steps_without_indexing_each_one():
    """At (1, 64, 64) (T=16: 15 in-chunk steps, 3 carry steps) each step indexed two states (38
    selects) and the carry fix-up gathered lam^1..lam^T with an index tensor: most of a short scan's
    per-call cost (LRU forward (1, 64, 128), one thread: 513 -> 387 us with the next test's change)."""
    torch.manual_seed(0)
    lam = torch.exp(torch.complex(-torch.rand(64, dtype=torch.float64), torch.rand(64, dtype=torch.float64)))
    z = torch.randn(1, 64, 64, dtype=torch.complex64)
    with torch.no_grad():
        count = _aten_op_counts(lambda: diagonal_scan(lam, z, lam_dtype=torch.complex128))
    assert count["aten.addcmul_.default"] == 19
    assert count["aten.select.int"] <= 2 and count["aten.index.Tensor"] == 0 and count["aten.arange.start"] == 0


def test_a_scan_without_a_graph_to_record_skips_function_apply(monkeypatch):
    """Function.apply binds its arguments through inspect.signature on every call (55 of 200 us of a
    (1, 64, 64) scan): where autograd records nothing, the forward runs directly, to the same bits;
    with an input requiring grad the Function still runs (and its backward)."""
    import lrnnx_zoo.scan as scan

    torch.manual_seed(0)
    lam = torch.exp(torch.complex(-torch.rand(64, dtype=torch.float64), torch.rand(64, dtype=torch.float64)))
    z = torch.randn(3, 100, 64, dtype=torch.complex64)
    s0 = torch.randn(3, 64, dtype=torch.complex64)
    lam2, z2, s02 = scan._prepare(lam, z, s0, "test", torch.complex128)
    for reverse in (False, True):
        through_apply = scan._DiagonalScan.apply(lam2, z2, s02, reverse, 16)
        calls = []
        real_apply = scan._DiagonalScan.apply
        monkeypatch.setattr(scan._DiagonalScan, "apply", lambda *a: calls.append(1) or real_apply(*a))
        with torch.no_grad():
            direct = diagonal_scan(lam, z, s0, reverse=reverse, chunk_size=16, lam_dtype=torch.complex128)
        assert calls == [] and torch.equal(direct, through_apply)
        x = z.clone().requires_grad_()
        out = diagonal_scan(lam, x, s0, reverse=reverse, chunk_size=16, lam_dtype=torch.complex128)
        assert calls == [1] and out.grad_fn is not None and torch.equal(out.detach(), through_apply)
        monkeypatch.undo()
