"""The NPLR system as a dense real matrix, for everything Algorithm 1 does not cover.

Conventions (one channel; M = N/2; the ``lrnnx_zoo.hippo`` conjugate-pair halving):
the full complex state is ``x_full = [x, conj x]`` with ``x`` in C^M, and

    A_full = diag([w, conj w]) - P_full^T conj(P_full),     P_full = [P, conj P]   (rank r),
    B_full = [B, conj B],   y = C_full^T x_full = 2 Re(C . x).

Because P_full mixes x and conj x, x' = A x is real-linear, not complex-linear, in x:

    (A x) = w * x - sum_r P_r * 2 Re(conj(P_r) . x).

In the real coordinates  r = [Re x, Im x]  (N reals) this is the real matrix

    A_r = [[diag Re w, -diag Im w], [diag Im w, diag Re w]] - 2 sum_r p_r p_r^T,   p_r = [Re P_r, Im P_r],
    b_r = [Re B, Im B],    c_r = [2 Re C, -2 Im C]   (y = c_r . r),

an orthogonal change of basis (times sqrt 2) of the original HiPPO matrices. Dense work (A_bar^L
for C~, zoh, state passing, step modes) is done here in float64.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from lrnnx_zoo import hippo
from lrnnx_zoo.discretization import zoh_dense

__all__ = ["to_real", "from_real", "output_row", "output_from_row", "complex_scaling", "real_matrix",
           "bilinear_nplr", "bilinear_dplr", "discretize", "advance_state_dplr", "dplr_state_cheaper",
           "rows_times_power_dplr", "dplr_power_cheaper", "power_products",
           "two_level_kernel", "block_sizes", "squaring_chain", "krylov_doubling",
           "power_of_two_at_least", "power_up_to", "advance_state", "per_channel", "solve_per_channel"]


def to_real(x: Tensor) -> Tensor:
    """(..., M) complex -> (..., 2M) real  [Re x, Im x]."""
    return torch.cat([x.real, x.imag], dim=-1)


def from_real(r: Tensor) -> Tensor:
    """(..., 2M) real -> (..., M) complex."""
    M = r.shape[-1] // 2
    return torch.complex(r[..., :M], r[..., M:])


def _columns(x: Tensor) -> Tensor:
    """x: (..., H, m) -> (H, m, batch): the batch as columns of each channel's right-hand side."""
    H, m = x.shape[-2:]
    return x.reshape(math.prod(x.shape[:-2]), H, m).permute(1, 2, 0)


def _from_columns(cols: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`_columns` for the batch dims of ``like``: (H, n, batch) -> (..., H, n)."""
    return cols.permute(2, 0, 1).reshape(*like.shape[:-2], cols.shape[0], cols.shape[1])


def per_channel(M: Tensor, x: Tensor) -> Tensor:
    """M[h] x[..., h] for each channel: M (H, n, m), x (..., H, m) -> (..., H, n), as one product per
    channel with the batch as its columns. ``(M @ x.unsqueeze(-1)).squeeze(-1)`` broadcast M over the
    batch as a copy: (B, H, N, N), 2.1 GB at B=64, H=64, N=256."""
    return _from_columns(M @ _columns(x.to(M.dtype)), x)


def solve_per_channel(M: Tensor, r: Tensor) -> Tensor:
    """z with M[h] z[..., h] = r[..., h]: M (H, n, n), r (..., H, n) -> (..., H, n), one factorisation
    per channel (solving the unsqueezed r factorised a broadcast copy of M per batch row)."""
    return _from_columns(torch.linalg.solve(M, _columns(r.to(M.dtype))), r)


def output_row(C: Tensor) -> Tensor:
    """C: (..., M) complex -> c_r: (..., 2M) real with  c_r . to_real(x) = 2 Re(C . x)."""
    return 2 * torch.cat([C.real, -C.imag], dim=-1)


def output_from_row(c: Tensor) -> Tensor:
    """Inverse of :func:`output_row`: c: (..., 2M) real -> C: (..., M) complex."""
    M = c.shape[-1] // 2
    return torch.complex(c[..., :M], -c[..., M:]) / 2


def complex_scaling(d: Tensor) -> Tensor:
    """(H, N, N) real matrix of the complex multiplication x -> d * x on r = [Re x, Im x]; d: (H, M)
    complex. Its transpose is the multiplication by conj(d)."""
    H, M = d.shape
    A = d.real.new_zeros(H, 2 * M, 2 * M)
    idx = torch.arange(M, device=d.device)
    A[:, idx, idx] = d.real
    A[:, idx + M, idx + M] = d.real
    A[:, idx, idx + M] = -d.imag
    A[:, idx + M, idx] = d.imag
    return A


def real_matrix(w: Tensor, P: Tensor) -> Tensor:
    """A_r: (H, N, N) real from w: (H, M) and P: (r, H, M) complex (module docstring)."""
    p = to_real(P).transpose(0, 1)                      # (H, r, N)
    return complex_scaling(w) - 2 * p.transpose(-1, -2) @ p


def _woodbury(w: Tensor, P: Tensor, dt: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(d, U, GV) with (I - h A_r)^{-1} = complex_scaling(d) - U^T GV, h = dt/2 (:func:`bilinear_nplr`):
    d (H, M) complex, U and GV (H, r, N) real."""
    h = (dt / 2).unsqueeze(-1)                                        # (H, 1)
    d = 1 / (1 - h * w)                                               # S^{-1} as a complex factor
    Ph = P.transpose(0, 1)                                            # (H, r, M)
    U = 2 * h.unsqueeze(-1) * to_real(d.unsqueeze(-2) * Ph)           # (H, r, N): rows of S^{-1} 2h p^T
    V = to_real(d.conj().unsqueeze(-2) * Ph)                          # (H, r, N): rows of p S^{-1}
    G = torch.eye(P.shape[0], dtype=dt.dtype, device=dt.device) \
        + V @ to_real(Ph).transpose(-1, -2) * 2 * h.unsqueeze(-1)    # (H, r, r)
    # rank 1 (the default; legt needs 2): the 1 x 1 solve is a division, where LAPACK's batched
    # solve of H such systems took 0.5-6 ms (a prefill of 16 steps at H=64 solved it 4 times)
    return d, U, (V / G if G.shape[-1] == 1 else torch.linalg.solve(G, V))


def bilinear_nplr(w: Tensor, P: Tensor, B: Tensor, dt: Tensor) -> Tuple[Tensor, Tensor]:
    """The bilinear (A_bar (H, N, N), b_bar (H, N)) of A_r = real_matrix(w, P), b_r = to_real(B),
    step dt (H,), without a dense solve: what ``discretize(real_matrix(w, P), to_real(B), dt,
    "bilinear")`` gives, to float64 rounding, in O(N^2 r) per channel instead of O(N^3).

    I - h A_r = S + 2h p^T p (h = dt/2) with S = I - h Lambda_r the multiplication by 1 - h w, so
    Woodbury: (I - h A_r)^{-1} = S^{-1} - S^{-1} U G^{-1} V,  U = 2h S^{-1} p^T,  V = p S^{-1},
    G = I_r + V 2h p^T (r x r); then A_bar = 2 (I - h A_r)^{-1} - I and b_bar = (I - h A_r)^{-1} dt b_r.
    (A dense batched solve took 20 ms per S4 layer at H=128, N=64, and prefill ran it three times.)
    w: (H, M), P: (r, H, M), B: (H, M) complex; dt: (H,) real."""
    d, U, GV = _woodbury(w, P, dt)
    Ut = U.transpose(-1, -2)
    # A_bar = 2 (I - h A_r)^{-1} - I = S(2d - 1) - 2 U^T GV in one pass over the (H, N, N) result, and
    # b_bar without the inverse: forming it, doubling it and subtracting I were four passes, 0.29 of
    # the first step form's 0.42 s at H=N=256
    A_bar = torch.baddbmm(complex_scaling(2 * d - 1), Ut, GV, alpha=-2)
    b_bar = to_real(d * B) - (Ut @ (GV @ to_real(B).unsqueeze(-1))).squeeze(-1)       # (I - h A_r)^{-1} b_r
    return A_bar, dt.unsqueeze(-1) * b_bar


def bilinear_dplr(w: Tensor, P: Tensor, B: Tensor, dt: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The bilinear A_bar of :func:`bilinear_nplr` as a diagonal plus rank-r map, never formed, for
    states r: (..., H, 2, M) real (:func:`to_real`'s [Re x, Im x] split in its two halves):

        A_bar r = r * a_re + flip(r) * a_im - sum_k (g_k . r) v_k,

    (2 S^{-1} - I as a complex scaling by 2d - 1, written on the halves; g_k the rows of G^{-1} V,
    v_k those of 2 U); and b_bar in the same layout. Returns (a_re, a_im, g, v, b_bar): (H, 2, M),
    (H, 2, M), (H, r, 2, M), (H, r, 2, M), (H, 2, M); O(N r) per step and channel where the dense
    A_bar costs O(N^2) (:func:`advance_state_dplr`)."""
    d, U, GV = _woodbury(w, P, dt)
    H, M = d.shape
    a = 2 * d - 1
    a_re = torch.stack([a.real, a.real], -2)
    a_im = torch.stack([-a.imag, a.imag], -2)
    g, v = GV.reshape(H, -1, 2, M), (2 * U).reshape(H, -1, 2, M)
    b = to_real(B)
    b_bar = dt.unsqueeze(-1) * (to_real(d * B) - ((GV * b.unsqueeze(-2)).sum(-1, keepdim=True) * U).sum(-2))
    return a_re, a_im, g, v, b_bar.reshape(H, 2, M)


def discretize(A: Tensor, b: Tensor, dt: Tensor, method: str) -> Tuple[Tensor, Tensor]:
    """A_bar: (H, N, N), b_bar: (H, N) from A: (H, N, N), b: (H, N), dt: (H,).

    bilinear: [S4] eq. 3;  zoh: exp(dt A) and A^{-1}(exp(dt A) - I) b by the Van Loan block exponential.
    """
    if method == "bilinear":
        A_bar, b_bar = hippo.bilinear(dt, A, b)
    elif method == "zoh":
        A_bar, b_bar = zoh_dense(A, b, dt)
    else:
        raise ValueError(f"discretization must be 'bilinear' or 'zoh', got {method!r}")
    return A_bar, b_bar


def block_sizes(L: int) -> Tuple[int, int]:
    """(T, J): the two-level split of L steps into J blocks of T (a power of two, ~sqrt L)."""
    T = 1 << max(0, math.ceil(math.log2(max(L, 1)) / 2))
    return T, -(-L // T)


def two_level_kernel(A: Tensor, b: Tensor, c: Tensor, L: int,
                     block: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """K[..., l] = c^T A^l b for l < L, in O(N^2 sqrt L + N L) work per channel.

    Writing l = jT + t (T ~ sqrt L):  K[jT + t] = ((A^T)^{jT} c) . (A^t b): two Krylov blocks of
    ~sqrt L vectors and one (J, N) x (N, T) product; no (N, L) tensor is formed.

    Args:
        A: (H, N, N).  b: (..., H, N) (e.g. (H, N) or (B, H, N)).  c: (C, H, N).
        block: :func:`krylov_doubling` of A^T and b for T = block_sizes(L), if already computed.
    Returns:
        (..., C, H, L) with b's leading dims first.
    """
    T, J = block_sizes(L)
    cols, ATt = block or krylov_doubling(T, A.transpose(-1, -2).contiguous(), b)    # (..., H, T, N), (A^T)^T
    rows = hippo.krylov(J, ATt, c)                                # (C, H, N, J)
    K = torch.einsum("chnj,...htn->...chjt", rows, cols)
    return K.reshape(*K.shape[:-2], J * T)[..., :L]


def squaring_chain(At: Tensor, b: Tensor, L: int, T: int) -> Tuple[Tensor, Tensor, Tensor]:
    """One chain of squares of A serving a power and a Krylov block, given At = A transposed (..., N, N)
    and T a power of two: ((A^L) transposed, rows K[..., t, :] = A^t b (..., T, N), (A^T) transposed).

    A^L multiplies the squares of L's binary digits, the block doubles with each square below T, and
    the square at T is A^T: log2(max(L, T)) N x N products for all three (hippo.power and hippo.krylov
    square A anew each). Transposed, so that the Krylov block grows by (k, N) x (N, N) products,
    2-4x faster than (N, N) x (N, k) for the few columns k of the first doublings (H=128, N=64)."""
    K, square, power, AT, i = b.unsqueeze(-2), At, None, None, 0
    while True:
        if (L >> i) & 1:
            power = square if power is None else power @ square    # transposes of commuting powers
        if (1 << i) < T:
            K = torch.cat([K, K @ square], dim=-2)                # rows (A^{s + 2^i} b)^T
        elif (1 << i) == T:
            AT = square
        if AT is not None and L >> (i + 1) == 0:
            break
        square, i = square @ square, i + 1                        # (A^{2^i})^T squared = (A^{2^{i+1}})^T
    if power is None:
        power = torch.eye(At.shape[-1], dtype=At.dtype, device=At.device).expand_as(At)
    return power, K, AT


def krylov_doubling(T: int, At: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """Rows [A^t b]_{t<T} (..., T, N) and (A^T) transposed, given At = A transposed and T a power of
    two (:func:`squaring_chain` without a power)."""
    return squaring_chain(At, b, 0, T)[1:]


def _dplr_step(r: Tensor, a_re: Tensor, a_im: Tensor, g: Tensor, v: Tensor) -> Tensor:
    """One application of the diagonal plus rank-r map of :func:`bilinear_dplr` to r (..., H, 2, M):
    r * a_re + flip(r) * a_im - sum_k (g_k . r) v_k."""
    nxt = torch.addcmul(r * a_re, r.flip(-2), a_im)
    for k in range(g.shape[1]):                                       # the rank-r feedback, r = 1 or 2
        nxt = torch.addcmul(nxt, (r * g[:, k]).sum((-2, -1), keepdim=True), v[:, k], value=-1)
    return nxt


def advance_state_dplr(system: Tuple[Tensor, Tensor, Tensor, Tensor, Tensor], u: Tensor, x: Tensor) -> Tensor:
    """x_{L-1} of x_t = A_bar x_{t-1} + b_bar u_t from x_{-1} = x, stepping the diagonal plus low-rank
    A_bar of :func:`bilinear_dplr` (``system``) L times: exact like :func:`advance_state`, at
    O(B H N r L) work and no N x N matrix, but L steps. u: (B, H, L) real, x: (B, H, N) real -> (B, H, N).

    The steps cost ~25 us + 4 ns per entry of the state (H=256, N=256, batch 1: 0.13 ms, against
    ~170 ms for each square of the dense (H, N, N) A_bar that :func:`advance_state` takes log2 sqrt(L)
    of): :func:`dplr_state_cheaper` chooses."""
    a_re, a_im, g, v, b_bar = system
    Bsz, H, L = u.shape
    N = x.shape[-1]
    r = x.reshape(Bsz, H, 2, N // 2)            # (sizes spelled out: an empty batch has no -1 to infer)
    steps = u.permute(2, 0, 1).reshape(L, Bsz, H, 1, 1)             # u_t broadcast over the state
    for t in range(L):
        r = torch.addcmul(_dplr_step(r, a_re, a_im, g, v), b_bar, steps[t])
    return r.reshape(Bsz, H, N)


def rows_times_power_dplr(system: Tuple[Tensor, Tensor, Tensor, Tensor, Tensor], c: Tensor, L: int) -> Tensor:
    """c^T A_bar^L for rows c: (..., H, N) real, A_bar the diagonal plus low-rank map of
    :func:`bilinear_dplr` (``system``; its b_bar is not used), by L steps of the transposed map, never
    forming A_bar: O(H N r L) for each row where squaring the dense A_bar costs O(H N^3 log L)
    (:func:`dplr_power_cheaper` chooses). A_bar^T is the same kind of map: the complex scaling by
    conj(2d - 1) (a_im negated) and the rank-r part v_k g_k^T transposed (g and v swapped)."""
    a_re, a_im, g, v, _ = system
    shape = c.shape
    r = c.reshape(*shape[:-1], 2, shape[-1] // 2)
    for _ in range(L):
        r = _dplr_step(r, a_re, -a_im, v, g)
    return r.reshape(shape)


def _dplr_steps_seconds(rows: int, H: int, N: int, L: int) -> float:
    """Expected time of L steps of :func:`bilinear_dplr`'s map on rows x H states of N reals (float64,
    2 threads, benchmarks/bench_prefill.py --s4-paths): ~25 us + 4 ns per complex state entry a step."""
    return L * (25e-6 + 4e-9 * rows * H * N / 2)


def _dense_products_seconds(count: float, H: int, N: int) -> float:
    """Expected time of ``count`` float64 (H, N, N) x (H, N, N) products: ~0.1 ms + 60 ps per multiply-add."""
    return count * (1e-4 + 6e-11 * H * N ** 3)


def dplr_state_cheaper(B: int, H: int, N: int, L: int) -> bool:
    """Whether :func:`advance_state_dplr` is expected to beat :func:`advance_state` (no block at hand)
    for an input (B, H, L) and N real state coordinates, by the costs measured here (2 threads,
    float64, benchmarks/bench_prefill.py --s4-paths): a DPLR step ~25 us + 4 ns per state entry
    (B H N / 2 complex); the dense path log2(T) + 1 squares of (H, N, N) at ~0.1 ms + 60 ps per
    multiply-add and J = L / T Horner steps that read (H, N, N) at ~0.8 ns per entry. At H=256:
    dense from L ~ 128 at N=16 and L ~ 1024 at N=64; DPLR at N=256 to L = 4096 and beyond (0.52 s
    against 1.29 s there, 25 against 678 ms at L=128)."""
    T, J = block_sizes(max(L, 1))
    dense = _dense_products_seconds(math.log2(T) + 1, H, N) + J * (2e-5 + 8e-10 * H * N * N * -(-B // 8))
    return _dplr_steps_seconds(B, H, N, L) < dense


def dplr_power_cheaper(rows: int, H: int, N: int, steps: int, products: int) -> bool:
    """Whether ``steps`` steps of the DPLR map for rows x H vectors (:func:`rows_times_power_dplr`) are
    expected to beat ``products`` dense (H, N, N) float64 products (squares of A_bar towards the same
    power; :func:`hippo.power` takes floor(log2 L) squares and popcount(L) - 1 products for A^L). The
    dense path also forms A_bar (H, N, N) first, which this leaves out. At H=128, L=1024: dense up to
    N ~ 128, DPLR from there (N=512: ~0.2 s against ~10 s)."""
    return _dplr_steps_seconds(rows, H, N, steps) < _dense_products_seconds(products, H, N)


def power_products(L: int) -> int:
    """The (N, N) products :func:`hippo.power` takes for A^L: floor(log2 L) squares and popcount(L) - 1
    multiplications."""
    return max(L.bit_length() - 1, 0) + max(bin(L).count("1") - 1, 0)


def power_of_two_at_least(L: int) -> int:
    """The smallest power of two >= L (L >= 1). Comparisons only: a symbolic L in a compiled graph
    is guarded to its range (2^(k-1), 2^k], not pinned."""
    n = 1
    while n < L:
        n *= 2
    return n


def power_up_to(A: Tensor, L: int, bound: int) -> Tensor:
    """A^L for 0 <= L <= bound (a Python int), A: (..., N, N), without a branch on L.

    The squares A^(2^i) are those of ``bound``'s bits, and each factor is chosen by L's bit i in
    arithmetic, bit * A^(2^i) + (1 - bit) * I (exactly one of the two), so a symbolic L in a
    compiled graph is not pinned: hippo.power's ``if`` on each bit guarded L to its value, a graph per
    length. 2 (bit_length(bound) - 1) products, about twice hippo.power's."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    result, square = None, A
    for i in range(bound.bit_length()):
        bit = (L // (1 << i)) % 2
        factor = square * bit + eye * (1 - bit)
        result = factor if result is None else result @ factor
        if i + 1 < bound.bit_length():
            square = square @ square
    return eye.expand_as(A) if result is None else result


def advance_state(A: Tensor, b: Tensor, u: Tensor, x: Tensor, block: Optional[Tuple[Tensor, Tensor]] = None
                  ) -> Tensor:
    """x_{L-1} = A^L x_{-1} + sum_j A^{L-1-j} b u_j   (state passing, exact).

    With m = L-1-j = aT + t the sum is a Horner scheme in A^T over ~sqrt L blocks:
    sum_a A^{aT} y_a,  y_a = sum_t (A^t b) u_{L-1-aT-t}.

    In a compiled graph the blocks are those of Lp, the next power of two >= L (u padded with zeros,
    inputs before u_0, which add nothing), A^L x is computed for a zero x too (no test of values), and
    A^L is :func:`power_up_to` Lp: nothing pins L, and a graph serves the lengths (Lp/2, Lp], as the
    kernel's does (SSKernelNPLR._tilde_for); the loop over L's blocks and A^L's bits compiled a
    graph per length.

    Args:
        A: (H, N, N), b: (H, N), u: (B, H, L) real, x: (B, H, N) real.   Returns (B, H, N).
        block: the Krylov rows and (A^T) transposed of :func:`krylov_doubling` for some T, if already
            computed (:func:`squaring_chain`); by default those of T = block_sizes(L).
    """
    L = u.shape[-1]
    if L == 0:                      # an empty chunk leaves the state as it is (and has no block to start from)
        return x
    compiling = torch.compiler.is_compiling()
    span = power_of_two_at_least(L) if compiling else L
    rows, ATt = block or krylov_doubling(block_sizes(span)[0], A.transpose(-1, -2).contiguous(), b)  # (H, T, N)
    T = rows.shape[-2]
    J = -(-span // T)
    rev = torch.nn.functional.pad(u.flip(-1), (0, J * T - L))     # zeros = inputs before u_0
    rev = rev.reshape(*u.shape[:-1], J, T).permute(2, 1, 0, 3).contiguous()   # (J, H, B, T)
    # Horner on row vectors, acc <- acc (A^T)^T + y_a with y_a = rev_a rows, each block's term formed
    # as it is used: all J of them at once, (J, H, B, N), took 2.8 GB at B=64, H=64, N=256, L=4096.
    # A batched (1, N) x (N, N) product is ~4x faster than (N, N) x (N, 1) at batch 1 (0.12 against
    # 0.45 ms at H=128, N=64), and J of them run.
    acc = torch.bmm(rev[J - 1], rows)                             # (H, B, N)
    for a in range(J - 2, -1, -1):
        acc = torch.baddbmm(torch.bmm(rev[a], rows), acc, ATt)
    acc = acc.transpose(0, 1)                                     # (B, H, N)
    if compiling:
        return acc + per_channel(power_up_to(A, L, span), x)
    if not x.is_meta and not bool(x.any()):     # from rest (a prefill): A^L would cost more than the rest
        return acc
    AL = hippo.power(L, A)
    return acc + per_channel(AL, x)
