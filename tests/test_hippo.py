"""HiPPO matrices, NPLR factors, bilinear discretisation, power and krylov."""

import math

import pytest
import torch

from lrnnx_zoo import hippo

NORMAL_MEASURES = [  # (measure, minimal rank, measure_args)
    ("legs", 1, {}),
    ("legt", 2, {}),
    ("fourier", 1, {}),
    ("lagt", 1, {"beta": 1.0}),
    ("lagt", 1, {"beta": 0.3}),
    ("tlagt", 1, {"beta": 1.0}),
    ("tlagt", 1, {"beta": 0.4}),
    ("glagt", 1, {"alpha": 0.0, "beta": 0.01}),
]


def _expand(X: torch.Tensor) -> torch.Tensor:
    return torch.cat([X, X.conj()], dim=-1)


# -- closed forms ---------------------------------------------------------------------------------


def test_legs_closed_form():
    N = 8
    A, B = hippo.transition("legs", N)
    assert A.dtype == B.dtype == torch.float64 and A.shape == (N, N) and B.shape == (N,)
    A_ref = torch.zeros(N, N, dtype=torch.float64)
    B_ref = torch.zeros(N, dtype=torch.float64)
    for n in range(N):
        B_ref[n] = math.sqrt(2 * n + 1)
        for k in range(N):
            if n > k:
                A_ref[n, k] = -math.sqrt(2 * n + 1) * math.sqrt(2 * k + 1)
            elif n == k:
                A_ref[n, k] = -(n + 1)
    # Exact integer/sqrt arithmetic on both sides: only the last bit may differ.
    torch.testing.assert_close(A, A_ref, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(B, B_ref, rtol=1e-14, atol=1e-14)


def test_legt_closed_form():
    """LegT in the S4 normalisation: LMU (theta = 2) conjugated by diag((-1)^n sqrt(2n+1))."""
    N = 8
    A, B = hippo.transition("legt", N)
    A_ref = torch.zeros(N, N, dtype=torch.float64)
    B_ref = torch.zeros(N, dtype=torch.float64)
    for n in range(N):
        B_ref[n] = 0.5 * math.sqrt(2 * n + 1)
        for k in range(N):
            sign = 1.0 if n >= k else (-1.0) ** (n - k)
            A_ref[n, k] = -0.5 * math.sqrt(2 * n + 1) * math.sqrt(2 * k + 1) * sign
    # Same formula evaluated two ways: agreement to the last bit or two.
    torch.testing.assert_close(A, A_ref, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(B, B_ref, rtol=1e-14, atol=1e-14)


def test_legt_is_similar_to_lmu():
    """The LMU matrix (Voelker et al. 2019) with theta=2 maps to our LegT under T=diag((-1)^n sqrt(2n+1))."""
    N, theta = 8, 2.0
    A_lmu = torch.zeros(N, N, dtype=torch.float64)
    B_lmu = torch.zeros(N, dtype=torch.float64)
    for i in range(N):
        B_lmu[i] = (2 * i + 1) * (-1.0) ** i / theta
        for j in range(N):
            A_lmu[i, j] = (2 * i + 1) / theta * (-1.0 if i < j else (-1.0) ** (i - j + 1))
    T = torch.diag(torch.tensor([(-1.0) ** n / math.sqrt(2 * n + 1) for n in range(N)],
                                dtype=torch.float64))
    A, B = hippo.transition("legt", N)
    # Similarity transforms of small integer matrices: rounding-level agreement.
    torch.testing.assert_close(T @ A_lmu @ torch.linalg.inv(T), A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(T @ B_lmu, B, rtol=1e-12, atol=1e-12)


def test_other_closed_forms():
    N = 6
    A, B = hippo.transition("lagt", N, beta=0.5)
    tril = torch.tril(torch.ones(N, N, dtype=torch.float64))
    torch.testing.assert_close(A, -0.5 * tril)
    torch.testing.assert_close(B, torch.full((N,), 0.5, dtype=torch.float64))
    A, B = hippo.transition("tlagt", N, beta=1.0)
    torch.testing.assert_close(A, -tril)  # no tilt = HiPPO-LagT
    A, B = hippo.transition("glagt", N, alpha=0.0, beta=0.2)
    torch.testing.assert_close(A, -0.6 * torch.eye(N, dtype=torch.float64) - torch.tril(torch.ones(N, N), -1).double())
    torch.testing.assert_close(B, torch.ones(N, dtype=torch.float64))  # binom(n, n) = 1
    A, B = hippo.transition("fourier", 5)
    r2 = math.sqrt(2)
    torch.testing.assert_close(B, torch.tensor([1, r2, 0, r2, 0], dtype=torch.float64))
    S = A + torch.outer(B, B)
    assert S[1, 2] == pytest.approx(-2 * math.pi) and S[4, 3] == pytest.approx(4 * math.pi)
    # glagt with alpha != 0 is lagt-like with the h_k/h_n similarity, so the spectrum is unchanged.
    A1, _ = hippo.transition("glagt", 16, alpha=0.5, beta=0.3)
    A0, _ = hippo.transition("glagt", 16, alpha=0.0, beta=0.3)
    torch.testing.assert_close(torch.diagonal(A1), torch.diagonal(A0))


def test_random_and_diagonal():
    A, B = hippo.transition("random", 16, seed=0)
    A2, _ = hippo.transition("random", 16, seed=0)
    assert torch.equal(A, A2) and A.shape == (16, 16) and B.shape == (16,)
    A, B = hippo.transition("diagonal", 16, seed=1)
    assert torch.equal(A, torch.diag(torch.diagonal(A))) and (torch.diagonal(A) < 0).all()
    for m in ("random", "diagonal"):
        P = hippo.rank_correction(m, 16, rank=2)
        assert P.shape == (2, 16) and not P.any()
        with pytest.raises(ValueError, match="normal-plus-low-rank"):
            hippo.nplr(m, 16)


def test_bad_arguments():
    with pytest.raises(ValueError, match="legs.*legt|legt.*legs"):
        hippo.transition("legendre", 8)
    with pytest.raises(TypeError, match="beta"):
        hippo.transition("legs", 8, beta=1.0)
    with pytest.raises(ValueError, match="rank >= 2"):
        hippo.rank_correction("legt", 8, rank=1)
    with pytest.raises(ValueError, match="alpha"):
        hippo.rank_correction("glagt", 8, alpha=0.5)
    with pytest.raises(ValueError, match="even"):
        hippo.nplr("legs", 7)


# -- normal plus low rank -------------------------------------------------------------------------


@pytest.mark.parametrize("measure,rank,args", NORMAL_MEASURES)
def test_rank_correction_makes_normal(measure, rank, args):
    N = 64
    A, _ = hippo.transition(measure, N, **args)
    P = hippo.rank_correction(measure, N, rank=rank, dtype=torch.float64, **args)
    assert P.shape == (rank, N) and P.dtype == torch.float64
    M = A + P.mT @ P
    comm = torch.linalg.norm(M @ M.mT - M.mT @ M) / torch.linalg.norm(M) ** 2
    # Exact algebraic identity; float64 rounding on O(N)-sized entries leaves ~1e-15.
    assert comm < 1e-5
    # Sanity: A itself is far from normal, so the check above is not vacuous.
    comm_A = torch.linalg.norm(A @ A.mT - A.mT @ A) / torch.linalg.norm(A) ** 2
    assert comm_A > 1e-3
    # Extra requested rank is zero padding.
    P2 = hippo.rank_correction(measure, N, rank=rank + 1, dtype=torch.float64, **args)
    torch.testing.assert_close(P2[:rank], P)
    assert not P2[rank:].any()


@pytest.mark.parametrize("measure,rank,args", NORMAL_MEASURES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nplr_rebuilds_A(measure, rank, args, dtype):
    N = 64
    A, B = hippo.transition(measure, N, **args)
    w, P, Bh, V = hippo.nplr(measure, N, rank=rank, dtype=dtype, **args)
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    assert w.shape == (N // 2,) and P.shape == (rank, N // 2) and Bh.shape == (N // 2,)
    assert V.shape == (N, N // 2) and {w.dtype, P.dtype, Bh.dtype, V.dtype} == {cdt}
    w, P, Bh, V = (x.to(torch.complex128) for x in (w, P, Bh, V))
    assert (w.imag >= 0).all() and (w.imag.diff() >= 0).all()  # kept half, sorted by Im
    Vf = _expand(V)
    # The factors were computed in float64; float32 storage adds ~1e-7 relative per entry, summed
    # over N = 64 terms, so 1e-5 relative leaves an order of magnitude of slack in both dtypes.
    torch.testing.assert_close(Vf.mH @ Vf, torch.eye(N, dtype=torch.complex128), rtol=0, atol=1e-5)
    Pf = _expand(P)
    A_rebuilt = Vf @ (torch.diag(_expand(w)) - Pf.mT @ Pf.conj()) @ Vf.mH
    rel = torch.linalg.norm(A_rebuilt - A) / torch.linalg.norm(A)
    assert rel < 1e-5
    assert torch.linalg.norm(A_rebuilt.imag) / torch.linalg.norm(A) < 1e-5
    rel_B = torch.linalg.norm(2 * (V @ Bh).real - B) / torch.linalg.norm(B)
    assert rel_B < 1e-5


def test_nplr_legs_eigenvalues():
    w, *_ = hippo.nplr("legs", 16, dtype=torch.float64)
    # The normal part of LegS is -I/2 + skew: every eigenvalue has real part exactly -1/2.
    torch.testing.assert_close(w.real, torch.full((8,), -0.5, dtype=torch.float64))


# -- discretisation, powers, krylov ---------------------------------------------------------------


def test_bilinear_diagonal_closed_form():
    torch.manual_seed(0)
    lam = -torch.rand(3, 4, dtype=torch.float64) - 0.1
    B = torch.randn(3, 4, dtype=torch.float64)
    dt = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    dA, dB = hippo.bilinear(dt, torch.diag_embed(lam), B)
    h = dt[:, None] / 2
    # Scalar Tustin: (1 + h a)/(1 - h a) and dt b/(1 - h a); solve on a diagonal is exact to rounding.
    torch.testing.assert_close(dA, torch.diag_embed((1 + h * lam) / (1 - h * lam)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dB, dt[:, None] * B / (1 - h * lam), rtol=1e-12, atol=1e-12)
    dA2, none = hippo.bilinear(0.1, torch.diag_embed(lam[0]))
    assert none is None
    torch.testing.assert_close(dA2, dA[0])


def test_bilinear_dense_matches_inverse_formula():
    A, B = hippo.transition("legs", 8)
    dA, dB = hippo.bilinear(0.01, A, B)
    I = torch.eye(8, dtype=torch.float64)
    inv = torch.linalg.inv(I - 0.005 * A)
    # Well-conditioned (I - dt/2 A): solve and explicit inverse agree to ~1e-15.
    torch.testing.assert_close(dA, inv @ (I + 0.005 * A), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dB, inv @ (0.01 * B), rtol=1e-12, atol=1e-12)


def _small_stable(N=6, batch=(2,), seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch, N, N, dtype=torch.float64, generator=g) / math.sqrt(N) * 0.9
    return A, g


@pytest.mark.parametrize("L", [0, 1, 2, 5, 16, 17, 31])
def test_power_matches_matrix_power(L):
    A, g = _small_stable()
    # Same products in a different order: rounding-level differences only.
    torch.testing.assert_close(hippo.power(L, A), torch.linalg.matrix_power(A, L), rtol=1e-10, atol=1e-12)
    v = torch.randn(2, 6, L, dtype=torch.float64, generator=g)
    AL, s = hippo.power(L, A, v)
    ref = torch.zeros(2, 6, dtype=torch.float64)
    for l in range(L):
        ref = ref + (torch.linalg.matrix_power(A, l) @ v[..., l, None])[..., 0]
    # Explicit sum vs the doubling scan: same terms, different association -> rounding only.
    torch.testing.assert_close(AL, torch.linalg.matrix_power(A, L), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s, ref, rtol=1e-10, atol=1e-12)


def test_power_scan_broadcasts_and_complex():
    A, g = _small_stable(batch=())
    Ac = A.to(torch.complex128) * (1 + 0.1j)
    v = torch.randn(3, 6, 9, dtype=torch.complex128, generator=g)
    _, s = hippo.power(9, Ac, v)
    ref = sum(torch.linalg.matrix_power(Ac, l) @ v[..., l, None] for l in range(9))[..., 0]
    torch.testing.assert_close(s, ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError):
        hippo.power(4, Ac, v)


@pytest.mark.parametrize("L", [1, 2, 7, 8, 33])
def test_krylov_matches_powers(L):
    A, g = _small_stable()
    b = torch.randn(2, 6, dtype=torch.float64, generator=g)
    c = torch.randn(3, 1, 6, dtype=torch.float64, generator=g)  # broadcasts against batch (2,)
    K = hippo.krylov(L, A, b)
    ref = torch.stack([torch.linalg.matrix_power(A, l) @ b[..., None] for l in range(L)], -1)[..., 0, :]
    # Products of a contraction (spectral radius < 1), tiny rounding differences only.
    torch.testing.assert_close(K, ref, rtol=1e-10, atol=1e-12)
    y, AL = hippo.krylov(L, A, b, c=c, return_power=True)
    assert y.shape == (3, 2, L)
    torch.testing.assert_close(y, torch.einsum("xbn,bnl->xbl", c, ref), rtol=1e-10, atol=1e-12)
    # A^{L-1}, the highest power in the sequence (seed API meaning); power(L, A) is A^L
    torch.testing.assert_close(AL, torch.linalg.matrix_power(A, L - 1), rtol=1e-10, atol=1e-12)


def test_hippo_does_not_import_pykeops():
    import subprocess
    import sys

    code = "import sys, lrnnx_zoo.hippo; assert 'pykeops' not in sys.modules, 'pykeops imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_nplr_is_diagonalised_once_per_measure_and_size(monkeypatch):
    # Every layer of a model built the same O(N^3) eigendecomposition (1.1 s at N=1024, per layer);
    # it is cached, and what callers get are copies: writing into one leaves the next call as computed.
    from lrnnx_zoo import hippo

    hippo._nplr_cached.cache_clear()
    calls = []
    real = hippo._skew_eig_half
    monkeypatch.setattr(hippo, "_skew_eig_half", lambda S: calls.append(S.shape) or real(S))
    first = hippo.nplr("legs", 16, dtype=torch.float64)
    for t in first:
        t.zero_()
    again = hippo.nplr("legs", 16, dtype=torch.float64)
    single = hippo.nplr("legs", 16)                      # complex64: the same factors, cast
    assert calls == [(16, 16)]
    hippo._nplr_cached.cache_clear()
    fresh = hippo.nplr("legs", 16, dtype=torch.float64)
    assert len(calls) == 2
    for a, b, c in zip(again, fresh, single):
        assert torch.equal(a, b) and c.dtype == torch.complex64 and torch.equal(c, b.to(torch.complex64))
    hippo.nplr("fourier", 16, dtype=torch.float64)
    hippo.nplr("legs", 18, dtype=torch.float64)
    assert len(calls) == 4                               # another measure, another size: computed


def test_the_s4_helpers_design_lists_beside_hippos_import_from_it():
    # DESIGN.md lists LinearActivation, TransposedLinear, Activation and get_initializer with the
    # HiPPO helpers of lrnnx_zoo.hippo; they lived only in the S4 plugin (a typing/docs audit).
    import lrnnx_zoo.plugins.s4 as s4
    from lrnnx_zoo import hippo
    for name in ("LinearActivation", "TransposedLinear", "Activation", "get_initializer"):
        assert getattr(hippo, name) is getattr(s4, name)
        assert name in hippo.__all__
    with pytest.raises(AttributeError, match="has no attribute 'Linear'"):
        hippo.Linear


def test_reference_helpers_refuse_sizes_past_the_tensor_bound():
    # transition(measure, 2**20) asked the allocator for 8.8 TB; krylov(2**30, ...) at N=4 ran for
    # minutes toward a 32 GB block on a 24 GB machine. Both are refused up front, naming the sizes.
    with pytest.raises(ValueError, match=r"transition with N=1048576 builds a tensor \(1048576, 1048576\) of "
                                         r"1.1e\+12 elements, more than the 1e\+09"):
        hippo.transition("legs", 1 << 20)
    with pytest.raises(ValueError, match=r"krylov with L=1073741824 builds a tensor \(4, 2147483648\)"):
        hippo.krylov(1 << 30, 0.5 * torch.eye(4), torch.ones(4))
    with pytest.raises(ValueError, match=r"krylov with L=4000000 builds a tensor \(300, 4, 8000000\)"):
        hippo.krylov(4_000_000, 0.5 * torch.eye(4).expand(300, 4, 4), torch.ones(4))
    assert hippo.krylov(1000, 0.5 * torch.eye(4), torch.ones(4)).shape == (4, 1000)
