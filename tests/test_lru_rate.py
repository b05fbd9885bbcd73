"""LRU at another sampling rate: its poles read as the zero-order-hold (ZOH) sampling at step dt of a
continuous diagonal system (principal logarithm), resampled at dt / rate, for the layer (LRU) and the
kernel (LRUKernel, FFTConvS4 with kernel_type="lru").

Closed forms in float64: the parameters are built from a known continuous system, so the resampled
discrete system is known exactly (lam = exp(a dt'), B_d = expm1(a dt') / a * B_c)."""

import copy
import math

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo.discretization import principal_log, zoh_resample_diag
from lrnnx_zoo.plugins.fftconv import FFTConvS4
from lrnnx_zoo.plugins.lru import LRU, LRUKernel, gamma_log_init

TWO_PI = 2 * math.pi
DT = 0.1
#: continuous poles times dt (a dt): Im in (-pi, pi], the principal (band-limited) system. Negative
#: frequencies are stored by the LRU as phases in (pi, 2 pi); two very slow poles (|1 - lam| ~ 1e-6);
#: one near the Nyquist frequency; one above half of it (aliases at rate 0.5, not in the samples)
A_DT = torch.tensor([-0.05 + 0.3j, -0.2 - 2.0j, -1e-6 + 1e-7j, -1e-6 - 3e-7j, -0.5 + 2.9j, -3.0 - 1.0j,
                     -0.01 + 1.2j], dtype=torch.complex128)
H = 3


def _continuous_system(seed: int = 0):
    """(a (N,), B_c (N, H), C (H, N), D (H,)): a continuous diagonal system, complex128."""
    g = torch.Generator().manual_seed(seed)
    N = A_DT.numel()
    Bc = torch.complex(torch.randn(N, H, generator=g, dtype=torch.float64),
                       torch.randn(N, H, generator=g, dtype=torch.float64))
    C = torch.complex(torch.randn(H, N, generator=g, dtype=torch.float64),
                      torch.randn(H, N, generator=g, dtype=torch.float64))
    return A_DT / DT, Bc, C, torch.randn(H, generator=g, dtype=torch.float64)


def _zoh(a, Bc, step):
    """The ZOH sampling at ``step``, written out here: lam = exp(a step), B_d = expm1(a step) / a B_c."""
    return torch.exp(a * step), (torch.expm1(a * step) / a).unsqueeze(-1) * Bc


def _lru_storing(a, Bc, C, D, step) -> LRU:
    """A float64 LRU whose parameters are the ZOH sampling of (a, B_c, C, D) at ``step``, with phases
    stored in (0, 2 pi) as the LRU keeps them (a negative frequency as theta + 2 pi > pi)."""
    N = a.numel()
    lru = LRU(H, N).double()
    log_lam = a * step
    lam, Bd = _zoh(a, Bc, step)
    theta = torch.where(log_lam.imag > 0, log_lam.imag, log_lam.imag + TWO_PI)
    with torch.no_grad():
        lru.nu_log.copy_(torch.log(-log_lam.real))
        lru.theta_log.copy_(torch.log(theta))
        lru.gamma_log.copy_(gamma_log_init(lru.nu_log))
        B = Bd / torch.exp(lru.gamma_log).unsqueeze(-1)
        lru.B_re.copy_(B.real)
        lru.B_im.copy_(B.imag)
        lru.C_re.copy_(C.real)
        lru.C_im.copy_(C.imag)
        lru.D.copy_(D)
    return lru


def _recurrence(lam, Bd, C, D, u):
    """y_k = Re(C x_k) + D u_k, x_k = lam x_{k-1} + B_d u_k, by a loop.  u: (B, L, H) float64."""
    x = torch.zeros(u.shape[0], lam.numel(), dtype=torch.complex128)
    ys = []
    for k in range(u.shape[1]):
        x = lam * x + u[:, k].to(torch.complex128) @ Bd.T
        ys.append((x @ C.T).real + D * u[:, k])
    return torch.stack(ys, 1)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_built_lru_is_the_sampled_system():
    """The helper itself: the LRU built from (a, B_c) at dt is the ZOH sampling at dt (float64 loop)."""
    a, Bc, C, D = _continuous_system()
    lru = _lru_storing(a, Bc, C, D, DT)
    assert (torch.exp(lru.theta_log) > math.pi).sum() == 3            # phases above pi are part of the test
    u = torch.randn(2, 60, H, dtype=torch.float64)
    assert _rel(lru(u), _recurrence(*_zoh(a, Bc, DT), C, D, u)) < 1e-12


@pytest.mark.parametrize("rate", [2.0, 0.5, 3.0])
def test_resampled_lru_is_the_zoh_sampling_at_the_new_step(rate):
    """resample_(r) of the sampling at dt = the sampling at dt / r. Parameters (float64): lam, gamma B
    and C equal the closed form, conjugated where the new phase is negative (measured <= 1.9e-15
    relative elementwise; tolerance 1e-12, a few thousand ulps for the exp / log / expm1 chain);
    the slow poles' B (|1 - lam| ~ 1e-6) included, where (lam' - 1) / (lam - 1) instead of the
    expm1 ratio is 1.4e-10 off. Outputs (200 steps) against a loop of the closed form: measured
    <= 3.2e-13 (rate 0.5: the slow modes sum ~200 inputs), tolerance 1e-10."""
    a, Bc, C, D = _continuous_system()
    lru = _lru_storing(a, Bc, C, D, DT)
    lru.resample_(rate)
    lam_ref, B_ref = _zoh(a, Bc, DT / rate)
    # new phase Im(a dt) / r, reduced to (-pi, pi] (the same pole), < 0: stored as the conjugate mode
    flip = torch.remainder(A_DT.imag / rate, TWO_PI) > math.pi
    lam, B, C_new = lru.discretize()

    def elementwise(x, ref, mask):
        ref = torch.where(mask, ref.conj(), ref)
        return ((x - ref).abs() / ref.abs()).max().item()

    assert elementwise(lam, lam_ref, flip) < 1e-12
    assert elementwise(B, B_ref, flip.unsqueeze(-1)) < 1e-12
    assert ((C_new - torch.where(flip, C.conj(), C)).abs()).max().item() == 0   # C only conjugated
    assert (torch.exp(lru.theta_log) > 0).all() and lru.nu_log.dtype == torch.float64
    u = torch.randn(2, 200, H, dtype=torch.float64)
    assert _rel(lru(u), _recurrence(lam_ref, B_ref, C, D, u)) < 1e-10


@pytest.mark.parametrize("there,back", [(2.0, 0.5), (3.0, 1 / 3), (0.5, 2.0)])
def test_there_and_back_gives_the_original_outputs(there, back):
    """resample_(r) then resample_(1 / r): the same outputs (float64, measured <= 7.4e-15, tolerance 1e-10).
    For r < 1 first only when no mode goes above the new Nyquist frequency (|Im a dt| / r <= pi):
    that case is the next test's."""
    a, Bc, C, D = _continuous_system()
    keep = A_DT.imag.abs() <= math.pi * min(there, 1.0)
    a, Bc, C = a[keep], Bc[keep], C[:, keep]
    lru = _lru_storing(a, Bc, C, D, DT)
    u = torch.randn(2, 100, H, dtype=torch.float64)
    y = lru(u)
    lru.resample_(there)
    lru.resample_(back)
    assert _rel(lru(u), y) < 1e-10


def test_downsampling_aliases_a_mode_above_the_new_nyquist_frequency():
    """At rate 0.5 a mode of phase 2.0 per sample (above pi / 2) turns 4.0 > pi per new sample: the
    samples cannot tell it from the principal phase 4.0 - 2 pi, so going back (rate 2) gives the
    folded mode of phase pi - 2.0 (conjugated), not 2.0. A mode of phase 1.0 comes back."""
    lru = LRU(1, 2).double()
    with torch.no_grad():
        lru.theta_log.copy_(torch.log(torch.tensor([1.0, 2.0], dtype=torch.float64)))
    lru.resample_(0.5)
    lru.resample_(2.0)
    theta = torch.exp(lru.theta_log)
    assert abs(theta[0].item() - 1.0) < 1e-14
    assert abs(theta[1].item() - (math.pi - 2.0)) < 1e-14


def test_principal_log_and_the_core_transform():
    """principal_log wraps Im into (-pi, pi], keeps Re; zoh_resample_diag divides it by the rate and
    scales B by expm1(log lam') / expm1(log lam) (shapes: log_lam (..., N), B broadcastable)."""
    log_lam = torch.tensor([-0.1 + 4.0j, -0.1 + math.pi * 1j, -0.2 + 7.0j, -0.3 + 0.5j], dtype=torch.complex128)
    p = principal_log(log_lam)
    assert torch.equal(p.real, log_lam.real)
    assert torch.allclose(p.imag, torch.tensor([4.0 - TWO_PI, math.pi, 7.0 - TWO_PI, 0.5], dtype=torch.float64),
                          rtol=0, atol=1e-15)
    B = torch.randn(5, 4, dtype=torch.complex128)
    log2, B2 = zoh_resample_diag(log_lam, B, 2.0)
    assert torch.allclose(log2, p / 2, rtol=0, atol=0)
    assert torch.allclose(B2, B * torch.expm1(p / 2) / torch.expm1(log_lam), rtol=1e-15, atol=0)
    assert zoh_resample_diag(log_lam, None, 2.0)[1] is None
    # a float32 input is computed in float64 and handed back in complex128
    assert zoh_resample_diag(log_lam.to(torch.complex64), B.to(torch.complex64), 3.0)[0].dtype == torch.complex128


def test_lru_resample_keeps_dtype_and_rate_one_is_a_no_op():
    torch.manual_seed(0)
    lru = LRU(4, 8)
    before = {k: v.clone() for k, v in lru.state_dict().items()}
    assert lru.resample_(1.0) == {}
    assert all(torch.equal(before[k], v) for k, v in lru.state_dict().items())
    assert lru.resample_(2.0) == {}
    assert all(v.dtype == torch.float32 for v in lru.state_dict().values())
    with pytest.raises(ValueError, match=r"LRU\.resample_ needs rate.*finite number > 0, got -1"):
        lru.resample_(-1)


# -- the kernel ---------------------------------------------------------------------------------------

def _kernel(dtype=torch.float64, channels=2, seed=0, **kw) -> LRUKernel:
    torch.manual_seed(seed)
    return LRUKernel(3, 8, channels=channels, **kw).to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 5e-6)])
@pytest.mark.parametrize("rate", [2.0, 0.5, 3.0])
def test_kernel_at_a_rate_is_the_resampled_kernel(rate, dtype, tol):
    """kernel(L, rate=r) = (resample_(r) copy)(L), relative to max|K|. float64: the same transform,
    then conjugation (exact) and exp/log of the stored parameters: measured <= 9.1e-16, tolerance 1e-12.
    float32: nu_log', theta_log' and B are rounded once to float32 (half an ulp of |theta_log| ~ 2,
    1.2e-7 relative in theta, a phase error growing with the lag but damped with it): measured
    <= 2.1e-7 over 5 seeds, tolerance 5e-6 (as S4D's log_dt rounding in tests/test_rate.py)."""
    k = _kernel(dtype)
    with torch.no_grad():
        K_rate = k(64, rate=rate)[0]
        fast = copy.deepcopy(k)
        fast.resample_(rate)
        K_fast = fast(64)[0]
    assert _rel(K_fast, K_rate) < tol


def test_kernel_cache_is_keyed_on_the_rate():
    """In inference the kernel is cached: the key must hold the rate, or rate 2 would get rate 1's kernel."""
    k = _kernel()
    with torch.no_grad():
        K1 = k(32)[0]
        K2 = k(32, rate=2.0)[0]
        K1_again = k(32)[0]
    with torch.enable_grad():
        K2_fresh = k(32, rate=2.0)[0].detach()                # under autograd: computed, never cached
    assert _rel(K2, K1) > 0.1 and torch.equal(K2, K2_fresh) and torch.equal(K1, K1_again)


@pytest.mark.parametrize("rate", [2.0, 0.5])
def test_kernel_state_response_at_a_rate(rate):
    """The zero-input response from a state x_{-1} at rate r equals the resampled kernel's from the
    same state, conjugated on the modes it stores conjugated (new phase, reduced to (-pi, pi], < 0).
    float64, 1e-12."""
    k = _kernel()
    x0 = torch.randn(2, 3, 8, dtype=torch.complex128)
    theta = torch.exp(k.theta_log.detach())
    principal = theta - TWO_PI * torch.round(theta / TWO_PI)          # the pole's phase in (-pi, pi]
    flip = torch.remainder(principal / rate, TWO_PI) > math.pi        # the new phase, reduced, < 0
    with torch.no_grad():
        K, Ks = k(40, rate=rate, state=x0)
        fast = copy.deepcopy(k)
        fast.resample_(rate)
        K2, Ks2 = fast(40, state=torch.where(flip, x0.conj(), x0))
    assert _rel(K2, K) < 1e-12 and _rel(Ks2, Ks) < 1e-12


def test_resampled_kernel_steps_and_passes_state_like_its_convolution():
    """The resampled kernel's three evaluations agree (float64, 1e-10 relative): convolution with
    state passing, the step form, and forward_state."""
    torch.manual_seed(1)
    m = FFTConvS4(3, kernel_type="lru", d_state=8, channels=2).double().eval()
    m.resample_(0.5)
    x = torch.randn(2, 3, 60, dtype=torch.float64)
    with torch.no_grad():
        y, s = m(x, state=m.default_state(2))
        y1, s1 = m(x[..., :25], state=m.default_state(2))
        y2, s2 = m(x[..., 25:], state=s1)
        m.setup_step()
        state, ys = m.default_state(2), []
        for t in range(60):
            y_t, state = m.step(x[..., t], state)
            ys.append(y_t)
    assert _rel(torch.cat([y1, y2], -1), y) < 1e-10
    assert _rel(torch.view_as_real(s2), torch.view_as_real(s)) < 1e-10
    assert _rel(torch.stack(ys, -1), y) < 1e-10


@pytest.mark.parametrize("l_max", [None, 16])
@pytest.mark.parametrize("rate", [2.0, 0.5])
def test_fftconv_lru_forward_at_a_rate_is_the_resampled_block(rate, l_max):
    """FFTConvS4(kernel_type="lru"): forward(x, rate=r) = the resample_(r) block's forward(x), through
    the blocked inference convolution and the autograd path; float64, measured <= 4.1e-16, tolerance 1e-12."""
    torch.manual_seed(2)
    m = FFTConvS4(3, kernel_type="lru", d_state=8, channels=2, l_max=l_max).double().eval()
    x = torch.randn(2, 3, 50, dtype=torch.float64)
    fast = copy.deepcopy(m)
    fast.resample_(rate)
    with torch.no_grad():
        assert _rel(fast(x)[0], m(x, rate=rate)[0]) < 1e-12
    xg = x.clone().requires_grad_()
    assert _rel(fast(xg)[0].detach(), m(xg, rate=rate)[0].detach()) < 1e-12
    if l_max is not None:
        assert fast.L == round(l_max * rate)


# -- the physics ---------------------------------------------------------------------------------------

def _slow_input(r: int, L: int = 120) -> torch.Tensor:
    """Two slow sinusoids (periods 40 and 27 samples of the original rate, far below its Nyquist
    period of 2), zero at t = 0 (so no start-up step), sampled r times per original sample: (1, r L, 2)."""
    t = torch.arange(r * L, dtype=torch.float64) / r
    return torch.stack([torch.sin(TWO_PI * t / 40) + 0.5 * torch.sin(TWO_PI * t / 27),
                        torch.sin(TWO_PI * t / 27) - 0.3 * torch.sin(TWO_PI * t / 40)], -1)[None]


def test_denser_samples_of_a_continuous_signal_give_the_same_outputs():
    """An LRU on u(k dt) and its at_rate(2) copy on u(k dt / 2), read at the common times k dt.

    ZOH holds the input at its sample u(t_k) over the step (t_{k-1}, t_k] before it: to first order
    a time advance of half a step, so the output at step dt is the continuous one's at t + dt / 2,
    off by about (dt / 2) max|y'|, and the outputs at dt and dt / 2 differ by about
    (dt / 2 - dt / 4) max|y'| = (dt / 4) max|y'| (y' from a rate-16 run). D = 0: D u is the same at
    the common times whatever the rate, and would only dilute the figures. Measured over seeds 0-5
    (ring init, H=2, N=16, 120 samples): the difference is 0.60-1.11 times this estimate (seed 0:
    0.042 = 1.11 x 0.038, of outputs up to 0.60); asserted < 1.5 times it. First order: against the
    rate-16 run, relative errors 0.127, 0.057, 0.024 at r = 1, 2, 4 (seed 0; ratios 0.42-0.56 per
    doubling over the seeds), asserted < 0.6 per doubling. The LRU not resampled, run on the dense
    samples (its time running twice as fast), is 3.7-12x further off than the r = 2 copy: asserted > 3x."""
    torch.manual_seed(0)
    lru = LRU(2, 16).double()
    with torch.no_grad():
        lru.D.zero_()
    ys = {}
    for r in (1, 2, 4, 16):
        layer = copy.deepcopy(lru)
        layer.resample_(r)
        ys[r] = layer(_slow_input(r)).detach()
    slope = ys[16].diff(dim=1).abs().max() * 16                   # max|y'| per original step
    ys = {r: y[:, ::r] for r, y in ys.items()}
    assert (ys[2] - ys[1]).abs().max() < 1.5 * slope / 4
    scale = ys[16].abs().max()
    err = {r: ((ys[r] - ys[16]).abs().max() / scale).item() for r in (1, 2, 4)}
    assert err[2] < 0.6 * err[1] and err[4] < 0.6 * err[2]
    naive = ((lru(_slow_input(2))[:, ::2].detach() - ys[16]).abs().max() / scale).item()
    assert naive > 3 * err[2]


def test_a_float32_lru_resampled_to_a_low_rate_keeps_float32_accuracy():
    """resample_(0.01) stored the new phases theta / rate unreduced (52-290 rad), and their float32
    rounding (~theta * 6e-8 rad a step) built up over slow modes' memory: 1.3e-4 off the float64
    layer resampled alike (r up to 0.999999, 1025 steps). Reduced to (-pi, pi]: 8e-8 measured;
    tolerance 1e-6. Through FFTConvS4's LRU kernel too (7.3e-5 before, 2e-7 after)."""
    torch.manual_seed(2)
    layer = lrnnx_zoo.create_layer("lru", 2, d_state=8, r_min=0.999, r_max=0.999999).eval()
    exact = copy.deepcopy(layer).double()
    layer.resample_(0.01)
    exact.resample_(0.01)
    assert (torch.exp(layer.theta_log) <= math.pi).all()
    x = torch.randn(1, 1025, 2, dtype=torch.float64)
    with torch.no_grad():
        assert _rel(layer(x.float()).double(), exact(x)) < 1e-6
    torch.manual_seed(3)
    block = FFTConvS4(2, kernel_type="lru", transposed=False,
                      param_config={"d_state": 16, "r_min": 0.999, "r_max": 0.999999}).eval()
    with torch.no_grad():
        want = copy.deepcopy(block).double()(x, rate=0.01)[0]
        block.resample_(0.01)
        assert _rel(block(x.float())[0].double(), want) < 1e-6
