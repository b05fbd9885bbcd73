"""S4 (NPLR HiPPO kernel): kernel vs explicit powers of the dense discretised A, step modes vs
convolution, state passing, rate, double_length, optimizer records, seed-style layer, backends.

Tolerances (float32 kernels and layers, float64 references):
- kernel vs hippo.krylov on the dense discretised A, 1e-4 relative to max|K| at L=1024: the
  float32 Cauchy/Woodbury evaluation reaches 1e-7..7e-6 (channels whose Woodbury step cancels,
  e.g. Fourier's, are recomputed in float64); a wrong term (C~, Woodbury, node) errs at O(1).
- dense / linear step modes vs convolution mode, 1e-5 relative to max|y| at L=1024: both float32
  paths sit ~1e-6 from the float64 truth here; diagonal 1e-4 (its float32 state rounding is
  amplified by the cancellation among modes, predicted and checked by the builder).
- identities of one float64-prepared computation (rate, double_length, state passing): 1e-5.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo import hippo
from lrnnx_zoo.convolution import causal_conv
from lrnnx_zoo.discretization import zoh_dense
from lrnnx_zoo.kernels import keops_support
from lrnnx_zoo.kernels.cauchy import cauchy_conj_torch
from lrnnx_zoo.plugins import s4 as s4_plugin
from lrnnx_zoo.plugins.s4 import (S4, Activation, ChannelDPLRStepForm, DiagonalAccuracyError, HippoSSKernel,
                                  LinearActivation, SSKernelNPLR, TransposedLinear, get_initializer,
                                  optimizer_param_groups)
from lrnnx_zoo.kernels import cauchy_shared
from lrnnx_zoo.step_forms import ChannelDenseStepForm, ChannelDiagonalStepForm
from memory_probe import LargestTensor

L = 1024
MEASURES = [("legs", 1), ("legt", 2), ("fourier", 1), ("lagt", 1), ("tlagt", 1), ("glagt", 1)]
needs_keops = pytest.mark.skipif(not keops_support.keops_available(),
                                 reason=f"pykeops unusable here: {keops_support.keops_unavailable_reason()}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = (torch.view_as_real(t.detach()) if t.is_complex() else t.detach() for t in (a, b))
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


def reference_kernel(k: SSKernelNPLR, C_plain: torch.Tensor, length: int, rate: float = 1.0) -> torch.Tensor:
    """C^T A_bar^l B_bar by explicit powers (hippo.krylov) of the dense discretised A, in the full
    conjugate-pair basis of hippo.nplr:  A = diag([w, conj w]) - P_full^T conj(P_full)."""
    with torch.no_grad():
        w, P, B, _, dt = k.continuous(double=True)
        full = lambda x: torch.cat([x, x.conj()], -1)                           # noqa: E731
        Pf = full(P)
        A = torch.diag_embed(full(w)) - torch.einsum("rhi,rhj->hij", Pf, Pf.conj())
        if k.discretization == "bilinear":
            A_bar, B_bar = hippo.bilinear(dt / rate, A, full(B))
        else:
            A_bar, B_bar = zoh_dense(A, full(B), dt / rate)
        return hippo.krylov(length, A_bar, B_bar, full(C_plain)).real


def make_kernel(seed: int = 0, **kw) -> HippoSSKernel:
    torch.manual_seed(seed)
    return HippoSSKernel(kw.pop("H", 4), **{"N": 64, **kw})


# -- kernel ------------------------------------------------------------------------------------

@pytest.mark.parametrize("disc,backend", [("bilinear", "torch"), pytest.param("bilinear", "keops", marks=needs_keops),
                                          ("zoh", "torch")])
@pytest.mark.parametrize("measure,rank", MEASURES)
def test_kernel_matches_dense_powers(measure, rank, disc, backend):
    k = make_kernel(measure=measure, rank=rank, discretization=disc, backend=backend)
    C_plain = k.continuous(double=True)[3].clone()          # before the first forward C is the plain C
    with torch.no_grad():
        K = k(L=L)[0]
    assert k.length == L and K.shape == (1, 4, L) and K.dtype == torch.float32
    err = rel_err(K, reference_kernel(k, C_plain, L))
    print(f"kernel {measure}/{disc}/{backend}: rel err {err:.1e}")
    assert err < 1e-4


def test_rate_half_equals_dt_doubled():
    for disc in ("bilinear", "zoh"):
        k = make_kernel(discretization=disc)
        k2 = copy.deepcopy(k)                                # plain C (no internal length yet) in both
        with torch.no_grad():
            k2.log_dt += math.log(2.0)
            K_half, K_dt2 = k(L=512, rate=0.5)[0], k2(L=512)[0]
            k3 = make_kernel(discretization=disc, L=L)       # C~ stored: rate stays exact for the plain C
            C_plain = k3.output_matrix()
            K3 = k3(L=512, rate=0.5)[0]
        assert rel_err(K_half, K_dt2) < 1e-5
        assert rel_err(K3, reference_kernel(k3, C_plain, 512, rate=0.5)) < 1e-4
        assert k3(rate=0.5)[0].shape[-1] == round(k3.length * 0.5)   # default length: same duration


def test_double_length_keeps_kernel_exact():
    k = make_kernel(L=256)
    C_plain = k.output_matrix()
    with torch.no_grad():
        K1 = k(L=256)[0]
        k.double_length()
        assert k.length == 512
        K2 = k(L=512)[0]
        K4 = k(L=1000)[0]                                    # doubles again on demand
    assert k.length == 1024
    assert rel_err(K2[..., :256], K1) < 1e-5 and rel_err(K4[..., :512], K2) < 1e-5
    assert rel_err(K4, reference_kernel(k, C_plain, 1000)) < 1e-4
    assert rel_err(k.output_matrix(), C_plain) < 1e-5


def test_inference_reuses_kernel_only_for_identical_parameters():
    k = make_kernel(H=2, N=8)
    with torch.no_grad():
        K1 = k(L=64)[0].clone()
        K1_again = k(L=64)[0]
        assert torch.equal(K1_again, K1)
        K1_again.zero_()                                     # an in-place edit is seen: recomputed
        assert torch.equal(k(L=64)[0], K1)
        k.B.data.mul_(2)                                     # no version bump; the content hash sees it
        K2 = k(L=64)[0]
    assert rel_err(K2, 2 * K1) < 1e-6                        # K is linear in B
    K_grad = k(L=64)[0]                                      # autograd on: recomputed, with a graph
    assert K_grad.requires_grad and rel_err(K_grad, K2) < 1e-6


def test_seed_argument_order_and_shapes():
    k = make_kernel(H=3, N=8, channels=2)
    s = k.default_state(5)
    assert s.shape == (5, 3, 4) and s.dtype == torch.complex64
    with torch.no_grad():
        K, K_state = k(s, 1.0, 100)                          # seed: forward(state, rate, L)
        K2, _ = k(L=100, state=s)
    assert K.shape == (2, 3, 100) and K_state.shape == (5, 2, 3, 100) and torch.equal(K, K2)
    assert K_state.abs().max() == 0


# -- state passing -------------------------------------------------------------------------------

@pytest.mark.parametrize("disc", ["bilinear", "zoh"])
def test_state_passing_chunks_equal_one_call(disc):
    torch.manual_seed(0)
    layer = S4(6, d_state=16, discretization=disc).eval()
    x0, x1, x2 = torch.randn(2, 6, 40), torch.randn(2, 6, 300), torch.randn(2, 6, 200)
    with torch.no_grad():
        _, s0 = layer(x0, state=layer.default_state(2))     # a non-zero start
        y_all, s_all = layer(torch.cat([x1, x2], -1), state=s0)
        y1, s1 = layer(x1, state=s0)
        y2, s2 = layer(x2, state=s1)
    assert rel_err(torch.cat([y1, y2], -1), y_all) < 1e-5
    assert rel_err(torch.view_as_real(s2), torch.view_as_real(s_all)) < 1e-5
    assert layer(x1)[1] is None


@pytest.mark.parametrize("measure,rank", MEASURES[:4])
def test_bilinear_nplr_is_the_dense_bilinear_discretization(measure, rank):
    # Woodbury on the normal-plus-low-rank structure against a dense solve of the same system, both
    # float64: they agree to rounding (~1e-15); a wrong sign or factor in a term is off by O(1).
    k = make_kernel(H=6, measure=measure, rank=rank)
    with torch.no_grad():
        w, P, B, _, dt = k.continuous(double=True)
        A_bar, b_bar = s4_plugin.dense.bilinear_nplr(w, P, B, dt / 0.7)
        A_ref, b_ref = hippo.bilinear(dt / 0.7, s4_plugin.dense.real_matrix(w, P), s4_plugin.dense.to_real(B))
    assert rel_err(A_bar, A_ref) < 1e-12 and rel_err(b_bar, b_ref) < 1e-12


@pytest.mark.parametrize("L,T", [(0, 1), (1, 1), (5, 8), (64, 8), (100, 16), (1000, 32)])
def test_squaring_chain_is_the_power_and_the_krylov_block(L, T):
    # One chain of squares against hippo.power / hippo.krylov, each squaring anew, float64: equal to
    # rounding (~1e-15 relative); a square used once too often or too few is off by O(dt) or more.
    k = make_kernel(H=3, N=16)
    with torch.no_grad():
        A_bar, b_bar = k.dense_system()
        power_t, rows, AT_t = s4_plugin.dense.squaring_chain(A_bar.transpose(-1, -2).contiguous(), b_bar, L, T)
    assert rel_err(power_t.transpose(-1, -2), hippo.power(L, A_bar)) < 1e-12
    assert rel_err(rows.transpose(-1, -2), hippo.krylov(T, A_bar, b_bar)) < 1e-12
    assert rel_err(AT_t.transpose(-1, -2), hippo.power(T, A_bar)) < 1e-12


@pytest.mark.parametrize("L", [1, 2, 7, 64, 1000])
@pytest.mark.parametrize("from_rest", [True, False])
def test_advance_state_is_the_stepped_recurrence(L, from_rest):
    # float64 throughout: the blocked Horner scheme and the plain recurrence round differently,
    # ~1e-13 relative here; a block off by one step (a power of A too many) is off by ~1e-2.
    k = make_kernel(H=5, N=16)
    torch.manual_seed(1)
    with torch.no_grad():
        A_bar, b_bar = k.dense_system()
        u = torch.randn(3, 5, L, dtype=torch.float64)
        x = torch.zeros(3, 5, 16, dtype=torch.float64) if from_rest else torch.randn(3, 5, 16, dtype=torch.float64)
        want = x
        for t in range(L):
            want = (A_bar @ want.unsqueeze(-1)).squeeze(-1) + b_bar * u[..., t:t + 1]
        got = s4_plugin.dense.advance_state(A_bar, b_bar, u, x)
    assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("measure,rank", MEASURES[:4])
@pytest.mark.parametrize("from_rest", [True, False])
def test_dplr_steps_are_the_dense_recurrence(measure, rank, from_rest):
    # The diagonal plus rank-r A_bar (never formed) stepped L times against the dense A_bar's blocked
    # Horner scheme (test above), float64: ~1e-14 relative; a wrong sign of the feedback, a missing
    # rank or a swapped [Re; Im] half is off by O(dt) or more.
    k = make_kernel(H=5, N=16, measure=measure, rank=rank)
    torch.manual_seed(1)
    with torch.no_grad():
        A_bar, b_bar = k.dense_system()
        w, P, B, _, dt = k.continuous(double=True)
        system = s4_plugin.dense.bilinear_dplr(w, P, B, dt)
        u = torch.randn(3, 5, 77, dtype=torch.float64)
        x = torch.zeros(3, 5, 16, dtype=torch.float64) if from_rest else torch.randn(3, 5, 16, dtype=torch.float64)
        got = s4_plugin.dense.advance_state_dplr(system, u, x)
        want = s4_plugin.dense.advance_state(A_bar, b_bar, u, x)
    assert rel_err(got, want) < 1e-12


def test_dense_state_passing_forms_nothing_larger_than_its_operands(monkeypatch):
    # A_bar^L x and A_bar x broadcast (H, N, N) over the batch as a copy (B, H, N, N), and the blocked
    # Horner scheme formed all its blocks' terms at once, (J, H, B, N): 2.8 GB at B=64, H=64, N=256,
    # L=4096, and 34 GB asked at B=256, H=N=256. Every op's output now stays within twice the larger of
    # u and A_bar (u padded to whole blocks); each of the old intermediates was 2.5-8x that here.
    monkeypatch.setattr(s4_plugin.dense, "dplr_state_cheaper", lambda *a: False)
    k = make_kernel(H=3, N=32)
    torch.manual_seed(1)
    with torch.no_grad():
        A_bar, b_bar = k.dense_system()
        u = torch.randn(8, 3, 20, dtype=torch.float64)
        x = torch.randn(8, 3, 32, dtype=torch.float64)
        state = torch.randn(8, 3, 16, dtype=torch.complex128)
        bound = 2 * max(u.numel(), A_bar.numel())
        for run in (lambda: s4_plugin.dense.advance_state(A_bar, b_bar, u, x),
                    lambda: k.forward_state(u, state),
                    lambda: k(L=20, state=state)):
            with LargestTensor() as seen:
                run()
            assert seen.numel <= bound, (seen.numel, bound)


def test_output_matrix_of_many_channels_works_channel_by_channel():
    # C~ <-> C for C output channels multiplied and solved with a (C, H, N, N) broadcast copy of the
    # (H, N, N) matrices, one LU factorisation per output channel. Now per channel, the C outputs as
    # columns: nothing larger than twice the matrices, and C recovered from C~ to float64 rounding.
    k = make_kernel(H=3, N=16, channels=6, L=64)
    with torch.no_grad(), LargestTensor() as seen:
        k.output_matrix()
        k.output_tilde(1.0, 64)
    assert seen.numel <= 2 * 3 * 17 * 16 < 6 * 3 * 16 * 16
    with torch.no_grad():
        back = k.output_tilde(1.0, 64)                     # (I - A^L)^T C = C~ again
    assert rel_err(back, torch.view_as_complex(k.C.double())) < 1e-10


def test_diagonal_mode_state_conversion_factorises_each_channel_once():
    # pack_state solved V x = r with r unsqueezed, which factorised a copy of the (H, N/2, N/2) basis
    # for every batch row; unpack_state multiplied a broadcast copy. Both round trip, and form nothing
    # larger than the basis or the eigen-coordinates' state (N complex modes as 2N reals: 4x x's numel).
    torch.manual_seed(0)
    s4 = S4(3, d_state=16).double()
    s4.setup_step("diagonal", tol=math.inf)
    x = torch.randn(32, 3, 8, dtype=torch.complex128)
    basis = s4.kernel._basis
    with LargestTensor() as seen:
        back = s4.kernel.unpack_state(s4.kernel.pack_state(x))
    assert seen.numel <= 4 * max(basis.numel(), x.numel()) < 32 * basis.numel()
    # LegS's eigenbasis has condition number ~3e7 here, so float64 round trips to ~5e-10 (float32
    # states to ~4e-2, the same before this change); a wrong channel's basis is off by O(1).
    assert rel_err(back, x) < 1e-8


@pytest.mark.parametrize("cheaper", [True, False])
def test_forward_state_of_an_empty_batch_is_empty(cheaper, monkeypatch):
    # Both paths; the DPLR steps' reshape(..., -1) had no size to infer from 0 elements.
    monkeypatch.setattr(s4_plugin.dense, "dplr_state_cheaper", lambda *a: cheaper)
    k = make_kernel(H=4, N=16)
    with torch.no_grad():
        out = k.forward_state(torch.randn(0, 4, 5), torch.zeros(0, 4, 8, dtype=torch.complex64))
    assert out.shape == (0, 4, 8)


@pytest.mark.parametrize("discretization", ["bilinear", "zoh"])
def test_forward_state_steps_where_squares_cost_more(discretization, monkeypatch):
    # Large N, short inputs: the state passing steps the DPLR form instead of squaring the dense
    # (H, N, N) A_bar (at H=N=256 a 64-step prefill took 0.52 s a layer in squares, 16 ms stepping);
    # small N, long inputs keep the squares; zoh has no DPLR form. Same state either way (float64).
    dense = s4_plugin.dense
    assert dense.dplr_state_cheaper(1, 256, 256, 64) and dense.dplr_state_cheaper(1, 256, 256, 4096)
    assert not dense.dplr_state_cheaper(1, 128, 64, 1024) and not dense.dplr_state_cheaper(8, 64, 16, 256)
    k = make_kernel(H=4, N=64, discretization=discretization)
    u = torch.randn(2, 4, 40, dtype=torch.float64)
    x = torch.randn(2, 4, 32, dtype=torch.complex128)
    chosen = []
    for cheaper in (True, False):
        monkeypatch.setattr(dense, "dplr_state_cheaper", lambda *a, _c=cheaper: _c)
        calls = {"dplr": 0}
        stepped = dense.advance_state_dplr

        def counted(*a, **kw):
            calls["dplr"] += 1
            return stepped(*a, **kw)
        monkeypatch.setattr(dense, "advance_state_dplr", counted)
        with torch.no_grad():
            chosen.append(k.forward_state(u, x))
        monkeypatch.setattr(dense, "advance_state_dplr", stepped)
        assert calls["dplr"] == (cheaper and discretization == "bilinear")
    assert rel_err(chosen[0], chosen[1]) < 1e-12
    # under autograd the dense path, whatever the cost (L steps would record L small graphs)
    monkeypatch.setattr(dense, "dplr_state_cheaper", lambda *a: True)
    monkeypatch.setattr(dense, "advance_state_dplr", lambda *a: pytest.fail("stepped under autograd"))
    k.forward_state(u.requires_grad_(), x).abs().sum().backward()


def test_output_matrix_is_cached_for_the_same_parameters_only():
    k = make_kernel(H=3, N=16, L=128)
    with torch.no_grad():
        C1 = k.output_matrix()
        assert k.output_matrix() is C1                      # a hit: no second A_bar^L
        k.log_dt.data += 0.3                                 # new weights: recomputed
        C2 = k.output_matrix()
        k.cache_inference_kernel = False
        C2_fresh = k.output_matrix()
        k.cache_inference_kernel = True
        k(L=512)                                             # C~ re-expressed for a longer length: same plain C
        C3 = k.output_matrix()
    assert C2 is not C1 and rel_err(C2, C1) > 1e-3 and torch.equal(C2, C2_fresh)
    assert C3 is not C2 and rel_err(C3, C2) < 1e-5
    C_grad = k.output_matrix()                               # under autograd: computed, with a graph
    assert C_grad.requires_grad and rel_err(C_grad, C3) < 1e-12


@pytest.mark.parametrize("measure,rank", MEASURES)
@pytest.mark.parametrize("disc", ["bilinear", "zoh"])
def test_streams_carry_on_across_length_changes_for_every_measure(measure, rank, disc):
    # A longer forward re-expresses C~ for the new length and rounds it to float32 again. The plain C
    # recovered from it moved 3.1e-5 for Fourier (its poles sit near the unit circle), the rebuilt
    # step form 4.9e-5, and every live stream was refused as if the weights had changed. A stream
    # now keeps its form while the kernel is the system it was built from (restated_since).
    H, Bs = 4, 2
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("s4", H, d_state=16, measure=measure, rank=rank, discretization=disc).eval()
    seed = S4(H, d_state=16, measure=measure, rank=rank, discretization=disc).eval()
    x = torch.randn(Bs, 40, H)
    with torch.no_grad():
        cache = layer.allocate_inference_cache(Bs)              # before the first forward: plain C
        first = torch.stack([layer.step(x[:, t], cache)[0] for t in range(20)], 1)
        layer(torch.randn(Bs, 64, H))                           # C -> C~ for 64
        middle = torch.stack([layer.step(x[:, t], cache)[0] for t in range(20, 30)], 1)
        layer(torch.randn(Bs, 1024, H))                         # C~ for 64 -> C~ for 1024
        rest = torch.stack([layer.step(x[:, t], cache)[0] for t in range(30, 40)], 1)
        stepped, conv = torch.cat([first, middle, rest], 1), layer(x)
        seed(torch.randn(Bs, H, 64))
        seed.setup_step("dense")
        state = seed.default_state(Bs)
        y0, state = seed.step(x[:, 0], state)
        seed(torch.randn(Bs, H, 1024))
        y1, _ = seed.step(x[:, 1], state)
    # 1e-4 of max|y|: the project's float32 step-vs-convolution tolerance (conv from C~ for 1024)
    assert rel_err(stepped, conv) < 1e-4, (measure, disc, rel_err(stepped, conv))
    assert torch.isfinite(y1).all()


def test_a_changed_step_after_a_length_change_stops_the_stream():
    # A length change keeps the system only under the same A_bar: after an edit of log_dt the stored
    # C~ stands for another C, and a stream whose form a length change kept is stale.
    k = make_kernel(H=3, N=16, L=128, measure="fourier")
    u = torch.randn(2, 3)
    with torch.no_grad():
        k.setup_step("dense")
        state = k.step(u, k.default_state(2))[1]
        k(L=512)                                                # re-expressed: 128 -> 512, the form kept
        state = k.step(u, state)[1]
        k.log_dt.add_(1e-3)
        with pytest.raises(RuntimeError, match="weights changed since setup_step"):
            k.step(u, state)


@pytest.mark.parametrize("disc", ["bilinear", "zoh"])
def test_a_reloaded_model_streams_as_the_model_it_was_saved_from(disc, tmp_path):
    # A forward rewrites the stored C for its length (C~); the state_dict holds that C~. The step
    # forms took C from the C they started from, a loaded copy from the stored C~: its streams were
    # 1.2e-7 to 1.7e-7 (of max|y|) off the model's, its prefill too. Both now recover C from the
    # stored C~, in the same operations: tolerance 0 (bit for bit).
    torch.manual_seed(0)
    config = lrnnx_zoo.ModelConfig(layer="s4", d_input=3, d_output=4, d_model=8, n_layers=2,
                                   layer_kwargs={"d_state": 16, "measure": "fourier", "discretization": disc})
    model = lrnnx_zoo.SequenceModel(config).eval()
    x = torch.randn(2, 30, 3)
    with torch.no_grad():
        model(torch.randn(2, 64, 3))                            # C -> C~ for 64
        loaded = lrnnx_zoo.from_pretrained(model.save_pretrained(tmp_path / "s4")).eval()
        streams = []
        for m in (model, loaded):
            cache = m.allocate_inference_cache(2)
            steps = torch.stack([m.step(x[:, t], cache)[0] for t in range(20)], 1)
            y, prefilled = m.prefill(x[:, :20])
            streams.append((steps, y, m.step(x[:, 20], prefilled)[0]))
    for mine, theirs in zip(*streams):
        assert torch.equal(mine, theirs), rel_err(mine, theirs)


def test_a_stream_made_after_a_length_change_keeps_its_form_across_the_next():
    # A stream made from C~ for 64 goes on, bit for bit, after a longer forward re-expresses C~ for
    # 1024 (Fourier: a form rebuilt from it is 4.9e-5 off, and the stream was refused): as the stream
    # of a copy that never ran longer. Tolerance 0.
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("s4", 4, d_state=16, measure="fourier").eval()
    x = torch.randn(2, 30, 4)
    with torch.no_grad():
        layer(torch.randn(2, 64, 4))
        twin = copy.deepcopy(layer)
        caches = [m.allocate_inference_cache(2) for m in (layer, twin)]
        ys = [[m.step(x[:, t], c)[0] for t in range(10)] for m, c in zip((layer, twin), caches)]
    layer(torch.randn(2, 1024, 4))          # C~ for 64 -> C~ for 1024 (a training forward; inference keeps C~)
    assert layer.kernel.length == 1024 and twin.kernel.length == 64
    with torch.no_grad():
        for m, c, y in zip((layer, twin), caches, ys):
            y += [m.step(x[:, t], c)[0] for t in range(10, 30)]
    assert torch.equal(torch.stack(ys[0], 1), torch.stack(ys[1], 1))


def test_a_stream_kept_across_a_length_change_moves_to_a_step_graph():
    # state_from_cache checks the cache's form against the graph's, built from the rewritten C~:
    # Fourier's kept form rounds 5e-5 otherwise, and the stream was refused as if the weights had
    # changed. The state layout is the same: accepted. A changed step still refuses it.
    from lrnnx_zoo.export import ExportError, state_from_cache
    torch.manual_seed(0)
    config = lrnnx_zoo.ModelConfig(layer="s4", d_input=3, d_output=4, d_model=4, n_layers=1,
                                   layer_kwargs={"d_state": 16, "measure": "fourier"})
    model = lrnnx_zoo.SequenceModel(config).eval()
    with torch.no_grad():
        model(torch.randn(2, 64, 3))
        _, cache = model.prefill(torch.randn(2, 20, 3))
    model(torch.randn(2, 1024, 3))          # a training forward: C~ for 64 -> C~ for 1024
    with torch.no_grad():
        model.step(torch.randn(2, 3), cache)
        assert torch.equal(state_from_cache(model, cache), cache["layers"][0]["lrnn_state"])
        model.blocks[0].layer.kernel.log_dt.add_(1e-3)
        with pytest.raises(ExportError, match="not the one a step graph"):
            state_from_cache(model, cache)



# -- step modes ----------------------------------------------------------------------------------

def run_steps(kernel, u: torch.Tensor) -> torch.Tensor:
    s = kernel.default_state(u.shape[0])
    ys = []
    for t in range(u.shape[-1]):
        y, s = kernel.step(u[..., t], s)
        ys.append(y)
    return torch.stack(ys, -1)                               # (B, C, H, L)


@pytest.mark.parametrize("mode,measure,tol", [("dense", "legs", 1e-5), ("linear", "legs", 1e-5),
                                              ("diagonal", "fourier", 1e-4)])
def test_step_mode_matches_convolution_L1024(mode, measure, tol):
    # Diagonal on Fourier: HiPPO LegS/LegT/LagT eigenbases are too ill-conditioned (see next test).
    k = make_kernel(H=8, measure=measure, channels=2)
    u = torch.randn(2, 8, L)
    with torch.no_grad():
        y_conv = causal_conv(u.unsqueeze(1), k(L=L)[0])
        k.setup_step(mode)
        y_step = run_steps(k, u)
    err = rel_err(y_step, y_conv)
    print(f"step mode {mode} ({measure}, N=64): rel err vs convolution {err:.1e}")
    assert err < tol


def test_diagonal_mode_refuses_ill_conditioned_legs():
    k = make_kernel(H=2, L=L)
    with pytest.raises(DiagonalAccuracyError, match="mode='linear'"):
        k.setup_step("diagonal")
    k.setup_step("diagonal", tol=math.inf)                  # built anyway: it is indeed useless
    u = torch.randn(1, 2, 256)
    with torch.no_grad():
        err = rel_err(run_steps(k, u), causal_conv(u.unsqueeze(1), k(L=256)[0]))
    print(f"diagonal mode on LegS N=64 (forced): rel err {err:.1e}")
    assert err > 1e-2
    assert isinstance(k.step_form("auto"), ChannelDPLRStepForm)
    assert isinstance(make_kernel(H=2, N=16, measure="fourier").step_form("auto"), ChannelDiagonalStepForm)
    assert isinstance(make_kernel(H=2, discretization="zoh").step_form("auto"), ChannelDenseStepForm)


def test_step_forms_are_real_and_exportable():
    k = make_kernel(H=3, N=8, channels=2)
    D = torch.randn(2, 3)
    for mode in ("dense", "linear", "auto"):
        form = k.step_form(mode, D=D)
        assert all(not b.is_complex() for b in form.buffers())
        y, s = form(torch.randn(5, 3), torch.zeros(5, form.state_size))
        assert y.shape == (5, 6) and s.shape == (5, form.state_size)
    with pytest.raises(ValueError, match="bilinear"):
        make_kernel(N=8, discretization="zoh").step_form("linear")
    with pytest.raises(ValueError, match="step mode must be one of"):
        k.step_form("fast")


def test_pack_state_round_trip_and_fftconv_kernel():
    k = make_kernel(H=2, N=8, measure="fourier")
    x = torch.randn(3, 2, 4, dtype=torch.complex64)
    for mode in ("linear", "diagonal", "dense"):
        k.step_form(mode)
        assert rel_err(torch.view_as_real(k.unpack_state(k.pack_state(x))), torch.view_as_real(x)) < 1e-6
    conv = lrnnx_zoo.convolution.FFTConvS4(4, kernel_type="s4", d_state=8, measure="legs")
    assert isinstance(conv.kernel, HippoSSKernel) and conv(torch.randn(1, 4, 32))[0].shape == (1, 4, 32)


# -- optimizer records ---------------------------------------------------------------------------

def test_register_lr_wd_and_param_groups():
    layer = S4(4, d_state=8, lr=1e-3)
    k = layer.kernel
    for name in ("log_dt", "w", "P", "B"):
        assert getattr(k, name)._optim == {"lr": 1e-3, "weight_decay": 0.0}
    assert not hasattr(k.C, "_optim")
    groups = optimizer_param_groups(layer, base_lr=1e-2, base_wd=0.1)
    by_lr = {g["lr"]: g for g in groups}
    assert set(by_lr) == {1e-2, 1e-3} and by_lr[1e-3]["weight_decay"] == 0.0 and by_lr[1e-2]["weight_decay"] == 0.1
    assert len(by_lr[1e-3]["params"]) == 4
    assert sum(len(g["params"]) for g in groups) == len(list(layer.parameters()))
    opt = torch.optim.AdamW(groups)
    layer(torch.randn(2, 4, 16))[0].square().mean().backward()
    opt.step()

    frozen = HippoSSKernel(4, N=8, trainable={"dt": True})
    assert "log_dt" in dict(frozen.named_parameters()) and "w" in dict(frozen.named_buffers())
    frozen.register("extra", torch.zeros(3), trainable=True, lr=0.5, wd=None)
    assert frozen.extra._optim == {"lr": 0.5}
    frozen.register("fixed", torch.zeros(3), trainable=False, lr=0.5)
    assert "fixed" in dict(frozen.named_buffers()) and not hasattr(frozen.fixed, "_optim")


def test_param_groups_leave_weight_decay_to_the_optimizer_unless_given():
    """Without base_wd, the optimizer's own weight_decay reaches the parameters that record none
    (a default of 0.0 set every group's decay: AdamW(..., weight_decay=0.05) decayed nothing);
    the registered state-space parameters keep their recorded 0.0."""
    layer = S4(4, d_state=8, lr=1e-3)
    opt = torch.optim.AdamW(optimizer_param_groups(layer, base_lr=1e-2), weight_decay=0.05)
    by_lr = {g["lr"]: g for g in opt.param_groups}
    assert set(by_lr) == {1e-2, 1e-3}
    assert by_lr[1e-2]["weight_decay"] == 0.05 and by_lr[1e-3]["weight_decay"] == 0.0
    given = {g["lr"]: g["weight_decay"] for g in optimizer_param_groups(layer, base_lr=1e-2, base_wd=0.0)}
    assert given == {1e-2: 0.0, 1e-3: 0.0}


def _named_groups(model: torch.nn.Module, groups: list) -> list:
    """Param groups with each parameter replaced by its name, comparable across copies of a model."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [{**g, "params": [names[id(p)] for p in g["params"]]} for g in groups]


def test_lr_wd_records_survive_deepcopy():
    # nn.Parameter.__deepcopy__ copies the data, not the _optim attribute: a deepcopied S4 model
    # (an EMA copy, a copy to fine-tune) fell back to the base lr / wd for its SSM parameters.
    import copy
    from lrnnx_zoo import ModelConfig, SequenceModel
    from lrnnx_zoo.training import param_groups
    layer = S4(4, d_state=8, lr={"dt": 1e-3, "A": 2e-3}, wd={"B": 0.5})
    twin = copy.deepcopy(layer)
    original = _named_groups(layer, optimizer_param_groups(layer, base_lr=1e-2, base_wd=0.1))
    assert _named_groups(twin, optimizer_param_groups(twin, base_lr=1e-2, base_wd=0.1)) == original
    assert {g["lr"] for g in original} == {1e-2, 1e-3, 2e-3}

    model = SequenceModel(ModelConfig(layer="s4", d_input=1, d_output=2, d_model=4, n_layers=2,
                                      layer_kwargs={"d_state": 8, "lr": 5e-4, "wd": 0.0}))
    groups = _named_groups(model, param_groups(model, lr=3e-3, weight_decay=0.05, ssm_lr=1e-3))
    assert any(g["lr"] == 5e-4 for g in groups)
    twin = copy.deepcopy(model)
    assert _named_groups(twin, param_groups(twin, lr=3e-3, weight_decay=0.05, ssm_lr=1e-3)) == groups
    import io
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert _named_groups(loaded, param_groups(loaded, lr=3e-3, weight_decay=0.05, ssm_lr=1e-3)) == groups


def test_optim_records_refuse_unknown_keys_and_non_parameters():
    from lrnnx_zoo.optim import set_optim_record
    k = HippoSSKernel(4, N=8, trainable={"dt": True})
    with pytest.raises(ValueError, match=r"holds only \('lr', 'weight_decay'\), got the keys \['wd'\]"):
        set_optim_record(k, "log_dt", {"wd": 0.1})
    with pytest.raises(ValueError, match="has no parameter 'w' .*register it as a parameter first"):
        set_optim_record(k, "w", {"lr": 0.1})           # a buffer here: nothing to optimise


def test_one_grouping_implementation_behind_both_param_group_functions():
    from lrnnx_zoo import ModelConfig, SequenceModel
    from lrnnx_zoo.optim import grouped_parameters, set_optim_record
    from lrnnx_zoo.training import param_groups
    model = SequenceModel(ModelConfig(layer="s4", d_input=1, d_output=2, d_model=4, n_layers=1,
                                      layer_kwargs={"d_state": 8, "lr": 5e-4}))
    model.decoder.bias.requires_grad_(False)                     # frozen: in no group
    set_optim_record(model.decoder, "weight", {"weight_decay": 0.3})
    expected = _named_groups(model, grouped_parameters(model, lambda p: (1e-2, 0.1)))
    assert _named_groups(model, optimizer_param_groups(model, base_lr=1e-2, base_wd=0.1)) == expected
    names = [n for g in expected for n in g["params"]]
    assert "decoder.bias" not in names and len(names) == len(set(names))
    assert {g["lr"]: g["weight_decay"] for g in expected if "decoder.weight" in g["params"]} == {1e-2: 0.3}
    layer = {n for n, _ in model.blocks[0].layer.named_parameters(prefix="blocks.0.layer")}
    by_name = {n: (g["lr"], g["weight_decay"]) for g in _named_groups(model, param_groups(model, 3e-3, 0.05, 1e-3))
               for n in g["params"]}
    assert by_name["blocks.0.layer.kernel.w"] == (5e-4, 0.0) and by_name["blocks.0.layer.kernel.C"] == (1e-3, 0.0)
    assert by_name["decoder.weight"] == (3e-3, 0.3) and by_name["encoder.bias"] == (3e-3, 0.0)
    assert by_name["encoder.weight"] == (3e-3, 0.05) and layer <= set(by_name)

# -- seed-style S4 layer ---------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["gelu", "glu"])
def test_s4_channels_last_training_equals_transposed_and_gives_contiguous_outputs(activation, monkeypatch):
    # transposed=False trains through convolution.channels_last_conv's blocked path (a transposed
    # view made the output Linear copy with a row stride; whole-tensor copies to and from (B, H, L)
    # were 13% slower), transposed=True through channels_first_conv's. Same weights both ways,
    # float32: the two layouts round identically but for the Linear's sums and an ulp in the
    # activation.
    import lrnnx_zoo.convolution as convolution
    import lrnnx_zoo.plugins.s4.layer as s4_layer
    blocked = []
    monkeypatch.setattr(s4_layer, "blocked_training_applies",
                        lambda *args: blocked.append(convolution.blocked_training_applies(*args)) or blocked[-1])
    torch.manual_seed(0)
    kw = dict(d_state=8, channels=2, activation="gelu", postact=activation if activation == "glu" else None)
    layer, flat = S4(8, **kw), S4(8, transposed=False, **kw)
    flat.load_state_dict(layer.state_dict())
    u = torch.randn(2, 8, 40, requires_grad=True)
    ut = u.detach().transpose(1, 2).clone().requires_grad_(True)
    y, _ = layer(u)
    y_t, _ = flat(ut)
    assert y_t.is_contiguous() and y_t.shape == (2, 40, 8)
    torch.testing.assert_close(y_t.transpose(1, 2), y, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_t.backward(g.transpose(1, 2))
    torch.testing.assert_close(ut.grad.transpose(1, 2), u.grad, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(layer.named_parameters(), flat.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert blocked == [True, True]


def test_s4_seed_signature_transposed_channels_glu():
    torch.manual_seed(0)
    layer = S4(8, d_state=16, channels=3, postact="glu", dropout=0.1, tie_dropout=True).eval()
    assert layer.d_output == 8 and layer.d_state == 16 and layer.kernel.channels == 3
    assert isinstance(layer.output_linear[0], TransposedLinear) and layer.output_linear[0].weight.shape == (16, 24)
    u = torch.randn(2, 8, 100)
    y, state = layer(u)
    assert y.shape == (2, 8, 100) and state is None
    flat = S4(8, d_state=16, channels=3, postact="glu", transposed=False).eval()
    flat.load_state_dict(layer.state_dict())
    y_t, _ = flat(u.transpose(1, 2))
    torch.testing.assert_close(y_t.transpose(1, 2), y, rtol=1e-5, atol=1e-5)
    assert layer.state_to_tensor(layer.default_state(2)).shape == (2, 8 * 8)
    # streaming through the whole layer (activation, GLU, output linear) equals forward
    layer.setup_step("linear")
    s, ys = layer.default_state(2), []
    with torch.no_grad():
        for t in range(100):
            y_step, s = layer.step(u[..., t], s)
            ys.append(y_step)
    assert rel_err(torch.stack(ys, -1), y) < 1e-4


def test_s4_bidirectional_is_causal_plus_anticausal():
    torch.manual_seed(0)
    layer = S4(3, d_state=8, bidirectional=True, activation=None).eval()
    assert layer.bidirectional and layer.kernel.channels == 2
    u = torch.randn(1, 3, 40)
    with torch.no_grad():
        k = layer.kernel(L=40)[0]
        t = torch.arange(40)
        lag = t[:, None] - t[None, :]                                  # y_t from u_s: lag = t - s
        Kc = torch.where(lag >= 0, k[0][:, lag.clamp(min=0)], torch.zeros(()))   # causal K0_{t-s}
        Ka = torch.where(lag < 0, k[1][:, (-lag - 1).clamp(min=0)], torch.zeros(()))   # K1_{s-t-1}
        direct = torch.einsum("hts,bhs->bht", Kc + Ka, u) + layer.D[0][:, None] * u
        y_ssm = torch.einsum("oh,bhl->bol", layer.output_linear.weight, direct) + layer.output_linear.bias[:, None]
        assert rel_err(layer(u)[0], y_ssm) < 1e-5
    with pytest.raises(ValueError, match="bidirectional"):
        layer.setup_step()


@pytest.mark.parametrize("transposed", [True, False])
def test_s4_lengths_read_the_padding_as_zeros(transposed):
    # S4's **kwargs swallowed lengths: a bidirectional S4's reverse direction read the padding
    # (1e2 of it moved valid outputs by ~50). Tolerance as for the registered layers' padding test.
    torch.manual_seed(0)
    layer = S4(4, d_state=8, bidirectional=True, transposed=transposed).eval()
    x, lengths = torch.randn(2, 4, 30), torch.tensor([30, 12])
    x[1, :, 12:] = 1e2
    as_given = (lambda t: t) if transposed else (lambda t: t.transpose(1, 2))
    with torch.no_grad():
        y = as_given(layer(as_given(x), lengths=lengths)[0])
        alone = as_given(layer(as_given(x[1:, :, :12]))[0])
    torch.testing.assert_close(y[1, :, :12], alone[0], rtol=1e-5, atol=1e-5)
    for bad, error in ((torch.tensor([30.0, 12.0]), TypeError), (torch.tensor([31, 12]), ValueError)):
        with pytest.raises(error, match="lengths must"):
            layer(as_given(x), lengths=bad)


def test_s4_state_passing_refuses_another_rate_and_lengths():
    # forward_state runs at rate 1 while the state's kernel ran at dt / rate: chunks at rate 0.5
    # were 0.2 off one call, without a word (FFTConvS4 refused it already).
    torch.manual_seed(0)
    layer = S4(4, d_state=8).eval()
    u, state = torch.randn(2, 4, 20), layer.default_state(2)
    with pytest.raises(ValueError, match="state passing runs the system at rate 1.*got rate=0.5"):
        layer(u, rate=0.5, state=state)
    with pytest.raises(ValueError, match="state passing needs sequences of one length"):
        layer(u, state=state, lengths=torch.tensor([20, 10]))
    with pytest.raises(ValueError, match=r"S4 expects a state of shape \(batch=2, H, N/2\).*got \(3, 4, 4\)"):
        layer(u, state=layer.default_state(3))           # failed in a broadcast


@pytest.mark.parametrize("mode", ["dense", "linear", "diagonal"])
def test_s4_step_checks_its_input_and_state(mode):
    # These failed inside the step form: "shape '[1, 6, 8]' is invalid", "The size of tensor a (6)
    # must match ...", "expected scalar type Float but found Double".
    torch.manual_seed(0)
    layer = S4(6, d_state=4).eval()
    layer.setup_step(mode, tol=math.inf if mode == "diagonal" else None)
    state = layer.default_state(2)
    n = state.shape[-1]
    shapes = rf"expects u of shape \(batch, H=6\) and a state of shape \(batch, 6, {n}\)"
    for u, s in ((torch.randn(1, 6), state), (torch.randn(2, 5), state), (torch.randn(2, 6, 1), state),
                 (torch.randn(2, 6), state[..., :-1])):
        with pytest.raises(ValueError, match=shapes):
            layer.step(u, s)
    with pytest.raises(TypeError, match=r"step form holds torch.float32, got u of torch.float64"):
        layer.step(torch.randn(2, 6, dtype=torch.float64), state)
    with pytest.raises(TypeError, match=r"floating-point input .* got torch.int64"):
        layer.step(torch.ones(2, 6, dtype=torch.long), state)
    y, next_state = layer.step(torch.randn(2, 6), state)
    assert y.shape == (2, 6) and next_state.shape == state.shape


def test_s4_step_after_load_state_dict_asks_for_setup_step():
    # setup_step's form of the old weights outlived load_state_dict: S4 stepped on with them (0.04 off).
    torch.manual_seed(0)
    layer, other = S4(4, d_state=8).eval(), S4(4, d_state=8).eval()
    layer.setup_step()
    layer.load_state_dict(other.state_dict())
    u, state = torch.randn(2, 4), layer.default_state(2)
    with pytest.raises(RuntimeError, match=r"call setup_step\(mode\) before step\(\), and again after loading"):
        layer.step(u, state)
    layer.setup_step()
    other.setup_step()
    with torch.no_grad():
        torch.testing.assert_close(layer.step(u, state)[0], other.step(u, state)[0], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["dense", "linear", "diagonal"])
def test_s4_step_after_an_optimizer_step_asks_for_setup_step_again(mode):
    # setup_step's form stepped on with the old weights after training, silently.
    torch.manual_seed(0)
    layer = S4(4, d_state=8).eval()
    again = {"tol": math.inf} if mode == "diagonal" else {}      # LegS N=8: eigenbasis cond ~1e5
    layer.setup_step(mode, **again)
    u, state = torch.randn(2, 4), layer.default_state(2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(2, 4, 16))[0].square().sum().backward()
    opt.step()
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=rf"weights changed since setup_step\(\).*setup_step\('{mode}'\)"):
            layer.step(u, state)
        layer.setup_step(mode, **again)
        twin = copy.deepcopy(layer)
        twin.setup_step(mode, **again)
        torch.testing.assert_close(layer.step(u, state)[0], twin.step(u, state)[0], rtol=0, atol=0)


def test_activation_initializer_linear_helpers():
    assert isinstance(Activation(None), torch.nn.Identity) and isinstance(Activation("glu", dim=-2), torch.nn.GLU)
    with pytest.raises(ValueError, match="valid"):
        Activation("swoosh")
    w = torch.empty(4, 4)
    get_initializer("zero")(w)
    assert w.abs().sum() == 0
    with pytest.raises(ValueError, match="uniform"):
        get_initializer("orthogonal")
    lin = LinearActivation(4, 3, transposed=True, activation="glu", activate=True)
    assert lin(torch.randn(2, 4, 7)).shape == (2, 3, 7)


# -- registered layer ------------------------------------------------------------------------------

def test_registered_layer_bidirectional_lengths():
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("s4", 4, d_state=8, bidirectional=True).eval()
    assert layer.bidirectional
    x, lengths = torch.randn(2, 30, 4), torch.tensor([30, 12])
    with torch.no_grad():
        y = layer(x, lengths=lengths)
        alone = layer(x[1:, :12])
    torch.testing.assert_close(y[1, :12], alone[0], rtol=1e-5, atol=1e-5)
    assert torch.all(y[1, 12:] == 0)
    with pytest.raises(ValueError, match="cannot stream"):
        layer.step_form()


# -- backends ---------------------------------------------------------------------------------------

def test_shared_cauchy_matches_generic_with_gradients():
    torch.manual_seed(0)
    v = torch.randn(2, 3, 4, dtype=torch.complex128, requires_grad=True)     # 3 numerators share each pole row
    w = torch.complex(-torch.rand(2, 1, 4) - 0.1, torch.randn(2, 1, 4)).to(torch.complex128).requires_grad_()
    z = torch.complex(torch.zeros(5), torch.tan(torch.linspace(0, 1.4, 5))).to(torch.complex128)
    torch.testing.assert_close(cauchy_shared.cauchy_conj_shared(v, z, w, chunk_size=2), cauchy_conj_torch(v, z, w),
                               rtol=1e-12, atol=1e-12)
    # the hand-written block backward (rebuilding q block by block), and its double backward
    f = (lambda v, w: cauchy_shared.cauchy_conj_shared(v, z, w, chunk_size=2))
    assert torch.autograd.gradcheck(f, (v, w))
    assert torch.autograd.gradgradcheck(f, (v, w))


@pytest.mark.parametrize("dtype, tol", [(torch.complex64, 2e-6), (torch.complex128, 1e-14)])
def test_shared_cauchy_block_real_matmul_equals_the_complex_one(dtype, tol):
    """The block contracts its real numerators with q's (re, im) pairs in one real matmul; the same
    sums as the complex matmul of complex-typed numerators (tolerance: a few ulps of the sums,
    which may be added in another order; on this CPU float32 gave the same bits)."""
    torch.manual_seed(0)
    P, J, N, l = 16, 4, 32, 257
    rdt = torch.empty(0, dtype=dtype).real.dtype
    ab = torch.randn(P, 2 * J, N, dtype=rdt)
    w = torch.complex(-torch.rand(P, N, 1, dtype=rdt) - 0.01, 3 * torch.randn(P, N, 1, dtype=rdt))
    c, d = (2 * w.real).to(dtype), w.abs().square().to(dtype)
    z = torch.complex(torch.zeros(l, dtype=rdt), torch.tan(torch.linspace(0, 1.5, l, dtype=rdt)))
    s = ab.to(dtype) @ cauchy_shared._pole_factor(c, d, z)
    want = z * s[:, :J] - s[:, J:]
    got = cauchy_shared._block(ab, c, d, z)
    assert got.dtype == dtype and got.shape == (P, J, l)
    assert float((got - want).abs().max() / want.abs().max()) < tol


def test_disable_keops_env(monkeypatch):
    monkeypatch.setenv(keops_support.DISABLE_ENV_VAR, "1")
    monkeypatch.setitem(cauchy_shared.KEOPS_MIN_TERMS, "cpu", 0)          # auto would pick keops at any size

    def boom(*args):
        raise AssertionError("auto used keops although it is disabled")
    monkeypatch.setattr(cauchy_shared, "cauchy_conj_keops", boom)
    k = make_kernel(N=8, backend="auto")
    k_torch = make_kernel(N=8, backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(k(L=64)[0], k_torch(L=64)[0])
    k_keops = make_kernel(N=8, backend="keops")
    with pytest.raises(RuntimeError, match=keops_support.DISABLE_ENV_VAR):
        k_keops(L=64)
    assert {"cauchy.torch", "cauchy.keops", "cauchy.auto", "ssm_kernel.s4"} <= set(lrnnx_zoo.list_backends())
    assert s4_plugin.S4Layer is lrnnx_zoo.registry.get_layer_class("s4")


def test_clear_errors():
    with pytest.raises(ValueError, match="legt.*rank >= 2"):
        HippoSSKernel(2, N=8, measure="legt", rank=1)      # (the default rank is legt's 2)
    with pytest.raises(ValueError, match="even number"):
        HippoSSKernel(2, N=7)
    with pytest.raises(ValueError, match="S4D"):
        HippoSSKernel(2, N=8, mode="diag")
    with pytest.raises(lrnnx_zoo.RegistryError, match="available"):
        HippoSSKernel(2, N=8, backend="cuda")
    k = make_kernel(H=2, N=8)
    with pytest.raises(ValueError, match=r"\(batch, H=2, N/2=4\)"):
        k(L=10, state=torch.zeros(1, 2, 8, dtype=torch.complex64))
    with pytest.raises(ValueError, match="no internal length"):
        k()
    with pytest.raises(RuntimeError, match="setup_step"):
        k.step(torch.zeros(1, 2), k.default_state(1))
    with pytest.raises(ValueError, match=r"\(batch, d_model=2, length\)"):
        S4(2, d_state=8)(torch.zeros(1, 5, 3))
    for rate in (0.0, -1.0, math.nan, math.inf):     # nan failed in round() ("cannot convert float NaN")
        with pytest.raises(ValueError, match=rf"S4 needs rate.*finite number > 0, got {rate}"):
            S4(2, d_state=8, l_max=16)(torch.zeros(1, 2, 5), rate=rate)
        with pytest.raises(ValueError, match=rf"SSKernelNPLR needs rate.*got {rate}"):
            k(L=10, rate=rate)                          # inf gave a NaN kernel


def test_kernel_gradients_in_float32_match_float64():
    # The Cauchy backward sums over thousands of nodes terms whose halves nearly cancel near the
    # poles; float32 must keep every parameter's gradient to 1e-4 of its largest entry (reached
    # here: <= 4.4e-6; at H=128, L=4096: 5.5e-5 for log_dt, the worst).
    import copy
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("s4", 8, d_state=64)
    proj = torch.randn(1, 8, 2048, dtype=torch.float64)

    def grads(dtype):
        m = copy.deepcopy(layer).to(dtype)
        (m.kernel(2048)[0] * proj.to(dtype)).sum().backward()
        return {n: p.grad.double() for n, p in m.named_parameters() if p.grad is not None}
    g32, g64 = grads(torch.float32), grads(torch.float64)
    assert set(g64) >= {"kernel.w", "kernel.P", "kernel.B", "kernel.C", "kernel.log_dt"}
    for name, ref in g64.items():
        err = float((g32[name] - ref).abs().max() / ref.abs().max())
        assert err < 1e-4, f"{name}: float32 gradient off by {err:.1e} of its scale"


@pytest.mark.parametrize("transposed", [True, False])
def test_glu_after_the_ssm_halves_channels_not_time(transposed):
    # activation="glu" used to halve the sequence (GLU on the time axis of (B, C*H, L))
    torch.manual_seed(0)
    m = S4(8, d_state=8, channels=2, activation="glu", transposed=transposed).eval()
    x = torch.randn(2, 8, 32) if transposed else torch.randn(2, 32, 8)
    with torch.no_grad():
        y, _ = m(x)
    assert y.shape == x.shape
    m.setup_step("linear")
    state = m.default_state(2)
    u = x if transposed else x.transpose(1, 2)
    with torch.no_grad():
        ys = []
        for t in range(32):
            y_t, state = m.step(u[..., t], state)
            ys.append(y_t)
    y_step = torch.stack(ys, -1)
    torch.testing.assert_close(y_step, y if transposed else y.transpose(1, 2), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="must be even"):
        S4(3, d_state=8, channels=1, activation="glu")


def test_s4_block_edge_inputs_and_float64_step():
    m = S4(3, d_state=8, transposed=True).eval()
    with torch.no_grad():                               # inference path: explicit reshapes
        assert m(torch.randn(2, 3, 0))[0].shape == (2, 3, 0)
        assert m(torch.randn(0, 3, 10))[0].shape == (0, 3, 10)
    assert m(torch.randn(2, 3, 0, requires_grad=True))[0].shape == (2, 3, 0)
    with pytest.raises(TypeError, match="float32 parameters and got a torch.float64 input"):
        m(torch.randn(2, 3, 10, dtype=torch.float64))
    # a float64 block steps in float64 (its step form built in float64): step == forward to ~1e-13
    m = m.double()
    x = torch.randn(2, 3, 200, dtype=torch.float64)
    with torch.no_grad():
        y, _ = m(x)
        for mode in ("dense", "linear"):
            m.setup_step(mode)
            s = m.default_state(2)
            assert s.dtype == torch.complex128
            ys = []
            for t in range(x.shape[-1]):
                y_t, s = m.step(x[..., t], s)
                ys.append(y_t)
            err = (torch.stack(ys, -1) - y).abs().max() / y.abs().max()
            assert err < 1e-10, (mode, float(err))


def test_auto_step_mode_records_the_form_it_chose():
    # "auto" picked the diagonal form at tiny N but kept the dense state layout: step() crashed.
    torch.manual_seed(0)
    m = S4(4, d_state=2, transposed=True).eval()
    x = torch.randn(2, 4, 50)
    with torch.no_grad():
        y, _ = m(x)
        m.setup_step("auto")
        s = m.default_state(2)
        ys = []
        for t in range(x.shape[-1]):
            y_t, s = m.step(x[..., t], s)
            ys.append(y_t)
    assert float((torch.stack(ys, -1) - y).abs().max() / y.abs().max()) < 1e-5


def test_state_passing_longer_than_l_max_is_refused_and_glu_initializer_works():
    m = S4(4, d_state=8, l_max=64, transposed=True)
    with pytest.raises(ValueError, match="l_max=64 < L=100"):
        m(torch.randn(2, 4, 100), state=m.default_state(2))
    S4(4, d_state=8, postact="glu", initializer="xavier")      # "glu" had no known gain


@pytest.mark.parametrize("N,L", [(4, 64), (64, 64), (16, 1024)])
def test_ill_conditioned_kernels_are_refined_in_float64(N, L, monkeypatch):
    # Poles on the imaginary axis (Fourier measure) make the float32 Woodbury step cancel by ~3e4
    # at the few nodes next to each pole: the kernel was 2.1e-4 (N=4, L=64) / 1.1e-4 / 4.5e-6 from
    # float64; those (channel, node) entries are now recomputed in float64 (kernel and state
    # response within 1e-5, gradients within 1e-4 here: reached <= 2.2e-5).
    from lrnnx_zoo.plugins.s4 import generating
    k = make_kernel(H=4, N=N, L=L, measure="fourier")
    k64 = copy.deepcopy(k).double()
    state = torch.randn(2, 4, N // 2, dtype=torch.complex64)
    K, Ks = k(L=L, state=state)
    K64, Ks64 = k64(L=L, state=state.to(torch.complex128))
    assert K.dtype == torch.float32 and Ks.dtype == torch.float32
    assert rel_err(K, K64) < 1e-5 and rel_err(Ks, Ks64) < 1e-5, (rel_err(K, K64), rel_err(Ks, Ks64))
    proj = torch.randn(1, 4, L, dtype=torch.float64)
    (K * proj.float()).sum().backward()
    (K64 * proj).sum().backward()
    for (name, p), p64 in zip(k.named_parameters(), k64.parameters()):
        if p.grad is not None:
            assert rel_err(p.grad, p64.grad) < 1e-4, name
    # the refinement is what does it (refine_ill_conditioned = False turns it off), and a
    # well-conditioned (LegS) kernel never takes it
    unrefined = make_kernel(H=4, N=N, L=L, measure="fourier")
    unrefined.refine_ill_conditioned = False
    assert rel_err(unrefined(L=L)[0], K64) > (10 if L == 64 else 2) * rel_err(K, K64)
    calls = []
    real_kernel = generating.bilinear_kernel
    monkeypatch.setattr(generating, "bilinear_kernel", lambda *a, **kw: calls.append(a[0].dtype) or real_kernel(*a, **kw))
    make_kernel(H=4, N=N, L=L, measure="legs")(L=L)
    assert torch.complex128 not in calls


def test_internal_length_follows_the_buffer_everywhere():
    # The S4 kernel reads its length through a Python copy where reading the buffer would stall
    # or break tracing; these are the paths that could leave the two apart.
    import pickle
    from torch.func import functional_call
    a, b = make_kernel(H=4, N=8, L=64), make_kernel(seed=1, H=4, N=8, L=32)
    with torch.no_grad():   # functional_call swaps in b's buffers, L included: b's kernel, exactly
        torch.testing.assert_close(functional_call(a, dict(b.state_dict()), (), {"L": 32})[0], b(L=32)[0],
                                   rtol=0, atol=0)
    old = pickle.loads(pickle.dumps(a))
    del old.__dict__["_length"]                     # a whole-module pickle from before the Python copy
    assert pickle.loads(pickle.dumps(old)).to("meta")._length == 64
    meta = make_kernel(H=4, N=8, L=64).to("meta")
    meta.load_state_dict(a.to("meta").state_dict())  # a load without values leaves the length alone
    assert meta._length == 64


def test_functional_call_past_the_length_leaves_the_kernel_as_it_was():
    # functional_call with the parameters only, on a sequence longer than C~ covers: eager extended C~
    # in the caller's tensor and wrote the new length into the kernel's own buffer, so the kernel's
    # own C then went with another length (0.44 off at l_max=8, L=20, found by the session-18 audit).
    # A call on substituted tensors now takes C~ for a covering length without storing it.
    from torch.func import functional_call
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("s4", 8, d_state=4, l_max=8).double().eval()
    fresh = copy.deepcopy(layer)
    x = torch.randn(1, 20, 8, dtype=torch.float64)
    params = {k: p.detach().clone() for k, p in layer.named_parameters()}
    C = params["kernel.C"].clone()
    with torch.no_grad():
        got = functional_call(layer, params, (x,))
        assert layer.kernel.length == 8 and torch.equal(params["kernel.C"], C)
        want = fresh(x)                        # inference computes C~ for 32 on the call, storing nothing
        assert fresh.kernel.length == 8
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * want.abs().max().item())
        torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-12 * want.abs().max().item())


def test_step_after_a_dtype_change_says_to_set_up_again():
    m = S4(8, d_state=8)
    m.setup_step("dense")
    m.double()
    with pytest.raises(RuntimeError, match=r"built in torch.float32 .* call setup_step\('dense'\) again"):
        m.step(torch.randn(2, 8, dtype=torch.float64), m.default_state(2))
    m.setup_step("dense")
    m.step(torch.randn(2, 8, dtype=torch.float64), m.default_state(2))


def test_layer_gradients_in_float32_match_float64_at_L4096():
    # Through the whole layer at L=4096, log_dt's float32 gradient was 5.4e-4 of its scale (H=32):
    # a few low-frequency nodes' Woodbury step cancels. Refining those nodes in float64: 5.1e-5.
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("s4", 32, d_state=64)
    x = torch.randn(2, 4096, 32, dtype=torch.float64)
    w = torch.randn(2, 4096, 32, dtype=torch.float64)
    l64 = copy.deepcopy(layer).double()
    (l64(x) * w).sum().backward()

    def worst_grad_error(refine: bool) -> float:
        m = copy.deepcopy(layer)
        m.kernel.refine_ill_conditioned = refine
        (m(x.float()) * w.float()).sum().backward()
        return max(rel_err(p.grad, q.grad) for p, q in zip(m.parameters(), l64.parameters()) if q.grad is not None)
    refined, unrefined = worst_grad_error(True), worst_grad_error(False)
    assert refined < 1e-4 and unrefined > 2 * refined, (refined, unrefined)


@pytest.mark.parametrize("name", ["digits-s4", "digits-fftconv"])
def test_running_a_checkpoint_on_longer_sequences_keeps_its_metrics(name, tmp_path):
    # A sequence longer than the kernel's internal length doubles it in place (C~ and L change, the
    # system does not): the weights digest changed, so save_pretrained and export dropped the
    # checkpoint's metrics, command and notes as if the model had been fine-tuned.
    from lrnnx_zoo.export.provenance import load_source

    model = lrnnx_zoo.from_pretrained(name)
    metrics = model.checkpoint_info["metrics"]
    kernel = next(m for m in model.modules() if isinstance(m, SSKernelNPLR))
    length = kernel.length
    with torch.no_grad():
        model(torch.randn(1, 9 * length, model.config.d_input))     # inference stores no length
    assert kernel.length == length
    model(torch.randn(1, 9 * length, model.config.d_input))         # under autograd: three doublings
    assert kernel.length == 16 * length
    config = lrnnx_zoo.from_pretrained(model.save_pretrained(tmp_path / "longer")).checkpoint_info
    assert config["metrics"] == metrics and "changed" not in (config["notes"] or "")
    assert load_source(model)[1]["metrics"] == metrics

    with torch.no_grad():
        kernel.C.mul_(1.01)                                             # then a change of C: seen
    assert lrnnx_zoo.from_pretrained(model.save_pretrained(tmp_path / "tuned")).checkpoint_info["metrics"] is None
    assert "weights_changed" in load_source(model)[1]


@pytest.mark.parametrize("discretization", ["bilinear", "zoh"])
def test_a_long_first_forward_extends_the_length_in_one_transform(discretization):
    # forward(L) far beyond the internal length doubled it one discretisation at a time (64 -> 4096:
    # six float64 discretisations and powers per layer); now one transform, equal to the doublings
    torch.manual_seed(0)
    k = HippoSSKernel(4, N=8, L=16, discretization=discretization).double()
    stepwise = copy.deepcopy(k)
    K = k(L=200)[0]                                     # 16 -> 256 in one go
    for _ in range(4):
        stepwise.double_length()
    assert k.length == stepwise.length == 256
    assert torch.allclose(k.C, stepwise.C, rtol=1e-10, atol=1e-12)
    assert torch.allclose(K, stepwise(L=200)[0], rtol=1e-10, atol=1e-12)


def test_a_graph_built_before_the_internal_length_grew_refuses_its_backward():
    # m(x8) + m(x40): the second forward rewrote C~ in place for a longer internal length, and the
    # first graph's gradients (for the old parameterisation) were applied to the new one silently:
    # C's gradient 72% off, log_dt's 25%. Now the backward says so; the usual orders still train.
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("s4", 4, d_state=8, l_max=8).double()
    x8, x40 = torch.randn(2, 8, 4, dtype=torch.float64), torch.randn(2, 40, 4, dtype=torch.float64)
    loss = layer(x8).sum() + layer(x40).sum()
    with pytest.raises(RuntimeError, match=r"C~ was rewritten between this forward and its backward.*Run the "
                                           r"longest sequence first"):
        loss.backward()
    layer.zero_grad()
    (layer(x40).sum() + layer(x8).sum()).backward()          # longest first: one parameterisation
    layer(x8).sum().backward()                               # a graph per step: nothing pending to go stale
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


@pytest.mark.parametrize("trained", ["log_dt", "w", "P", "B"])
def test_with_C_frozen_a_graph_built_before_the_length_grew_refuses_its_backward(trained):
    # The guard hung on C alone: with C frozen and the dynamics trained, m(x8) + m(x40) gave w's
    # gradient 24-77% off, P's 12%, log_dt's 2-11%, silently. It rides on the first trained tensor.
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("s4", 4, d_state=8, l_max=8).double()
    for name, p in layer.kernel.named_parameters():
        p.requires_grad_(name == trained)
    x8, x40 = torch.randn(2, 8, 4, dtype=torch.float64), torch.randn(2, 40, 4, dtype=torch.float64)
    loss = layer(x8).sum() + layer(x40).sum()
    with pytest.raises(RuntimeError, match=r"C~ was rewritten between this forward and its backward"):
        loss.backward()
    layer.zero_grad()
    (layer(x40).sum() + layer(x8).sum()).backward()          # longest first: one parameterisation
    assert torch.isfinite(getattr(layer.kernel, trained).grad).all()


@pytest.mark.parametrize("transposed", [True, False])
def test_bidirectional_padded_batch_against_sums_by_hand_on_every_path(transposed, monkeypatch):
    # S4 (seed-style, C=2, a window at rate 0.5: round(9 * 0.5) = 4 taps) and the registered layer on
    # a padded batch (lengths L, 0, 1, 6; odd L = 13): the float64 sums by hand of the input zeroed
    # past the lengths, y_t = sum_j K0_j u_{t-j} + sum_j K1_j u_{t+1+j} + D u_t, on the inference,
    # blocked training and whole-tensor paths, to 1e-10 relative (float64 transforms' rounding;
    # a wrong lag or a missed mask errs at O(1)). The registered layer's padded outputs are 0.
    import lrnnx_zoo.convolution as convolution_module
    import lrnnx_zoo.plugins.s4.layer as s4_layer_module
    C, L, rate = 2, 13, 0.5
    lengths = torch.tensor([L, 0, 1, 6])
    valid = torch.arange(L) < lengths[:, None]                                          # (B, L)
    u = torch.randn(4, 4, L, dtype=torch.float64)
    v = u * valid[:, None]

    def by_hand(K: torch.Tensor, D: torch.Tensor) -> torch.Tensor:     # K: (2C', H, Lk), D: (C', H)
        Cn, y = D.shape[0], D[..., None] * v[:, None]                  # (B, C', H, L)
        for j in range(K.shape[-1]):
            y[..., j:] += K[:Cn, :, j, None] * v[:, None, :, :L - j]
            y[..., :L - 1 - j] += K[Cn:, :, j, None] * v[:, None, :, j + 1:]
        return y

    torch.manual_seed(0)
    seed = S4(4, d_state=4, channels=C, l_max=9, bidirectional=True, activation=None,
              transposed=transposed).double()
    layer = lrnnx_zoo.create_layer("s4", 4, d_state=4, bidirectional=True).double()
    as_given = (lambda t: t) if transposed else (lambda t: t.transpose(1, 2))
    with torch.no_grad():
        conv = by_hand(seed.kernel(L=4, rate=rate)[0], seed.D).reshape(4, C * 4, L)
        want_seed = seed.output_linear(as_given(conv))
        want_layer = by_hand(layer.kernel(L=L)[0], layer.D[None])[:, 0].transpose(1, 2) * valid[..., None]
    runs = {}
    for path in ("inference", "blocked", "whole"):
        if path == "whole":
            for module in (convolution_module, s4_layer_module):
                monkeypatch.setattr(module, "blocked_training_applies", lambda *args: False)
        with torch.set_grad_enabled(path != "inference"):
            x = as_given(u).clone().requires_grad_(path != "inference")
            runs[path] = (seed(x, rate=rate, lengths=lengths)[0].detach(),
                          layer(u.transpose(1, 2).clone().requires_grad_(path != "inference"), lengths=lengths).detach())
    for path, (y_seed, y_layer) in runs.items():
        assert rel_err(y_seed, want_seed) < 1e-10, path
        assert rel_err(y_layer, want_layer) < 1e-10 and torch.all(y_layer[~valid] == 0), path


@pytest.mark.parametrize("layer", ["s4", "fftconv"])
def test_a_long_inference_call_leaves_the_stored_length(layer):
    # One evaluation or serving request longer than the training length doubled S4's stored length in
    # place, and every later call ran Algorithm 1 at that length: the shipped digits-s4 after one
    # 16384-step evaluation took 427 ms (21 before) for a 64-step evaluation and 1459 ms (51) for a
    # training step (found by a soak audit). Inference now computes C~ for the long input on the call.
    torch.manual_seed(0)
    kw = {"kernel_type": "s4"} if layer == "fftconv" else {}
    model = lrnnx_zoo.create_layer(layer, 8, d_state=8, **kw).eval()
    kernel = next(m for m in model.modules() if isinstance(m, SSKernelNPLR))
    x = torch.randn(2, 64, 8)
    model(x)                                                        # training sets the length
    assert kernel.length == 64
    with torch.no_grad():
        short = model(x)
        C = kernel.C.clone()
        long_x = torch.randn(2, 1000, 8)
        y_long = model(long_x)
        assert kernel.length == 64 and torch.equal(kernel.C, C)     # nothing stored
        assert torch.equal(model(x), short)                         # the short call as before, bit for bit
    extended = copy.deepcopy(model)
    extended(long_x)                                                # under autograd: extends (64 -> 1024)
    assert next(m for m in extended.modules() if isinstance(m, SSKernelNPLR)).length == 1024
    with torch.no_grad():
        torch.testing.assert_close(extended(long_x), y_long, rtol=0, atol=1e-5 * y_long.abs().max().item())


def test_state_passing_after_a_diagonal_setup_says_what_default_state_became():
    # After setup_step("diagonal") default_state gives the step's eigen-coordinates, which state
    # passing refuses; the refusal told the user to use default_state, the call that made it (a
    # fuzzing audit). It now says what changed and what to pass.
    from lrnnx_zoo.plugins.s4 import S4
    layer = S4(4, d_state=8, transposed=False).double().eval()
    u = torch.randn(2, 10, 4, dtype=torch.float64)
    layer.setup_step("diagonal")
    with pytest.raises(ValueError, match=r"got \(2, 4, 8\); default_state\(\) gives the diagonal step's .* "
                                         r"pass torch.zeros\(batch, 4, 4, dtype=torch.complex128\)"):
        layer(u, state=layer.default_state(2))
    layer(u, state=torch.zeros(2, 4, 4, dtype=torch.complex128))


def test_auto_step_form_of_a_very_large_zoh_step_is_exact_and_does_not_crash():
    # zoh at dt ~ 100-300 makes A_bar's entries tiny (1e-149 .. 1e-138). The diagonal form's predicted
    # error was NaN (poles that round to 0 have no log) and NaN > tol passed it: a float64 Fourier S4
    # streamed 7.7e10 off its forward; and LAPACK's eig of such a matrix failed to converge or
    # corrupted the heap, aborting the process (a fuzzing audit). "auto" now takes the dense form
    # (exact); the eig runs on a power-of-two rescaled copy. Tolerance: float64 step vs forward, 1e-12.
    import subprocess
    import sys
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("s4", 2, d_state=8, measure="fourier", discretization="zoh").double().eval()
    with torch.no_grad():
        layer.kernel.log_dt.fill_(math.log(128.8))
        x = torch.randn(1, 40, 2, dtype=torch.float64)
        want = layer(x)
        cache = layer.allocate_inference_cache(1)
        got = torch.stack([layer.step(x[:, t], cache)[0] for t in range(40)], 1)
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()
    code = ("import math, torch, lrnnx_zoo\n"
            "torch.manual_seed(0)\n"
            "l = lrnnx_zoo.create_layer('s4', 2, d_state=8, measure='legs', discretization='zoh').double().eval()\n"
            "with torch.no_grad(): l.kernel.log_dt.fill_(math.log(318.9))\n"
            "for _ in range(5): l.allocate_inference_cache(1)\n"
            "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr[-500:])


def test_a_rank_beyond_d_state_is_refused_before_anything_is_allocated():
    # P (rank, H, N/2) gains nothing past rank N/2; a config.json's rank=5e6 beside a 5 kB weights file
    # allocated 2.2 GB before its shapes were compared (an audit)
    with pytest.raises(ValueError, match=r"needs rank <= max\(d_state, 8\) = 8 .*got rank=5000000"):
        lrnnx_zoo.create_layer("s4", 8, d_state=4, rank=5_000_000)
    assert lrnnx_zoo.create_layer("s4", 8, d_state=2, measure="legt").kernel.rank == 2    # LegT's rank 2 at N=2
    assert lrnnx_zoo.create_layer("s4", 8, d_state=2, rank=3).kernel.rank == 3
