"""Audit of the FFTConv family's features (channels, bidirectional kernels, state passing, rate)
against closed forms and against each other, for every registered SSM kernel.

Tolerances: closed forms are checked in float64 against an independent O(L^2) float64 computation
at 1e-10 relative to max|y| (the two evaluations differ by FFT and summation rounding, ~1e-15 per
term over a few hundred terms; a wrong index or a missing term errs at O(1)).
"""

from __future__ import annotations

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo.plugins.fftconv import FFTConvS4
from test_fftconv import KERNELS, _took_the_blocked_path, make as make_block, rel_err

H, N, B = 3, 4, 2


def make(kind: str, seed: int = 0, **kw) -> FFTConvS4:
    return make_block(kind, seed, d_model=H, d_state=N, **kw)


@pytest.mark.parametrize("kind", KERNELS)
@torch.no_grad()
def test_step_refuses_a_kernel_state_of_another_shape(kind):
    # step() packed any (B, ., .) kernel state with as many entries as the right one: a state with
    # H and S swapped or flattened to (B, 1, H*S) was stepped on in a scrambled layout, 0.36 to 1.3
    # off relative (s4, s4d, lru), without a word; forward(x, state) refused the same states.
    m = make(kind, channels=2)
    x = torch.randn(B, H, 12)
    _, s = m(x, state=m.default_state(B))
    size = m.step_form().state_size
    for bad in (s.transpose(1, 2), s.reshape(B, 1, -1), s.reshape(1, B, *s.shape[1:]), None, s[0]):
        got = type(bad).__name__ if bad is None else str(tuple(bad.shape))
        with pytest.raises(ValueError, match=rf"FFTConvS4.step expects a state of shape \(batch, H, S\) = "
                                             rf"\({B}, {H}, {s.shape[-1]}\).*\(batch, state_size\) = \({B}, {size}\)"
                                             rf", got {got.replace('(', '[(]').replace(')', '[)]')}"):
            m.step(x[..., 0], bad)
    with pytest.raises(ValueError, match=r"expects x of shape \(batch, d_model=3\), got list"):
        m.step([0.0, 1.0, 2.0], s)
    # the accepted formats still step: the kernel's state and the packed real one agree
    y_k, _ = m.step(x[..., 0], s)
    y_p, _ = m.step(x[..., 0], torch.zeros(B, size))
    y_0, _ = m.step(x[..., 0], m.default_state(B))
    assert rel_err(y_p, y_0) < 1e-6 and y_k.shape == (B, 2 * H)


@pytest.mark.parametrize("kind", KERNELS)
@torch.no_grad()
def test_windowed_state_passing_error_does_not_promise_chunks_agree(kind):
    # With l_max < L state passing is refused, and the message advised "chunks of at most l_max
    # samples": those run the untruncated system, so a stream of chunks left the windowed forward
    # after l_max samples (0.18 (s4d), 0.095 (lru), 0.014 (s4) relative at l_max=10, L=30).
    m = make(kind, l_max=10)
    x = torch.randn(B, H, 30)
    y = m(x)[0]
    s, chunks = m.default_state(B), []
    for c in range(3):
        y_c, s = m(x[..., 10 * c:10 * (c + 1)], state=s)
        chunks.append(y_c)
    chunked = torch.cat(chunks, -1)
    assert rel_err(chunked[..., :10], y[..., :10]) < 1e-5      # within the window: one system (float32 FFTs)
    assert rel_err(chunked, y) > 1e-3                           # beyond it: a different one
    with pytest.raises(ValueError) as info:
        m(x, state=m.default_state(B))
    message = str(info.value)
    assert "l_max=10 < L=30" in message and "untruncated system" in message and "first l_max=10 samples" in message


@pytest.mark.parametrize("kind, rate", [(k, r) for k in KERNELS for r in (1.0, 0.5)])
@torch.no_grad()
def test_windowed_layer_compute_kernel_is_its_impulse_response(kind, rate):
    # FFTConvLayer(l_max=16).compute_kernel(L) returned the untruncated kernel: its taps past the
    # window (the largest 0.7 of max|K| at l_max=16, L=40) were not what forward convolves with, which are 0.
    # Impulse response of a one-channel layer (no channel mix) = K + D at lag 0, in float32 (1e-5
    # relative: one FFT convolution's rounding).
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("fftconv", H, d_state=N, kernel_type=kind, l_max=16).eval()
    L, taps = 40, round(16 * rate)
    impulse = torch.zeros(1, L, H)
    impulse[:, 0] = 1.0
    y = layer.conv(impulse, rate=rate)[0][0].T                      # (H, L)
    K = layer.compute_kernel(L, rate=rate)[0]                       # (H, L)
    expected = K.clone()
    expected[:, 0] += layer.conv.D[0]
    assert K.shape == (H, L) and (K[:, taps:] == 0).all() and K[:, :taps].abs().max() > 0
    assert rel_err(y, expected) < 1e-5
    full = lrnnx_zoo.create_layer("fftconv", H, d_state=N, kernel_type=kind).eval()
    full.load_state_dict(layer.state_dict())
    torch.testing.assert_close(full.compute_kernel(L, rate=rate)[..., :taps], K[None, :, :taps], rtol=0, atol=0)


@pytest.mark.parametrize("kind", KERNELS)
def test_kernel_argument_error_names_only_the_rejected_arguments(kind):
    # create_layer("fftconv", ..., d_state=4, dropout=0.1) said the kernel "rejected the arguments
    # ['d_state', 'dropout']": every argument given, d_state (valid) included.
    with pytest.raises(TypeError, match=r"rejected the arguments \['dropout'\]: .*unexpected keyword argument "
                                        r"'dropout'"):
        lrnnx_zoo.create_layer("fftconv", H, d_state=N, kernel_type=kind, dropout=0.1)
    with pytest.raises(TypeError, match=r"rejected the arguments \['not_an_arg'\]"):
        FFTConvS4(H, kernel_type=kind, param_config={"d_state": N}, not_an_arg=1)


def _one_mode_closed_form(m: FFTConvS4, L: int, rate: float) -> torch.Tensor:
    """K[c, h, l] from the parameters of a one-mode diagonal kernel, in float64, by hand:
    s4d: 2 Re(c b_bar lam^l) (a conjugate pair), lam = exp(dt A) (zoh) or (1 + dt A/2) / (1 - dt A/2)
    (bilinear), dt = exp(log_dt) / rate; lru: Re(c gamma b lam^l)."""
    k, l = m.kernel, torch.arange(L, dtype=torch.float64)
    if m.kernel_type == "lru":
        lam = torch.exp(torch.complex(-torch.exp(k.nu_log), torch.exp(k.theta_log)))
        b, scale = torch.view_as_complex(k.B) * torch.exp(k.gamma_log), 1.0
    else:
        A = torch.complex(-torch.exp(k.A_real_log), k.A_imag)
        dt = (torch.exp(k.log_dt) / rate).unsqueeze(-1)
        if k.discretization == "zoh":
            lam = torch.exp(dt * A)
            b = (lam - 1) / A * torch.view_as_complex(k.B)
        else:
            lam = (1 + dt * A / 2) / (1 - dt * A / 2)
            b = dt * torch.view_as_complex(k.B) / (1 - dt * A / 2)
        scale = 2.0
    c = torch.view_as_complex(k.C)                                       # (C, H, 1)
    return scale * (c * b * lam ** l.to(torch.complex128)).real          # (C, H, L) by broadcasting the mode


@pytest.mark.parametrize("kind, kw, rate", [("s4d", {"discretization": "zoh", "d_state": 2}, 1.0),
                                            ("s4d", {"discretization": "zoh", "d_state": 2}, 0.3),
                                            ("s4d", {"discretization": "bilinear", "d_state": 2}, 2.5),
                                            ("lru", {"d_state": 1}, 1.0)])
@torch.no_grad()
def test_one_mode_kernel_is_its_closed_form_at_every_rate(kind, kw, rate):
    # float64 end to end: 1e-10 relative (rounding of exp/powers over 57 taps is ~1e-14)
    torch.manual_seed(0)
    m = FFTConvS4(H, kernel_type=kind, channels=2, **kw).double().eval()
    L = 57
    K = m.kernel(L, rate=rate)[0]
    assert K.shape == (2, H, L) and rel_err(K, _one_mode_closed_form(m, L, rate)) < 1e-10


def _convolve_by_hand(u: torch.Tensor, K: torch.Tensor, anti_causal: bool) -> torch.Tensor:
    """O(L^2) float64 sums: y[b, c, h, t] = sum_{0 <= j < Lk} K[c, h, j] u[b, h, t -+ j]."""
    Bsz, Hn, L = u.shape
    y = u.new_zeros(Bsz, K.shape[0], Hn, L)
    for t in range(L):
        for j in range(K.shape[-1]):
            s = t + j if anti_causal else t - j
            if 0 <= s < L:
                y[..., t] += K[:, :, j] * u[:, None, :, s]
    return y


@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("L, l_max, rate", [(1, None, 1.0), (23, None, 1.0), (31, 9, 1.0), (29, 8, 0.5)])
def test_bidirectional_channels_window_against_sums_by_hand(kind, L, l_max, rate):
    # y = causal conv with K[:C] + anti-causal conv with K[C:] + D u, the kernels cut to
    # round(l_max * rate) taps; each output channel c its own kernel. Inference (blocked) and
    # autograd paths, float64, 1e-10 relative.
    m = make(kind, channels=2, bidirectional=True, l_max=l_max).double()
    u = torch.randn(B, H, L, dtype=torch.float64)
    taps = L if l_max is None else min(L, round(l_max * rate))
    with torch.no_grad():
        K = m.kernel(taps, rate=rate)[0]
        expected = (_convolve_by_hand(u, K[:2], False) + _convolve_by_hand(u, K[2:], True)
                    + m.D[..., None] * u[:, None]).reshape(B, 2 * H, L)
        y = m(u, rate=rate)[0]
    y_grad = m(u.clone().requires_grad_(), rate=rate)[0].detach()
    assert rel_err(y, expected) < 1e-10 and rel_err(y_grad, expected) < 1e-10


@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("transposed", [True, False])
def test_bidirectional_padded_batch_against_sums_by_hand_on_every_path(kind, transposed, monkeypatch):
    # A padded batch (lengths L, 0, 1 and 6) through a bidirectional block with C=3 channels
    # (swapped when transposed: channels-last swapped outputs skip the blocked path) and a window at rate 0.5 (round(9 * 0.5) = 4 taps), on an odd, not 5-smooth L = 13: the
    # sums by hand of the input zeroed past the lengths, causal with K[:C] and anti-causal with
    # K[C:], on the inference path, the blocked training path and the whole-tensor path, float64
    # to 1e-10 relative (as above). The two training paths give the same bits, gradients
    # included, and the input's gradient past the lengths is exactly zero.
    import lrnnx_zoo.plugins.fftconv as fftconv_module
    C, L, rate = 3, 13, 0.5
    lengths = torch.tensor([L, 0, 1, 6])
    m = make(kind, channels=C, swap_channels=transposed, transposed=transposed, bidirectional=True, l_max=9).double()
    u = torch.randn(4, H, L, dtype=torch.float64)
    valid = torch.arange(L) < lengths[:, None]                                          # (B, L)
    with torch.no_grad():
        K = m.kernel(4, rate=rate)[0]
        v = u * valid[:, None]
        want = (_convolve_by_hand(v, K[:C], False) + _convolve_by_hand(v, K[C:], True)
                + m.D[..., None] * v[:, None])                                          # (B, C, H, L)
        want = (want.transpose(1, 2) if transposed else want).reshape(4, C * H, L)     # swapped: h * C + c
    as_given = (lambda t: t) if transposed else (lambda t: t.transpose(1, 2))
    g = torch.randn(4, C * H, L, dtype=torch.float64)
    graphs = []

    def train() -> list:
        x = as_given(u).clone().requires_grad_(True)
        y = as_given(m(x, rate=rate, lengths=lengths)[0])
        graphs.append(y)
        return [y.detach()] + list(torch.autograd.grad(y, [x] + list(m.parameters()), g))

    with torch.no_grad():
        assert rel_err(as_given(m(as_given(u), rate=rate, lengths=lengths)[0]), want) < 1e-10
    blocked = train()
    assert _took_the_blocked_path(graphs[0])
    monkeypatch.setattr(fftconv_module, "blocked_training_applies", lambda *args: False)
    whole = train()
    assert rel_err(blocked[0], want) < 1e-10
    assert all(torch.equal(a, b) for a, b in zip(blocked, whole))
    assert torch.all(as_given(blocked[1])[~valid[:, None].expand(-1, H, -1)] == 0)
