"""FFTConvS4 / the "fftconv" layer over every registered SSM kernel, and the LRU kernel.

Tolerances: float32 throughout. Comparisons between evaluation modes (FFT convolution vs step
recurrence vs state passing) use 1e-4 relative to max|y|: a float32 FFT of length ~2L rounds to
about eps * log2(L) * ||K||_1 (1e-6..1e-5 at L = 1024), the recurrence accumulates ~L eps |lam|^l;
a wrong formula errs at O(1). Direct time-domain convolutions vs the FFT path use 1e-5 relative
(short kernels, same float32 operands). Identities of one code path (layout, transposition) are
compared at 1e-6 (only summation order may differ).
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F

import lrnnx_zoo
from lrnnx_zoo.plugins.fftconv import FFTConvLayer, FFTConvS4, flip_within_lengths, pack_state
from lrnnx_zoo.plugins.lru import LRU, LRUKernel

KERNELS = sorted(n.split(".", 1)[1] for n in lrnnx_zoo.list_backends("ssm_kernel"))
H, N, B = 4, 8, 2


def make(kernel_type: str, seed: int = 0, d_model: int = H, d_state: int = N, **kw) -> FFTConvS4:
    torch.manual_seed(seed)
    return FFTConvS4(d_model, kernel_type=kernel_type, d_state=d_state, **kw).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def direct_conv(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Time-domain causal convolution, no FFT.  u: (B, H, L), K: (C, H, Lk) -> (B, C, H, L)."""
    Lk, L = K.shape[-1], u.shape[-1]
    pad = F.pad(u, (Lk - 1, 0))
    ys = [F.conv1d(pad, K[c].flip(-1).unsqueeze(1), groups=u.shape[1]) for c in range(K.shape[0])]
    return torch.stack(ys, 1)[..., :L]


def test_kernels_registered():
    assert {"s4d", "lru"} <= set(KERNELS)
    assert "fftconv" in lrnnx_zoo.list_layers()


def test_seed_import_path():
    from lrnnx_zoo.convolution import FFTConvS4 as Seed
    assert Seed is FFTConvS4


@pytest.mark.parametrize("kind", KERNELS)
def test_conv_matches_step_L1024(kind):
    m = make(kind, channels=2)
    x = torch.randn(B, H, 1024)
    with torch.no_grad():
        y, _ = m(x)                                            # (B, C*H, L)
        m.setup_step()
        state = m.default_state(B)
        ys = []
        for t in range(x.shape[-1]):
            y_t, state = m.step(x[..., t], state)
            ys.append(y_t)
    assert y.shape == (B, 2 * H, 1024)
    assert rel_err(torch.stack(ys, -1), y) < 1e-4


@pytest.mark.parametrize("kind", KERNELS)
def test_state_passing_and_step_agree(kind):
    m = make(kind, channels=2)
    x0, x1, x2 = torch.randn(B, H, 50), torch.randn(B, H, 300), torch.randn(B, H, 200)
    with torch.no_grad():
        _, s0 = m(x0, state=m.default_state(B))               # a non-zero starting state
        y_all, s_all = m(torch.cat([x1, x2], -1), state=s0)
        y1, s1 = m(x1, state=s0)
        y2, s2 = m(x2, state=s1)
        # step mode continues from the state forward() handed back, in either state format
        ys, s = [], s1
        for t in range(x2.shape[-1]):
            y_t, s = m.step(x2[..., t], s)
            ys.append(y_t)
        ys_packed = []
        sp = pack_state(m.step_form(), s1, m.kernel)
        for t in range(x2.shape[-1]):
            y_t, sp = m.step(x2[..., t], sp)
            ys_packed.append(y_t)
    assert rel_err(torch.cat([y1, y2], -1), y_all) < 1e-4
    assert rel_err(torch.view_as_real(s2) if s2.is_complex() else s2,
                   torch.view_as_real(s_all) if s_all.is_complex() else s_all) < 1e-4
    assert rel_err(torch.stack(ys, -1), y2) < 1e-4
    assert rel_err(torch.stack(ys_packed, -1), y2) < 1e-4
    assert sp.dim() == 2 and not sp.is_complex() and s.shape == s1.shape


@pytest.mark.parametrize("kind", KERNELS)
def test_rate(kind):
    m = make(kind)
    x = torch.randn(B, H, 128)
    m2 = copy.deepcopy(m)
    with torch.no_grad():
        if hasattr(m.kernel, "log_dt"):
            m2.kernel.log_dt += math.log(2.0)                 # dt doubled
        else:                                                 # lru: its poles resampled (tests/test_lru_rate.py)
            m2.kernel.resample_(0.5)
        K_half = m.kernel(128, rate=0.5)[0]
        K_dt2 = m2.kernel(128)[0]
        y_half, y_dt2 = m(x, rate=0.5)[0], m2(x)[0]
    # same float32 formulas on dt/0.5 vs exp(log_dt + log 2): rounding only
    assert rel_err(K_half, K_dt2) < 1e-5 and rel_err(y_half, y_dt2) < 1e-5


@pytest.mark.parametrize("rate", [0.5, 2.0])
def test_finite_window_spans_the_same_duration_at_every_rate(rate):
    # l_max is a duration, as in S4: at rate 0.5 (each step covers twice the time) a 64-tap window
    # at rate 1 has 32 taps. FFTConvS4 kept 64 taps at every rate, so one kernel in the two blocks
    # gave different windows. The impulse response is the rate's kernel up to the window, then 0
    # (float32 rounding of one convolution: 1e-5 of the kernel's largest entry).
    m = make("s4d", l_max=64)
    L, taps = 150, round(64 * rate)                                  # 32 or 128 taps
    x = torch.zeros(1, H, L)
    x[:, :, 0] = 1.0
    with torch.no_grad():
        y = m(x, rate=rate)[0][0]                                     # (H, L)
        K = m.kernel(L, rate=rate)[0][0]                              # (H, L)
    expected = torch.cat([K[:, :taps], torch.zeros(H, L - taps)], 1)
    expected[:, 0] += m.D[0].detach()
    assert rel_err(y, expected) < 1e-5
    assert y[:, taps:].abs().max() < 1e-5 * K.abs().max()


@pytest.mark.parametrize("rate", [0.0, -0.5, math.nan, math.inf])
@pytest.mark.parametrize("kind", KERNELS)
def test_rate_must_be_finite_and_positive(kind, rate):
    # The kernel uses dt / rate: the s4d kernel gave NaN/inf outputs at rate 0 and a growing
    # (unstable) kernel at a negative rate without a word; the s4 kernel refused rate <= 0 only.
    m = make(kind)
    x = torch.randn(B, H, 32)
    match = "finite number > 0"
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=match):
            m(x, rate=rate)
    with pytest.raises(ValueError, match=match):
        m.kernel(32, rate=rate)


@pytest.mark.parametrize("kind", KERNELS)
def test_channels_ordering_and_swap(kind):
    C = 3
    m = make(kind, channels=C)
    ms = make(kind, channels=C, swap_channels=True)
    ms.load_state_dict(m.state_dict())
    x = torch.randn(B, H, 64)
    with torch.no_grad():
        y, ys = m(x)[0], ms(x)[0]
        K = m.kernel(64)[0]
        by_hand = direct_conv(x, K) + m.D[..., None] * x.unsqueeze(1)       # (B, C, H, L)
    assert y.shape == ys.shape == (B, C * H, 64) and m.d_output == C * H
    assert rel_err(y.view(B, C, H, 64), by_hand) < 1e-5                      # index c*H + h
    torch.testing.assert_close(ys.view(B, H, C, 64).transpose(1, 2), y.view(B, C, H, 64), rtol=0, atol=0)
    with torch.no_grad():                                                    # step keeps the same order
        y_t, _ = ms.step(x[..., 0], ms.default_state(B))
    assert rel_err(y_t, ys[..., 0]) < 1e-5


@pytest.mark.parametrize("kind", KERNELS)
def test_transposed_equals_not_transposed(kind):
    m = make(kind, channels=2)
    mt = make(kind, channels=2, transposed=False)
    mt.load_state_dict(m.state_dict())
    x = torch.randn(B, H, 100)
    with torch.no_grad():
        y = m(x)[0]
        yt = mt(x.transpose(1, 2))[0]
    assert yt.shape == (B, 100, 2 * H)
    torch.testing.assert_close(yt.transpose(1, 2), y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KERNELS)
def test_l_max_shorter_than_input_is_finite_window(kind):
    m = make(kind, l_max=40, channels=2)
    x = torch.randn(B, H, 300)
    with torch.no_grad():
        y = m(x)[0]
        K = m.kernel(40)[0]                                                 # (C, H, 40)
        by_hand = direct_conv(x, K) + m.D[..., None] * x.unsqueeze(1)
        y_short = m(x[..., :25])[0]                                          # shorter input: truncated kernel
    assert rel_err(y.view(B, 2, H, 300), by_hand) < 1e-5
    assert rel_err(y_short, y[..., :25]) < 1e-5
    with pytest.raises(ValueError, match="l_max"):
        m(x, state=m.default_state(B))


@pytest.mark.parametrize("kind", KERNELS)
def test_bidirectional(kind):
    C, L = 2, 80
    m = make(kind, channels=C, bidirectional=True)
    assert m.bidirectional and m.kernel.channels == 2 * C and m.d_output == C * H
    x = torch.randn(B, H, L)
    x2 = x.clone()
    x2[..., 50] += 10.0
    with torch.no_grad():
        y, y2 = m(x)[0], m(x2)[0]
        K = m.kernel(L)[0]
        causal = direct_conv(x, K[:C])
        backward = direct_conv(x.flip(-1), K[C:]).flip(-1)                   # y[t] += sum_{j>=t} K1[j-t] x[j]
        by_hand = causal + backward + m.D[..., None] * x.unsqueeze(1)
    assert (y[..., :50] - y2[..., :50]).abs().max() > 1e-3, "output before t=50 must see the future"
    assert rel_err(y.view(B, C, H, L), by_hand) < 1e-5
    with pytest.raises(ValueError, match="bidirectional"):
        m(x, state=torch.zeros(B, H, N // 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="bidirectional"):
        m.setup_step()
    with pytest.raises(ValueError, match="bidirectional"):
        m.step(x[..., 0], torch.zeros(B, 1))


def test_bidirectional_layer_refuses_to_stream_and_flips_within_lengths():
    # padded batches of the bidirectional layer: tests/test_layer_contract.py (LENGTH_CASES)
    layer = FFTConvLayer(H, d_state=N, bidirectional=True).eval()
    with pytest.raises(ValueError, match="bidirectional"):
        layer.step_form()
    u = torch.arange(10.0).view(1, 1, 10).repeat(2, 1, 1)
    f = flip_within_lengths(u, torch.tensor([4, 10]))
    assert f[0, 0].tolist() == [3, 2, 1, 0, 4, 5, 6, 7, 8, 9] and f[1, 0].tolist() == list(range(9, -1, -1))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_fftconv_block_checks_lengths(bidirectional):
    # FFTConvS4 used lengths unchecked: a float or too large one failed in gather ("Expected dtype
    # int32/int64 for index", "index 20 is out of bounds") or was taken as given, a wrong count
    # failed in a broadcast.
    m = make("s4d", bidirectional=bidirectional)
    x = torch.randn(B, H, 20)
    for bad, error, message in ((torch.tensor([3.5, 20.0]), TypeError, "lengths must hold integers"),
                                (torch.tensor([True, False]), TypeError, "lengths must hold integers"),
                                (torch.tensor([21, 20]), ValueError, r"lengths must lie in \[0, 20\]"),
                                (torch.tensor([-1, 20]), ValueError, r"lengths must lie in \[0, 20\]"),
                                (torch.tensor([3, 4, 5]), ValueError, r"lengths must have shape \(batch,\)=\(2,\)")):
        with pytest.raises(error, match=message):
            m(x, lengths=bad)
    with torch.no_grad():                               # valid lengths, as a list too
        torch.testing.assert_close(m(x, lengths=[5, 20])[0], m(x, lengths=torch.tensor([5, 20]))[0])
    if not bidirectional:
        with pytest.raises(ValueError, match="state passing needs sequences of one length"):
            m(x, state=m.default_state(B), lengths=torch.tensor([5, 20]))


@pytest.mark.parametrize("kind", KERNELS)
def test_state_passing_checks_the_state_shape(kind):
    # A state of the wrong batch or size failed in a broadcast inside the s4d and lru kernels.
    m = make(kind)
    x, good = torch.randn(B, H, 20), m.default_state(B)
    for bad in (m.default_state(B + 1), good[..., :-1], good[0]):
        with pytest.raises(ValueError, match=rf"FFTConvS4 expects a state of shape \(batch, H, S\) = "
                                             rf"\({B}, {H}, {good.shape[-1]}\).*got {re.escape(str(tuple(bad.shape)))}"):
            m(x, state=bad)
    assert m(x, state=good)[1].shape == good.shape


@pytest.mark.parametrize("kind", KERNELS)
def test_step_after_load_state_dict_uses_the_new_weights(kind):
    # The step form built by a first step (or setup_step) outlived load_state_dict: the block
    # stepped on with the old weights (outputs off by O(1)), silently. Then it rebuilt the form
    # silently, and a stream's old state went on with the new weights (2.5 off): now step asks for
    # setup_step(), as the seed S4 and the README say, and a new stream runs the new weights.
    m, other = make(kind), make(kind, seed=1)
    x = torch.randn(B, H)
    with torch.no_grad():
        m.step(x, m.default_state(B))
        m.load_state_dict(other.state_dict())
        with pytest.raises(RuntimeError, match=r"call setup_step\(\) again"):
            m.step(x, m.default_state(B))
        m.setup_step()
        torch.testing.assert_close(m.step(x, m.default_state(B))[0], other.step(x, other.default_state(B))[0],
                                   rtol=0, atol=0)                       # the same form from the same weights


@pytest.mark.parametrize("kind", KERNELS)
def test_step_after_an_optimizer_step_asks_for_setup_step(kind):
    # The step form built by setup_step (or a first step) stepped on with the old weights after
    # training, silently; a change to rounding (S4's C~ for a longer kernel) carries on.
    m = make(kind)
    x = torch.randn(B, H)
    with torch.no_grad():
        m.step(x, m.default_state(B))
        m(torch.randn(B, H, 200))                         # longer than before: no change to the system
        m.step(x, m.default_state(B))
    torch.optim.SGD(m.parameters(), lr=0.1).zero_grad()
    m(torch.randn(B, H, 16))[0].square().sum().backward()
    torch.optim.SGD(m.parameters(), lr=0.1).step()
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=r"weights changed since setup_step\(\).*call setup_step\(\) again"):
            m.step(x, m.default_state(B))
        m.setup_step()
        twin = copy.deepcopy(m)
        twin.setup_step()
        torch.testing.assert_close(m.step(x, m.default_state(B))[0], twin.step(x, twin.default_state(B))[0],
                                   rtol=0, atol=0)


def test_fftconv_block_step_checks_the_input_dtype():
    # An integer x was cast silently and a float64 x stepped with the float32 form (promoted).
    m = make("s4d")
    state = m.default_state(B)
    with pytest.raises(TypeError, match=r"floating-point input .* got torch.int64"):
        m.step(torch.ones(B, H, dtype=torch.long), state)
    with pytest.raises(TypeError, match=r"step form holds torch.float32, as its parameters, got x of torch.float64"):
        m.step(torch.randn(B, H, dtype=torch.float64), state)
    m.double()                                            # the form is rebuilt in float64
    assert m.step(torch.randn(B, H, dtype=torch.float64), m.default_state(B))[0].dtype == torch.float64


def test_kernel_dropout_only_in_training():
    m = make("s4d", drop_kernel=0.5)
    ref = make("s4d")
    x = torch.randn(B, H, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], ref(x)[0], rtol=0, atol=0)
        m.train()
        a, b = m(x)[0], m(x)[0]
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("tie", [True, False])
def test_output_dropout_tied_along_time(tie):
    m = make("s4d", channels=2, dropout=0.5, tie_dropout=tie)
    x = torch.randn(4, H, 64)
    with torch.no_grad():
        y_eval = m(x)[0]
        torch.testing.assert_close(m(x)[0], y_eval, rtol=0, atol=0)       # eval: deterministic, no mask
        m.train()
        y = m(x)[0]
    # y = mask / (1 - p) * y_eval with the mask 0 or 1. Eval runs the blocked inference
    # convolution, training the autograd one: same sums, different rounding, so 1e-5 of max|y|.
    kept = y != 0
    scale = y_eval.abs().max().item()
    torch.testing.assert_close(y[kept], 2 * y_eval[kept], rtol=0, atol=1e-5 * scale)
    assert 0.3 < kept.float().mean() < 0.7
    constant_in_time = (kept == kept[..., :1]).all()
    assert bool(constant_in_time) == tie


def test_kernel_name_errors():
    with pytest.raises(lrnnx_zoo.RegistryError, match="s4d"):
        FFTConvS4(H, kernel_type="nope")
    with pytest.raises(ValueError, match="alias"):
        FFTConvS4(H, kernel_type="s4d", kernel="lru")
    assert FFTConvS4(H, kernel="lru", d_state=4).kernel_type == "lru"
    with pytest.raises(TypeError, match="S4DKernel"):
        FFTConvS4(H, kernel_type="s4d", not_an_arg=1)
    with pytest.raises(ValueError, match=r"\(batch, d_model=4, length\)"):
        FFTConvS4(H, d_state=4)(torch.randn(2, 10, H + 1))


def test_lru_kernel_matches_lru_layer():
    torch.manual_seed(0)
    lru = LRU(1, d_state=6)
    k = LRUKernel(1, d_state=6)
    with torch.no_grad():
        k.nu_log.copy_(lru.nu_log[None])
        k.theta_log.copy_(lru.theta_log[None])
        k.gamma_log.copy_(lru.gamma_log[None])
        k.B.copy_(torch.stack([lru.B_re[:, 0], lru.B_im[:, 0]], -1)[None])
        k.C.copy_(torch.stack([lru.C_re[0], lru.C_im[0]], -1)[None, None])
        x = torch.randn(2, 200, 1)
        K = k(200)[0]                                                        # (1, 1, 200)
        y_kernel = direct_conv(x.transpose(1, 2), K)[:, 0].transpose(1, 2) + lru.D * x
        y_lru = lru(x)
    assert rel_err(y_kernel, y_lru) < 1e-5


def test_lru_kernel_matches_loop_recurrence():
    torch.manual_seed(1)
    k = LRUKernel(3, d_state=5, channels=2, r_min=0.5, r_max=0.99)
    log_lam, Bn, Cm = (t.detach().to(torch.complex128) for t in k.discretize(torch.complex128))
    lam = torch.exp(log_lam)
    x0 = torch.randn(2, 3, 5, dtype=torch.complex128)
    L = 60
    # impulse response and zero-input response by running x_l = lam x_{l-1} (+ B at l = 0)
    K_loop, Ks_loop, x, xs = [], [], Bn, x0
    for _ in range(L):
        xs = lam * xs
        K_loop.append((Cm * x).sum(-1).real)
        Ks_loop.append((Cm.unsqueeze(0) * xs.unsqueeze(1)).sum(-1).real)
        x = lam * x
    with torch.no_grad():
        K, Ks = k(L, state=x0.to(torch.complex64))
        u = torch.randn(2, 3, L)
        s = k.forward_state(u, x0.to(torch.complex64))
    s_loop = x0
    for t in range(L):
        s_loop = lam * s_loop + Bn * u[..., t].double().unsqueeze(-1)
    assert rel_err(K.double(), torch.stack(K_loop, -1)) < 1e-5
    assert rel_err(Ks.double(), torch.stack(Ks_loop, -1)) < 1e-5
    assert rel_err(torch.view_as_real(s).double(), torch.view_as_real(s_loop)) < 1e-5


@pytest.mark.parametrize("kind", KERNELS)
def test_layer_with_channels_conv_matches_step(kind):
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("fftconv", H, d_state=N, kernel_type=kind, channels=3).eval()
    form = layer.step_form()
    assert form.d_input == H and form.d_output == H
    assert all(not t.is_complex() for t in form.buffers())
    x = torch.randn(B, 256, H)
    with torch.no_grad():
        y = layer(x)
        cache = layer.allocate_inference_cache(B)
        ys = []
        for t in range(x.shape[1]):
            y_t, cache = layer.step(x[:, t], cache)
            ys.append(y_t)
    assert y.shape == (B, 256, H)
    assert rel_err(torch.stack(ys, 1), y) < 1e-4


def test_kernel_step_form_without_D_gets_the_skip_added():
    # A third-party kernel's step_form() may take no D: FFTConvS4 wraps it and adds D u itself.
    m = make("lru", channels=2)
    x = torch.randn(B, H, 30)
    with torch.no_grad():
        y = m(x)[0]
        plain = m.kernel.step_form
        m.kernel.step_form = lambda: plain()                                # hides the D parameter
        m.setup_step()
        s, ys = m.default_state(B), []
        for t in range(x.shape[-1]):
            y_t, s = m.step(x[..., t], s)
            ys.append(y_t)
    assert type(m._step).__name__ == "_SkipStepForm"
    assert rel_err(torch.stack(ys, -1), y) < 1e-4


def test_setup_step_leaves_the_state_dict_alone():
    from lrnnx_zoo.plugins.fftconv import FFTConvS4
    torch.manual_seed(0)
    m = FFTConvS4(4, channels=2, d_state=4)
    keys = set(m.state_dict())
    m.setup_step()
    y, _ = m.step(torch.randn(3, 4), m.default_state(3))
    assert set(m.state_dict()) == keys and y.shape == (3, 8)
    FFTConvS4(4, channels=2, d_state=4).load_state_dict(m.state_dict())     # strict, both ways
    m.load_state_dict(FFTConvS4(4, channels=2, d_state=4).state_dict())


@torch.no_grad()
def test_s4_kernel_states_pack_for_the_form_they_are_stepped_with():
    # FFTConvS4(kernel_type="s4") packed kernel states with the layout of whichever step form its
    # kernel built last: a kernel.step_form("dense") call mid-stream (same state size as the linear
    # form in use) made the next steps read the state in the wrong layout, 0.29 off, silently.
    torch.manual_seed(0)
    m = FFTConvS4(3, kernel_type="s4", transposed=False, param_config={"d_state": 8}).eval()
    x = torch.randn(2, 30, 3)
    y, _ = m(x)
    state, ys = m.default_state(2), []
    for t in range(30):
        if t == 10:
            m.kernel.step_form("dense")
        y_t, state = m.step(x[:, t], state)
        ys.append(y_t)
    assert (torch.stack(ys, 1) - y).abs().max() < 1e-5


def _took_the_blocked_path(y: torch.Tensor) -> bool:
    """Whether y's graph holds convolution._BlockedConv (a few nodes up at most)."""
    nodes = [y.grad_fn]
    for _ in range(8):
        if any(type(f).__name__ == "_BlockedConvBackward" for f in nodes):
            return True
        nodes = [f for node in nodes if node is not None for f, _ in node.next_functions if f is not None]
    return False


@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("transposed,options", [
    (False, {}), (False, {"drop_kernel": 0.3}), (False, {"channels": 3}),
    (True, {}), (True, {"channels": 2, "swap_channels": True, "dropout": 0.2, "tie_dropout": True}),
    (False, {"bidirectional": True}), (True, {"bidirectional": True, "channels": 2, "l_max": 700})])
def test_training_through_the_blocked_path_gives_the_whole_tensor_bits(kind, transposed, options, monkeypatch):
    # A block trains through the convolution's blocked path (channels_last_conv for (B, L, H),
    # channels_first_conv for (B, H, L); C kernels per channel and D u folded into its blocks).
    # Its output and every gradient, D's included, must be the whole-tensor path's bit for bit,
    # so that checkpoints trained before it are reproduced exactly by their cards' commands
    # (kernel and output dropout draw the same masks).
    import lrnnx_zoo.plugins.fftconv as fftconv_module
    channels = options.get("channels", 1)

    def run():
        torch.manual_seed(0)
        m = FFTConvS4(40, kernel_type=kind, d_state=8, transposed=transposed, **options).train()
        x = torch.randn(3, 40, 1100) if transposed else torch.randn(3, 1100, 40)
        x.requires_grad_(True)
        torch.manual_seed(1)                 # the same dropout masks on both paths
        y, _ = m(x)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)))
        return _took_the_blocked_path(y), [y.detach(), x.grad] + [p.grad for p in m.parameters()]

    blocked, got = run()
    assert blocked and got[0].shape == ((3, channels * 40, 1100) if transposed else (3, 1100, channels * 40))
    monkeypatch.setattr(fftconv_module, "blocked_training_applies", lambda *args: False)
    ref_blocked, want = run()
    assert not ref_blocked
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_bidirectional_block_is_both_directions_within_the_lengths(kind, transposed, dtype, with_lengths):
    # Both directions run as one circular convolution (convolution.two_sided_kernel) on the input
    # zeroed past the lengths. Reference, written here: the causal convolution plus the reverse
    # direction as a causal convolution of each sequence reversed within its length, reversed
    # back. Valid steps agree, values and every gradient (of a loss on the valid steps), relative
    # to each tensor's largest entry: float64 within 1e-11; float32 within 2e-6 for the output and
    # 5e-5 for the gradients (sums over the batch and the steps). Measured: float64 <= 1.5e-14,
    # float32 <= 2.3e-7 (output) and 7.3e-6 (gradients).
    from lrnnx_zoo.convolution import causal_conv
    torch.manual_seed(0)
    m = FFTConvS4(12, kernel_type=kind, d_state=8, channels=2, transposed=transposed,
                  bidirectional=True, l_max=500).to(dtype).train()
    B, L = 3, 600
    lengths = torch.tensor([600, 431, 97]) if with_lengths else None
    valid = (torch.arange(L) < (torch.tensor([L] * B) if lengths is None else lengths)[:, None]).to(dtype)  # (B, L)
    x = torch.randn(B, 12, L, dtype=dtype) if transposed else torch.randn(B, L, 12, dtype=dtype)
    g = torch.randn(B, 2 * 12, L, dtype=dtype, generator=torch.Generator().manual_seed(1)) * valid[:, None]
    if not transposed:
        g = g.transpose(1, 2)

    def grads(y):
        params = [p for p in m.parameters() if p.requires_grad]
        return [y.detach()] + list(torch.autograd.grad(y, [xr] + params, g, allow_unused=True))

    xr = x.clone().requires_grad_(True)
    y, _ = m(xr, lengths=lengths)
    assert _took_the_blocked_path(y)
    got = grads(y)
    xr = x.clone().requires_grad_(True)
    u = (xr if transposed else xr.transpose(1, 2)) * valid[:, None]                        # (B, H, L)
    K, _ = m.kernel(L=500)                                                                 # (4, H, 500)
    fwd = causal_conv(u.unsqueeze(1), K[:2])
    bwd = flip_within_lengths(causal_conv(flip_within_lengths(u, lengths).unsqueeze(1), K[2:]), lengths)
    ref = ((fwd + bwd + m.D.unsqueeze(-1) * u.unsqueeze(1)).flatten(1, 2)) * valid[:, None]  # (B, C*H, L)
    ref = ref if transposed else ref.transpose(1, 2)
    want = grads(ref)
    mask = valid[:, None] if transposed else valid[:, :, None]
    assert rel_err(got[0] * mask, want[0]) < (1e-11 if dtype == torch.float64 else 2e-6)
    errs = [rel_err(a, b) for a, b in zip(got[1:], want[1:]) if b is not None]
    assert len(errs) > 3 and max(errs) < (1e-11 if dtype == torch.float64 else 5e-5), errs


@pytest.mark.parametrize("kernel", ["s4d", "lru"])
def test_a_mixing_layer_streams_in_another_dtype_than_its_parameters(kernel):
    # With channels > 1 the step form held a copy of the channel-mixing Linear in the layer's dtype
    # beside a core built in the cache's: a float64 cache of a float32 layer (prefill of a float64
    # prompt, allocate_inference_cache(dtype=float64)) and the float32 graph form of a float64 model
    # (state_from_cache, cache_from_state) failed in the mix's matmul (a fuzzing audit).
    # Tolerance: float64 steps against the float32 layer's forward of the float64 input (its kernel is
    # float32: about 1e-7 apart), 1e-6 of max|y|.
    from lrnnx_zoo.export import cache_from_state, state_from_cache
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("fftconv", 4, d_state=4, channels=2, kernel_type=kernel).eval()
    x = torch.randn(2, 12, 4, dtype=torch.float64)
    with torch.no_grad():
        want = layer(x)
        y, cache = layer.prefill(x[:, :6])
        assert y.dtype == cache["lrnn_state"].dtype == torch.float64
        steps = [layer.step(x[:, t], cache)[0] for t in range(6, 12)]
    assert (torch.stack(steps, 1) - want[:, 6:]).abs().max() <= 1e-6 * want.abs().max()
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(
        layer="fftconv", d_input=2, d_output=3, d_model=4, n_layers=1,
        layer_kwargs={"d_state": 4, "channels": 2, "kernel_type": kernel})).double().eval()
    with torch.no_grad():
        _, cache = model.prefill(torch.randn(2, 5, 2, dtype=torch.float64))
        state = state_from_cache(model, cache)
        back = cache_from_state(model, state)
    assert torch.allclose(back["layers"][0]["lrnn_state"], cache["layers"][0]["lrnn_state"], atol=1e-6)
