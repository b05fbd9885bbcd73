"""Discretization and FFT convolution against closed forms and direct sums (float64, so the
tolerances reflect the formulas, not rounding: 1e-10 unless stated)."""

from __future__ import annotations

import math

import pytest
import torch

from lrnnx_zoo import LRNN, LTI_LRNN
from lrnnx_zoo.convolution import causal_conv, fast_fft_size, fft_conv, opt_ssm_forward
from lrnnx_zoo.discretization import METHODS, discretize, get_discretization

D64 = torch.float64


def direct_causal_conv(u, K):
    """y_t = sum_{j<=t} K_j u_{t-j} along the last axis, by loops."""
    L = u.shape[-1]
    y = torch.zeros(torch.broadcast_shapes(u.shape, K.shape[:-1] + (L,)), dtype=torch.promote_types(u.dtype, K.dtype))
    for t in range(L):
        for j in range(min(t + 1, K.shape[-1])):
            y[..., t] += K[..., j] * u[..., t - j]
    return y


@pytest.mark.parametrize("structure", ["diagonal", "dense"])
def test_discretizations_match_closed_forms_on_scalars(structure):
    a, b, dt = -0.7, 1.3, 0.05
    A = torch.tensor([a], dtype=D64)
    B = torch.tensor([b], dtype=D64)
    if structure == "dense":
        A, B = A.reshape(1, 1), B.reshape(1)
    expect = {
        "zoh": (math.exp(dt * a), (math.exp(dt * a) - 1) / a * b),
        "bilinear": ((1 + dt * a / 2) / (1 - dt * a / 2), dt * b / (1 - dt * a / 2)),
        "dirac": (math.exp(dt * a), b),
        "no_discretization": (a, b),
    }
    for method, (ea, eb) in expect.items():
        dA, dB = discretize(method, A, B, torch.tensor(dt, dtype=D64), structure)
        assert dA.flatten().item() == pytest.approx(ea, rel=1e-12), method
        assert dB.flatten().item() == pytest.approx(eb, rel=1e-12), method


def test_dense_zoh_matches_diagonalised_zoh():
    torch.manual_seed(0)
    lam = torch.complex(-torch.rand(4, dtype=D64), torch.randn(4, dtype=D64))
    V = torch.linalg.qr(torch.randn(4, 4, dtype=torch.complex128))[0]
    A = V @ torch.diag(lam) @ V.conj().T
    B = torch.randn(4, dtype=torch.complex128)
    dt = torch.tensor(0.1, dtype=D64)
    for method in ("zoh", "bilinear"):
        dA, dB = discretize(method, A, B, dt, "dense")
        dl, db = discretize(method, lam, V.conj().T @ B, dt, "diagonal")
        torch.testing.assert_close(dA, V @ torch.diag(dl) @ V.conj().T, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(dB, V @ db, rtol=1e-10, atol=1e-10)


def test_zoh_near_zero_eigenvalue_keeps_precision():
    A = torch.tensor([-1e-9], dtype=torch.float32)
    _, dB = discretize("zoh", A, torch.ones(1), torch.tensor(0.1))
    assert dB.item() == pytest.approx(0.1, rel=1e-5)  # expm1 avoids cancellation (naive gives 0 or 0.149)
    # exactly 0: the limit dt (it was 0/0 = NaN), complex too, with finite gradients
    A = torch.tensor([0.0, -0.5], dtype=torch.float64, requires_grad=True)
    _, dB = discretize("zoh", A, torch.ones(2, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64))
    assert dB[0].item() == 0.1 and torch.isfinite(torch.autograd.grad(dB.sum(), A)[0]).all()
    _, dBc = discretize("zoh", torch.zeros(1, dtype=torch.complex64), torch.ones(1, dtype=torch.complex64),
                        torch.tensor(0.1))
    assert dBc.item() == pytest.approx(0.1)


def test_async_refused_for_lti_and_unknown_names():
    class T(LTI_LRNN):
        def discretize(self): ...
        def compute_kernel(self): ...
        def step_form(self): ...
        def forward(self, x, integration_timesteps=None, lengths=None): ...
    with pytest.raises(ValueError, match="async discretization needs a time-varying"):
        T("async")
    with pytest.raises(ValueError, match="unknown discretization 'foh'; expected one of zoh, bilinear"):
        T("foh")
    assert T("zoh").discretize_fn is get_discretization("zoh")
    assert T(None).discretize_fn is None
    assert set(METHODS) == {"zoh", "bilinear", "dirac", "async", "no_discretization"}
    assert issubclass(LTI_LRNN, LRNN)


def test_fast_fft_size():
    assert fast_fft_size(2047) == 2048 and fast_fft_size(2001) == 2025 and fast_fft_size(7) == 8
    for n in (1, 97, 1000, 4095):
        m = fast_fft_size(n)
        assert m >= n and all(p in (2, 3, 5) for p in _prime_factors(m))
    smooth = [m for m in range(1, 17000) if all(p in (2, 3, 5) for p in _prime_factors(m))]
    nxt = iter(smooth)
    m = next(nxt)
    for n in range(0, 16385):                  # the smallest such size, against a scan of all of them
        while m < n:
            m = next(nxt)
        assert fast_fft_size(n) == m, n


def _prime_factors(n):
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out or [2]


@pytest.mark.parametrize("L,Lk", [(37, 37), (64, 10), (100, 100)])
def test_causal_conv_matches_direct_sum(L, Lk):
    torch.manual_seed(0)
    u, K = torch.randn(2, 3, L, dtype=D64), torch.randn(3, Lk, dtype=D64)
    torch.testing.assert_close(causal_conv(u, K), direct_causal_conv(u, K), rtol=1e-10, atol=1e-10)
    uc = torch.randn(2, 3, L, dtype=torch.complex128)
    torch.testing.assert_close(causal_conv(uc, K), direct_causal_conv(uc, K), rtol=1e-10, atol=1e-10)
    # along another axis
    torch.testing.assert_close(causal_conv(u.transpose(1, 2), K.T, dim=-2).transpose(1, 2),
                               direct_causal_conv(u, K), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("dim", [-1, -2])
def test_causal_conv_returns_a_contiguous_tensor(dim, grad):
    # The README's plugin example convolves (B, L, H) along dim=-2 and returned the transform's view,
    # in a transposed layout: its layer failed the contract kit's contiguous check, and the
    # layers after it ran on a row-strided tensor.
    u = torch.randn(3, 50, 16, requires_grad=grad)
    K = torch.randn(50, 16) if dim == -2 else torch.randn(16, 50)
    y = causal_conv(u if dim == -2 else u.transpose(1, 2), K, dim=dim)
    assert y.is_contiguous(), f"strides {y.stride()} for shape {tuple(y.shape)}"


def test_fft_conv_full_kernel_and_diagonal_ssm():
    torch.manual_seed(0)
    B, L, H, N = 2, 20, 3, 4
    x = torch.randn(B, L, H, dtype=D64)
    Kf = torch.randn(L, H, H, dtype=D64)                      # (L, H_out, H_in)
    ref = direct_causal_conv(x.permute(0, 2, 1)[:, None], Kf.permute(1, 2, 0)[None]).sum(2).permute(0, 2, 1)
    torch.testing.assert_close(fft_conv("blh,lkh->blk", x, Kf), ref, rtol=1e-10, atol=1e-10)
    lam = torch.complex(torch.rand(N, dtype=D64) * 0.9, torch.rand(N, dtype=D64))
    Bm = torch.randn(N, H, dtype=torch.complex128)
    C = torch.randn(H, N, dtype=torch.complex128)
    K = lam[None] ** torch.arange(L, dtype=D64)[:, None]      # (L, N)
    # recurrence reference
    s = torch.zeros(B, N, dtype=torch.complex128)
    ys = []
    for t in range(L):
        s = lam * s + x[:, t].to(torch.complex128) @ Bm.T
        ys.append((s @ C.T).real)
    ref = torch.stack(ys, 1)
    torch.testing.assert_close(fft_conv("blh,ln,nh,kn->blk", x, K, Bm, C).real, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(opt_ssm_forward(x, K, Bm, C), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("B,H,N", [(1, 16, 2), (2, 3, 4)])   # the project-first / the full-kernel branch
def test_opt_ssm_forward_float32_input_with_complex128_system(B, H, N):
    # Both evaluation orders compute in the input's precision. The full-kernel one (chosen by cost
    # for small H or large N) crashed in einsum on a complex64 input spectrum against a complex128
    # kernel, while the project-first one cast the system down: which one ran depended on the sizes.
    torch.manual_seed(0)
    L = 10
    x = torch.randn(B, L, H)
    lam = torch.complex(torch.rand(N, dtype=D64) * 0.9, torch.rand(N, dtype=D64))
    Bm, C = torch.randn(N, H, dtype=torch.complex128), torch.randn(H, N, dtype=torch.complex128)
    K = lam[None] ** torch.arange(L, dtype=D64)[:, None]
    ref = opt_ssm_forward(x.double(), K, Bm, C)
    y = opt_ssm_forward(x, K, Bm, C)
    assert y.dtype == torch.float32
    # float32 rounding of the system and the transforms: ~1e-7 relative, 1e-5 with margin
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-5


def test_fft_conv_errors():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="explicit output"):
        fft_conv("blh,lh", x, torch.randn(5, 3))
    with pytest.raises(ValueError, match="has 2 axes, tensor has shape"):
        fft_conv("blh,lh->blh", x, torch.randn(5, 3, 1))


@pytest.mark.parametrize("shape,pad,narrow", [((2, 300, 7), 0, None), ((3, 129, 130), 512, None), ((1, 5, 3), 8, None),
                                              ((0, 4, 512), 0, None), ((2, 70, 512), 600, None),
                                              ((3, 64, 1024), 0, 1000), ((2, 3, 512), 0, 500)])
def test_swap_time_and_channels_pads_and_differentiates(shape, pad, narrow):
    # rows 4 KiB apart (512 float64s; a narrowed 1024-wide signal) take the matrix-by-matrix path
    from lrnnx_zoo.convolution import swap_time_and_channels
    x = torch.randn(*shape, dtype=D64)
    x = (x if narrow is None else x[..., :narrow]).requires_grad_(True)
    shape = x.shape
    y = swap_time_and_channels(x, pad_to=pad)
    L = shape[1]
    assert y.shape == (shape[0], shape[2], max(L, pad)) and y.is_contiguous()
    assert torch.equal(y[..., :L], x.transpose(1, 2)) and not y[..., L:].any()
    g = torch.randn_like(y)
    (y * g).sum().backward()
    assert torch.equal(x.grad, g[..., :L].transpose(1, 2))


@pytest.mark.parametrize("u_shape,K_shape,dim", [((2, 3, 37), (3, 37), -1), ((2, 3, 50), (1, 3, 20), -1),
                                                  ((2, 41, 3), (41, 3), -2)])
def test_real_causal_conv_gradients(u_shape, K_shape, dim):
    # float64 gradcheck of the hand-written backward (real transforms only), broadcasting included
    u = torch.randn(*u_shape, dtype=D64, requires_grad=True)
    K = torch.randn(*K_shape, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, K: causal_conv(u, K, dim=dim), (u, K))


@pytest.mark.parametrize("frozen", ["u", "K"])
def test_real_causal_conv_gradient_of_one_input(frozen):
    # each spectrum is kept (conjugated in place) only for the other input's gradient
    u = torch.randn(2, 3, 37, dtype=D64, requires_grad=frozen != "u")
    K = torch.randn(3, 37, dtype=D64, requires_grad=frozen != "K")
    assert torch.autograd.gradcheck(lambda u, K: causal_conv(u, K), (u, K))


def test_real_causal_conv_refuses_second_derivatives_instead_of_giving_wrong_ones():
    # Its backward reads spectra saved without a graph: with create_graph=True the second
    # derivatives came out wrong (gradgradcheck: Jacobian mismatch), silently.
    u = torch.randn(2, 3, 7, dtype=D64, requires_grad=True)
    K = torch.randn(3, 7, dtype=D64, requires_grad=True)
    y = causal_conv(u, K)
    with pytest.raises(RuntimeError, match="no second derivative.*create_graph=True"):
        torch.autograd.grad(y.square().sum(), (u, K), create_graph=True)


def test_real_causal_conv_gradient_of_a_padded_signal():
    from lrnnx_zoo.convolution import conv_size, swap_time_and_channels
    x = torch.randn(2, 30, 3, dtype=D64, requires_grad=True)
    K = torch.randn(3, 30, dtype=D64, requires_grad=True)
    f = lambda x, K: causal_conv(swap_time_and_channels(x, pad_to=conv_size(30, 30)), K, length=30)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, K))
    torch.testing.assert_close(f(x, K), causal_conv(x.transpose(1, 2), K), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("L,Lk,n", [(30, 30, 64), (17, 5, 21), (10, 12, 12)])
def test_channels_last_conv_against_the_sum_and_its_gradients(L, Lk, n):
    # y[b, t, h] = sum_s K[h, (t - s) mod n] x[b, s, h]: causal for n >= L + Lk - 1, wrapping on a
    # full circle (n = Lk = 12, the anti-causal taps of a bidirectional S4); float64 to 1e-10
    from lrnnx_zoo.convolution import channels_last_conv
    x = torch.randn(2, L, 3, dtype=D64, requires_grad=True)
    K = torch.randn(3, Lk, dtype=D64, requires_grad=True)
    y = channels_last_conv(x, K, n)
    assert y.shape == (2, L, 3) and y.is_contiguous()
    taps = torch.cat([K, K.new_zeros(3, n - Lk)], -1)
    idx = (torch.arange(L)[:, None] - torch.arange(L)[None, :]) % n
    ref = torch.einsum("hts,bsh->bth", taps[:, idx], x)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda x, K: channels_last_conv(x, K, n), (x, K))


def _whole_tensor_channels_last_conv(x, K, n, skip=None):
    """channels_last_conv's other path: layout copies around whole-tensor transforms."""
    from lrnnx_zoo.convolution import circular_conv, swap_time_and_channels
    u = swap_time_and_channels(x, pad_to=n)
    if K.dim() == 3:                     # (C, H, Lk) kernels -> (B, L, C, H)
        u = u.unsqueeze(1)
    y = circular_conv(u, K, n, x.shape[1])
    y = y if skip is None else y + skip.unsqueeze(-1) * u[..., :x.shape[1]]
    return swap_time_and_channels(y) if K.dim() == 2 else swap_time_and_channels(y.flatten(1, 2)).unflatten(2, K.shape[:2])


@pytest.mark.parametrize("grads,with_skip", [("all", False), ("x", False), ("K", False),
                                              ("all", True), ("x", True), ("K", True), ("skip", True)])
@pytest.mark.parametrize("B,L,H,Lk,n", [(4, 1100, 40, 1100, 2200), (2, 64, 33, 64, 128), (1, 100, 7, 20, 119)])
@pytest.mark.parametrize("C", [None, 2])                 # one (H, Lk) kernel, or C of them per channel
def test_channels_last_conv_blocked_training_path_gives_the_whole_tensor_paths_bits(grads, with_skip, B, L, H, Lk, n, C):
    # On the CPU under autograd channels_last_conv streams blocks of channels through the cache
    # (_BlockedConv). It makes the same transforms, products and sums per channel as
    # the whole-tensor path, so values and every gradient are equal bit for bit (float32; the
    # first shape has a partial last block and more steps than one gather tile), for a gradient
    # that arrives as a transposed view too.
    import lrnnx_zoo.convolution as cv
    from lrnnx_zoo.convolution import channels_last_conv
    torch.manual_seed(0)
    lead = () if C is None else (C,)
    x0, K0, s0 = torch.randn(B, L, H), torch.randn(*lead, H, Lk) / Lk, torch.randn(*lead, H)
    w = torch.randn(*lead, H, L)

    def run(conv):
        x = x0.clone().requires_grad_(grads in ("all", "x"))
        K = K0.clone().requires_grad_(grads in ("all", "K"))
        skip = s0.clone().requires_grad_(grads in ("all", "skip")) if with_skip else None
        y = conv(x, K, n, skip)
        (y.movedim(1, -1) * w).sum().backward()           # dL/dy reaches the layer non-contiguous
        return y, x.grad, K.grad, None if skip is None else skip.grad

    y, *grad = run(channels_last_conv)
    blocked = y.grad_fn if C else y.grad_fn.next_functions[0][0]          # (B, L, 1, H) squeezed
    assert type(blocked).__name__ == "_BlockedConvBackward" and y.is_contiguous()
    assert y.shape == (B, L, *lead, H)
    assert cv.channel_block_size(B, n) < H or L < 1000          # the first shape has several blocks
    ref_y, *ref_grad = run(_whole_tensor_channels_last_conv)
    assert torch.equal(y, ref_y)
    for got, want in zip(grad, ref_grad):
        assert (got is None) == (want is None) and (got is None or torch.equal(got, want))


@pytest.mark.parametrize("C", [None, 2])
def test_channels_last_conv_with_a_skip_against_the_sum_and_its_gradients(C):
    # float64 gradcheck of the blocked path's hand-written backward, C kernels and skip included (1e-10)
    from lrnnx_zoo.convolution import channels_last_conv
    lead = () if C is None else (C,)
    x = torch.randn(2, 17, 3, dtype=D64, requires_grad=True)
    K = torch.randn(*lead, 3, 5, dtype=D64, requires_grad=True)
    skip = torch.randn(*lead, 3, dtype=D64, requires_grad=True)
    y = channels_last_conv(x, K, 21, skip)
    idx = torch.arange(17)[:, None] - torch.arange(17)[None, :]
    taps = torch.where((idx >= 0) & (idx < 5), K[..., idx.clamp(0, 4)], K.new_zeros(()))   # (*lead, 3, t, s)
    ref = torch.einsum("...hts,bsh->bt...h", taps, x) + skip * (x if C is None else x.unsqueeze(2))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda x, K, skip: channels_last_conv(x, K, 21, skip), (x, K, skip))


@pytest.mark.parametrize("C,with_skip", [(None, False), (None, True), (2, True)])
def test_channels_first_conv_blocked_path_gives_the_whole_tensor_bits_and_its_gradients(C, with_skip):
    # (B, H, L) signals (seed-style transposed layers) take the same blocked path without layout
    # copies; equal bit for bit to circular_conv (float32, a partial last block), and gradcheck
    # of the hand-written backward in float64
    from lrnnx_zoo.convolution import channels_first_conv, circular_conv
    torch.manual_seed(0)
    lead = () if C is None else (C,)
    B, H, L, n = 4, 40, 1100, 2200

    def run(conv, dtype=torch.float32):
        u = torch.randn(B, H, L, generator=torch.Generator().manual_seed(1), dtype=dtype).requires_grad_(True)
        K = (torch.randn(*lead, H, L, generator=torch.Generator().manual_seed(2), dtype=dtype) / L).requires_grad_(True)
        skip = torch.randn(*lead, H, generator=torch.Generator().manual_seed(3), dtype=dtype).requires_grad_(True)
        y = conv(u, K, n, skip if with_skip else None)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=dtype))
        return y, u.grad, K.grad, skip.grad

    def whole(u, K, n, skip):
        v = u if C is None else u.unsqueeze(1)
        y = circular_conv(v, K, n, L)
        return y if skip is None else y + skip.unsqueeze(-1) * v

    got, want = run(channels_first_conv), run(whole)
    assert type(got[0].grad_fn).__name__ == ("_BlockedConvBackward" if C else "SqueezeBackward1")
    for a, b in zip(got, want):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    u = torch.randn(2, 3, 17, dtype=D64, requires_grad=True)
    K = torch.randn(*lead, 3, 5, dtype=D64, requires_grad=True)
    skip = torch.randn(*lead, 3, dtype=D64, requires_grad=True) if with_skip else None
    assert torch.autograd.gradcheck(lambda u, K: channels_first_conv(u, K, 21, skip), (u, K))


def test_channels_last_and_first_conv_refuse_a_circle_shorter_than_the_signal():
    # it failed deep in the transform ("start (0) + length (30) exceeds dimension size (20)")
    from lrnnx_zoo.convolution import channels_first_conv, channels_last_conv
    x, K = torch.randn(2, 30, 3), torch.randn(3, 10)
    for conv, signal in ((channels_last_conv, x), (channels_first_conv, x.transpose(1, 2))):
        with pytest.raises(ValueError, match=r"n=20 samples is shorter than the signal's 30 steps: expected n >= L"):
            conv(signal, K, 20)


def test_channels_last_conv_blocked_path_refuses_second_derivatives():
    from lrnnx_zoo.convolution import channels_last_conv
    x = torch.randn(2, 9, 3, requires_grad=True)
    K = torch.randn(3, 9, requires_grad=True)
    y = channels_last_conv(x, K, 17)
    assert type(y.grad_fn.next_functions[0][0]).__name__ == "_BlockedConvBackward"
    with pytest.raises(RuntimeError, match="no second derivative.*torch.func.grad"):
        torch.autograd.grad(y.square().sum(), (x, K), create_graph=True)


def test_circular_conv_gradients_when_the_kernel_wraps():
    from lrnnx_zoo.convolution import circular_conv
    u = torch.randn(2, 3, 10, dtype=D64, requires_grad=True)
    K = torch.randn(3, 12, dtype=D64, requires_grad=True)   # fills the circle: anti-causal taps wrap
    assert torch.autograd.gradcheck(lambda u, K: circular_conv(u, K, 12, 10), (u, K))
    idx = (torch.arange(10)[:, None] - torch.arange(10)[None, :]) % 12           # y_t = sum_s K_{(t-s) mod n} u_s
    ref = torch.einsum("hts,bhs->bht", K[:, idx], u)
    torch.testing.assert_close(circular_conv(u, K, 12, 10), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scale", [0.0, 1e-3, 0.3, 5.0, 60.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_differentiable_matrix_exp_matches_torchs_values_and_gradients(scale, dtype):
    # Under autograd matrix_exp scales, takes a degree-12 Taylor polynomial and squares, so that its
    # backward is matrix products (torch's exponentiates a 2n x 2n block: 232 against 51 ms for an S4
    # zoh layer's (128, 65, 65)). Against torch's own, float64: ~3e-14 relative measured; a wrong
    # Taylor coefficient or one squaring too few or many is off by 1e-3 or more.
    from lrnnx_zoo.discretization import matrix_exp
    torch.manual_seed(0)
    X = (torch.randn(3, 7, 7, dtype=dtype) * scale).requires_grad_()
    G = torch.randn(3, 7, 7, dtype=dtype)
    want = torch.linalg.matrix_exp(X)
    got = matrix_exp(X)
    assert got.grad_fn is not None and "MatrixExp" not in type(got.grad_fn).__name__   # the product path ran
    g_want, = torch.autograd.grad((want * G).real.sum(), X)
    g_got, = torch.autograd.grad((got * G).real.sum(), X)
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()
    assert (g_got - g_want).abs().max() <= 1e-12 * g_want.abs().max()
    with torch.no_grad():                                            # without autograd: torch's, bit for bit
        assert torch.equal(matrix_exp(X), torch.linalg.matrix_exp(X))


def test_differentiable_matrix_exp_hands_nonfinite_input_to_torch():
    from lrnnx_zoo.discretization import matrix_exp
    X = torch.full((2, 3, 3), float("nan"), dtype=torch.float64, requires_grad=True)
    assert torch.isnan(matrix_exp(X)).all()
    assert matrix_exp(torch.zeros(0, 3, 3, requires_grad=True)).shape == (0, 3, 3)
