"""The blocked inference convolution (``blocked_channel_conv``) against the autograd path and a
time-domain sum, and every layer's inference forward (which takes it) against its training forward.

Tolerance: 2e-6 of max|y| in float32. Both paths sum the same products through transforms of
the same size; only rounding differs (D folded into the spectrum vs added in time, blocked vs
whole-tensor FFT batches). The time-domain reference is float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lrnnx_zoo
from lrnnx_zoo.convolution import blocked_channel_conv, channel_block_size, conv_size
from lrnnx_zoo.plugins.fftconv import FFTConvS4
from lrnnx_zoo.plugins.s4.layer import S4
from aten_log import AtenLog

TOL = 2e-6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def direct(u: torch.Tensor, K: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Float64 sum_{j<=t} K[c, h, j] u[h, t-j] + D[c, h] u[h, t].  u: (B, H, L), K: (C, H, Lk) -> (B, C, H, L)."""
    u, K = u.double(), K.double()
    Lk = K.shape[-1]
    pad = F.pad(u, (Lk - 1, 0)).unfold(-1, Lk, 1)                        # (B, H, L, Lk): u[t-Lk+1 .. t]
    return torch.einsum("bhlj,chj->bchl", pad, K.flip(-1)) + D.double()[None, :, :, None] * u[:, None]


@pytest.mark.parametrize("time_dim", [1, 2])
@pytest.mark.parametrize("C,H,block", [(1, 40, None), (2, 40, 16), (3, 7, 16), (1, 33, 1)])
@pytest.mark.parametrize("B", [1, 3])            # the skip added in time (B=1) or in the spectrum
def test_blocked_conv_matches_the_time_domain_sum(time_dim, C, H, block, B):
    torch.manual_seed(0)
    L, Lk = 50, 37
    u = torch.randn(B, H, L)
    K, D = torch.randn(C, H, Lk) / Lk, torch.randn(C, H)
    n = conv_size(L, Lk)
    x = u.transpose(1, 2).contiguous() if time_dim == 1 else u
    y = blocked_channel_conv(x, torch.fft.rfft(K, n=n), n, time_dim=time_dim, skip=D, block=block)
    ref = direct(u, K, D)
    if time_dim == 1:
        ref = ref.permute(0, 3, 1, 2)                                     # (B, L, C, H)
    assert y.shape == ref.shape and rel_err(y, ref) < TOL


def test_blocked_conv_staged_gathers_and_grouped_scatters_agree_with_the_sum():
    """Blocks gathered through their contiguous stage, a partial last block (11 of 16 channels)
    reusing the full block's stage, and channels scattered in groups, a partial last group among
    them."""
    torch.manual_seed(1)
    B, C, H, Lk = 2, 2, 43, 24
    L = 2085
    u = torch.randn(B, H, L)
    K, D = torch.randn(C, H, Lk) / Lk, torch.randn(C, H)
    n = conv_size(L, Lk)
    y = blocked_channel_conv(u.transpose(1, 2).contiguous(), torch.fft.rfft(K, n=n), n, skip=D, block=16)
    assert rel_err(y, direct(u, K, D).permute(0, 3, 1, 2)) < TOL


def test_a_small_input_moves_as_one_block_with_one_copy_each_way(monkeypatch):
    """At short lengths the staged gather and the scatter in groups of 8 channels were 18 copies
    for a (1, 64, 128) input, most of a layer's forward there (S4D: 205 -> 114 us a convolution,
    one thread); one block moves with one copy in and one out, to the same bits."""
    import lrnnx_zoo.convolution as conv

    torch.manual_seed(0)
    x, K, D = torch.randn(1, 64, 128), torch.randn(1, 128, 64) / 64, torch.randn(1, 128)
    n = conv_size(64, 64)
    Kf = torch.fft.rfft(K, n=n)
    with AtenLog() as log:
        y = blocked_channel_conv(x, Kf, n, skip=D)
    assert log.counts()["aten.copy_.default"] == 2
    monkeypatch.setattr(conv, "_ONE_BLOCK", 0)          # the staged, grouped moves of large blocks
    with AtenLog() as log:
        staged = blocked_channel_conv(x, Kf, n, skip=D)
    assert log.counts()["aten.copy_.default"] > 2 and torch.equal(y, staged)


def test_block_size_is_whole_cache_lines_and_bounded():
    assert channel_block_size(8, 2048) == 16
    assert channel_block_size(1, 1024) == 256
    assert channel_block_size(1, 1 << 20) == 16                            # never below one cache line
    assert all(channel_block_size(r, n) % 16 == 0 for r in (1, 3, 8, 64) for n in (64, 2048, 65536))


def test_blocked_conv_errors_say_what_was_expected():
    u = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match=r"Kf must be \(C, H=4, n // 2 \+ 1=11\)"):
        blocked_channel_conv(u, torch.zeros(1, 4, 5, dtype=torch.complex64), 20)
    with pytest.raises(ValueError, match=r"skip must be \(C=1, H=4\)"):
        blocked_channel_conv(u, torch.zeros(1, 4, 11, dtype=torch.complex64), 20, skip=torch.zeros(4))
    with pytest.raises(RuntimeError, match="no backward"):
        blocked_channel_conv(u.requires_grad_(), torch.zeros(1, 4, 11, dtype=torch.complex64), 20)


def _both_paths(module, *args, **kw):
    """(inference output under no_grad, autograd output) of module(*args)."""
    with torch.no_grad():
        fast = module(*args, **kw)
    slow = module(*args, **kw)
    first = (lambda r: r[0] if isinstance(r, tuple) else r)
    return first(fast), first(slow).detach()


@pytest.mark.parametrize("name,bidirectional", [("s4d", False), ("s4", False), ("s4", True),
                                                ("fftconv", False), ("fftconv", True)])
def test_registered_layers_inference_equals_training_forward(name, bidirectional):
    torch.manual_seed(0)
    kw = {"bidirectional": True} if bidirectional else {}
    layer = lrnnx_zoo.create_layer(name, 24, d_state=16, **kw).eval()
    x = torch.randn(3, 300, 24)
    fast, slow = _both_paths(layer, x)
    assert rel_err(fast, slow) < TOL


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("swap", [False, True])
def test_fftconv_inference_equals_training_forward(transposed, bidirectional, swap):
    torch.manual_seed(0)
    m = FFTConvS4(20, kernel_type="s4d", d_state=8, channels=3, transposed=transposed,
                  bidirectional=bidirectional, swap_channels=swap, l_max=90).eval()
    x = torch.randn(2, 20, 130) if transposed else torch.randn(2, 130, 20)
    fast, slow = _both_paths(m, x)
    assert fast.shape == slow.shape and rel_err(fast, slow) < TOL


@pytest.mark.parametrize("transposed", [False, True])
def test_bidirectional_fftconv_with_lengths_takes_the_blocked_inference_path(transposed):
    # x past the lengths is zero, so one circle serves a padded batch too (no per-sequence flips)
    torch.manual_seed(0)
    m = FFTConvS4(20, kernel_type="s4d", d_state=8, channels=2, transposed=transposed, bidirectional=True).eval()
    x = torch.randn(3, 20, 130) if transposed else torch.randn(3, 130, 20)
    lengths = torch.tensor([130, 64, 1])
    fast, slow = _both_paths(m, x, lengths=lengths)
    assert rel_err(fast, slow) < TOL
    with torch.no_grad():
        alone = m(x[1:2, :, :64] if transposed else x[1:2, :64])[0]
    assert rel_err(fast[1:2, :, :64] if transposed else fast[1:2, :64], alone) < TOL


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_s4_block_inference_equals_training_forward(transposed, bidirectional):
    torch.manual_seed(0)
    m = S4(16, d_state=16, channels=2, bidirectional=bidirectional, transposed=transposed, postact="glu").eval()
    x = torch.randn(2, 16, 200) if transposed else torch.randn(2, 200, 16)
    fast, slow = _both_paths(m, x)
    assert fast.shape == slow.shape and rel_err(fast, slow) < TOL
    fast, slow = _both_paths(m, x, rate=0.5)
    assert rel_err(fast, slow) < TOL


def test_kernel_and_spectrum_share_the_cache():
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("s4d", 8, d_state=8).eval()
    with torch.no_grad():
        layer(torch.randn(1, 64, 8))
        Kf = layer.kernel.spectrum(64, conv_size(64, 64))
        assert layer.kernel.spectrum(64, conv_size(64, 64)) is Kf             # hit
        K, _ = layer.kernel(64)
        assert layer.kernel.spectrum(64, conv_size(64, 64)) is Kf             # the kernel did not evict it
        assert layer.kernel(64)[0] is K
        torch.testing.assert_close(Kf, torch.fft.rfft(K, n=conv_size(64, 64)), rtol=0, atol=0)
        layer.kernel.log_dt.data += 0.1                                      # new parameters: recomputed
        assert not torch.equal(layer.kernel.spectrum(64, conv_size(64, 64)), Kf)


def test_changed_settings_invalidate_the_cached_spectrum():
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("s4", 8, d_state=16, discretization="bilinear").eval()
    x = torch.randn(2, 64, 8)
    with torch.no_grad():
        y_bilinear = layer(x)
        layer.kernel.discretization = "zoh"                  # a setting, not a parameter
        y_zoh = layer(x)
        layer.kernel.cache_inference_kernel = False
        torch.testing.assert_close(layer(x), y_zoh, rtol=0, atol=1e-6)
    assert not torch.allclose(y_bilinear, y_zoh, atol=1e-4)


def test_mixed_precision_promotes_to_the_wider_type():
    # a float32 input into a float64 layer is computed (and returned) in float64: the same as
    # feeding it the input converted, to 1e-12 (the transforms' float64 rounding)
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("s4d", 20, d_state=16).double().eval()
    x = torch.randn(2, 100, 20)
    fast, reference = _both_paths(layer, x)[0], _both_paths(layer, x.double())[1]
    assert fast.dtype == torch.float64
    assert rel_err(fast, reference) < 1e-12


@pytest.mark.parametrize("name,kw", [("s4d", {}), ("s4", {"bidirectional": True}),
                                     ("fftconv", {"bidirectional": True, "channels": 2}), ("block", {}),
                                     ("lru", {"backend": "scan"}), ("lru", {"backend": "fft"})])
def test_mixed_precision_training_forward_promotes_before_the_transforms(name, kw):
    # A float32 input into a float64 layer under autograd (the whole-tensor path: the blocked one
    # takes one dtype) transformed the input in float32, 2e-8..7e-8 off the float64 input's
    # output, while inference ran in float64 (1e-16); LRU ran its scan or FFT in the input's
    # precision on both (6e-8). Both paths must be the float64 input's to 1e-12 (float64
    # transforms' rounding), bidirectional blocks on a padded batch included; the input's
    # gradient keeps the input's dtype.
    torch.manual_seed(0)
    if name == "block":
        layer = FFTConvS4(6, d_state=4, channels=2, bidirectional=True, l_max=30).double()
        x = torch.randn(3, 6, 40)
    else:
        layer = lrnnx_zoo.create_layer(name, 6, d_state=4, **kw).double()
        x = torch.randn(3, 40, 6)
    lengths = torch.tensor([40, 17, 1])
    first = (lambda r: r[0] if isinstance(r, tuple) else r)
    reference = first(layer(x.double(), lengths=lengths)).detach()
    with torch.no_grad():
        fast = first(layer(x, lengths=lengths))
    xr = x.clone().requires_grad_(True)
    slow = first(layer(xr, lengths=lengths))
    slow.sum().backward()
    assert fast.dtype == slow.dtype == torch.float64 and xr.grad.dtype == torch.float32
    assert rel_err(fast, reference) < 1e-12 and rel_err(slow.detach(), reference) < 1e-12


def test_circular_conv_promotes_in_one_compiled_graph():
    # The promotion above traces without a graph break (dtype.to_real() stopped fullgraph tracing),
    # for a real signal against a complex kernel too: the compiled result is eager's to 1e-12
    # (float64 transforms of sizes that may differ), and gradients keep their operands' dtypes.
    from lrnnx_zoo.convolution import circular_conv
    torch.manual_seed(0)
    conv = torch.compile(lambda u, K: circular_conv(u, K, 24, 16), backend="aot_eager", fullgraph=True)
    real = (lambda t: torch.view_as_real(t) if t.is_complex() else t)
    for K_dtype in (torch.complex128, torch.float64):
        u, K = torch.randn(2, 16), torch.randn(2, 8, dtype=K_dtype, requires_grad=True)
        y = conv(u, K)
        assert y.dtype == K_dtype and rel_err(real(y), real(circular_conv(u, K, 24, 16))) < 1e-12
        real(y).sum().backward()
        assert K.grad.dtype == K_dtype


@pytest.mark.parametrize("kw", [{"channels": 2}, {"bidirectional": True}], ids=["channels", "bidirectional"])
def test_mixed_precision_through_the_fftconv_channel_mixing(kw):
    # The Linear mixing fftconv's channels failed on a float64 input to a float32 layer ("mat1 and
    # mat2 must have the same dtype"). Promoted like the convolution: the float64 layer holding the
    # same values agrees to the float32 kernel's rounding (~1e-7; 1e-5 leaves room).
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("fftconv", 8, d_state=8, **kw).eval()
    wide = copy.deepcopy(layer).double()
    x = torch.randn(2, 50, 8, dtype=torch.float64)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            y = layer(x)
        assert y.dtype == torch.float64
        assert rel_err(y.detach(), wide(x).detach()) < 1e-5


def test_seed_blocks_refuse_integer_inputs():
    for block in (FFTConvS4(8, d_state=8), S4(8, d_state=8)):
        with pytest.raises(TypeError, match="floating-point input.*torch.int64"):
            block(torch.ones(2, 8, 9, dtype=torch.long))


@pytest.mark.parametrize("delay", [0, 1])
def test_reversed_spectrum_is_the_anticausal_kernel(delay):
    # y_t = sum_j K_j u_{t+j+delay}, float64 time-domain sum vs the circular convolution
    from lrnnx_zoo.convolution import reversed_spectrum
    torch.manual_seed(0)
    L, Lk = 40, 25
    n = conv_size(L, Lk) + delay
    u, K = torch.randn(3, L, dtype=torch.float64), torch.randn(Lk, dtype=torch.float64)
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * reversed_spectrum(torch.fft.rfft(K, n=n), n, delay), n=n)[:, :L]
    ref = torch.zeros(3, L, dtype=torch.float64)
    for t in range(L):
        for j in range(min(Lk, L - t - delay)):
            ref[:, t] += K[j] * u[:, t + j + delay]
    assert rel_err(y, ref) < 1e-12


@pytest.mark.parametrize("delay", [0, 1, 3])
def test_two_sided_kernel_is_both_directions(delay):
    # y_t = sum_j K0_j u_{t-j} + sum_j K1_j u_{t+j+delay} by one circular convolution, against the
    # float64 time-domain sums; and its spectrum is rfft(K0) + reversed_spectrum(rfft(K1))
    from lrnnx_zoo.convolution import reversed_spectrum, two_sided_kernel
    torch.manual_seed(0)
    L, Lk = 40, 25
    n = conv_size(L, Lk) + delay
    u = torch.randn(3, L, dtype=torch.float64)
    K0, K1 = torch.randn(2, 4, Lk, dtype=torch.float64)
    k = two_sided_kernel(K0, K1, n, delay)
    assert k.shape == (4, n)
    y = torch.fft.irfft(torch.fft.rfft(u, n=n)[:, None] * torch.fft.rfft(k, n=n), n=n)[..., :L]     # (3, 4, L)
    ref = torch.zeros(3, 4, L, dtype=torch.float64)
    for t in range(L):
        for j in range(min(Lk, t + 1)):
            ref[..., t] += K0[:, j] * u[:, None, t - j]
        for j in range(min(Lk, L - t - delay)):
            ref[..., t] += K1[:, j] * u[:, None, t + j + delay]
    assert rel_err(y, ref) < 1e-12
    spectrum = torch.fft.rfft(K0, n=n) + reversed_spectrum(torch.fft.rfft(K1, n=n), n, delay)
    assert rel_err(torch.fft.rfft(k, n=n), spectrum) < 1e-12
    with pytest.raises(ValueError, match="n >= Lk \\+ delay"):
        two_sided_kernel(K0, K1, Lk + delay - 1, delay)
    with pytest.raises(ValueError, match="one shape"):
        two_sided_kernel(K0, K1[:, :-1], n, delay)


def test_project_out_pairs_c_without_stacking_its_halves():
    """project_out's real matrix [Re C, -Im C] (pairs per mode) was a stack of C.real and -C.imag,
    strided halves (25 of 57 us of a (1, 64, 64) -> 128 projection, one thread): it is conj(C) seen
    as real. Same bits as Re(C x) by the stacked pairs."""
    from lrnnx_zoo.convolution import project_out

    torch.manual_seed(0)
    x = torch.randn(3, 10, 8, dtype=torch.complex64)
    C = torch.randn(5, 8, dtype=torch.complex64)
    C[0, 0], C[1, 1], C[2, 2] = complex(-0.0, 0.0), complex(1.0, -0.0), complex(0.0, -0.0)
    with AtenLog() as log:
        y = project_out(x, C)
    assert not any("cat" in name or "stack" in name for name in log.names), log.names
    pairs = torch.stack([C.real, -C.imag], -1).reshape(5, 16)
    assert torch.equal(y, torch.view_as_real(x).reshape(3, 10, 16) @ pairs.T)
