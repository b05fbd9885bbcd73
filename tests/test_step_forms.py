"""Core step forms against the complex recurrence they encode (float64 reference; the forms are
float32, so 1e-5 relative: a handful of float32 roundings per step over 50 steps)."""

from __future__ import annotations

import pytest
import torch

from memory_probe import LargestTensor

from lrnnx_zoo.step_forms import (ChannelDenseStepForm, ChannelDiagonalStepForm, ChannelDPLRStepForm,
                                  DiagonalStepForm, step_form_dtype)

C128 = torch.complex128


def rand_c(*shape):
    return torch.randn(*shape, dtype=C128)


def run(form, u, dtype=torch.float32):
    """Step ``form`` through u: (batch, L, d_input) from a zero state in ``dtype``; y as float64."""
    s = torch.zeros(u.shape[0], form.state_size, dtype=dtype)
    ys = []
    with torch.no_grad():
        for t in range(u.shape[1]):
            y, s = form(u[:, t].to(dtype), s)
            ys.append(y)
    return torch.stack(ys, 1).double()


def close(a, b, rel=1e-5):
    assert float((a - b).abs().max() / b.abs().max()) < rel


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("D_kind", ["diag", "full", None])
def test_diagonal_form_fused_and_elementwise(fuse, D_kind):
    torch.manual_seed(0)
    M, H = 6, 4
    lam = 0.95 * torch.exp(1j * torch.rand(M, dtype=torch.float64) * 3)
    B, C = rand_c(M, H), rand_c(H, M)
    D = {"diag": torch.randn(H, dtype=torch.float64), "full": torch.randn(H, H, dtype=torch.float64), None: None}[D_kind]
    form = DiagonalStepForm(lam, B, C, D, fuse=fuse)
    assert form.fused is fuse and form.state_size == 2 * M
    u = torch.randn(3, 50, H, dtype=torch.float64)
    x = torch.zeros(3, M, dtype=C128)
    ref = []
    for t in range(50):
        x = lam * x + u[:, t].to(C128) @ B.T
        y = (x @ C.T).real
        if D is not None:
            y = y + (u[:, t] * D if D.dim() == 1 else u[:, t] @ D.T)
        ref.append(y)
    close(run(form, u), torch.stack(ref, 1))


def test_fusing_is_the_default_only_for_small_states():
    assert DiagonalStepForm(torch.ones(8, dtype=C128), rand_c(8, 4), rand_c(4, 8)).fused
    assert not DiagonalStepForm(torch.ones(1024, dtype=C128), rand_c(1024, 16), rand_c(16, 1024)).fused


def test_channel_forms_match_per_channel_recurrences():
    torch.manual_seed(1)
    H, N, Ch = 3, 4, 2
    lam = 0.9 * torch.exp(1j * torch.rand(H, N, dtype=torch.float64))
    B, C, D = rand_c(H, N), rand_c(Ch, H, N), torch.randn(Ch, H, dtype=torch.float64)
    u = torch.randn(2, 40, H, dtype=torch.float64)
    x = torch.zeros(2, H, N, dtype=C128)
    ref = []
    for t in range(40):
        x = lam * x + B * u[:, t, :, None]
        ref.append(((C.unsqueeze(0) * x.unsqueeze(1)).sum(-1).real + D * u[:, t].unsqueeze(1)).reshape(2, -1))
    ref = torch.stack(ref, 1)
    close(run(ChannelDiagonalStepForm(lam, B, C, D), u), ref)
    A = torch.diag_embed(lam)                               # the same systems as dense matrices
    close(run(ChannelDenseStepForm(A, B, C, D), u), ref)


def test_channel_diagonal_pack_is_the_state_layout():
    # pack/unpack are what FFTConv's and S4's state passing rely on: a packed complex state x,
    # stepped once, must unpack to lam x + B u, and pack/unpack must be inverse.
    torch.manual_seed(3)
    H, N, Bsz = 3, 5, 2
    lam, B, C = 0.9 * torch.exp(1j * torch.rand(H, N, dtype=torch.float64)), rand_c(H, N), rand_c(1, H, N)
    with step_form_dtype(torch.float64):
        form = ChannelDiagonalStepForm(lam, B, C)
    x, u = rand_c(Bsz, H, N), torch.randn(Bsz, H, dtype=torch.float64)
    s = ChannelDiagonalStepForm.pack(x)
    assert s.shape == (Bsz, form.state_size)
    assert torch.equal(ChannelDiagonalStepForm.unpack(s, H), x)
    y, s_next = form(u, s)
    x_next = lam * x + B * u[..., None]
    torch.testing.assert_close(ChannelDiagonalStepForm.unpack(s_next, H), x_next, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, (C[0] * x_next).sum(-1).real, rtol=1e-12, atol=1e-12)
    real = torch.randn(Bsz, H, N, dtype=torch.float64)             # a real system's state: Im = 0
    assert torch.equal(ChannelDiagonalStepForm.unpack(ChannelDiagonalStepForm.pack(real), H).real, real)


def test_channel_diagonal_form_takes_a_real_system():
    # Real lam, B, C (an exponential moving average) raised "imag is not implemented for tensors
    # with non-complex dtypes"; DiagonalStepForm and ChannelDenseStepForm already took them.
    H, a = 3, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)
    form = ChannelDiagonalStepForm(a[:, None], (1 - a)[:, None], torch.ones(1, H, 1, dtype=torch.float64))
    assert form.state_size == 2 * H and not any(t.is_complex() for t in form.buffers())
    u = torch.randn(2, 30, H, dtype=torch.float64)
    x, ref = torch.zeros(2, H, dtype=torch.float64), []
    for t in range(30):
        x = a * x + (1 - a) * u[:, t]
        ref.append(x)
    close(run(form, u), torch.stack(ref, 1))


def test_dplr_form_matches_its_complex_recurrence():
    from lrnnx_zoo.step_forms import ChannelDPLRStepForm
    torch.manual_seed(2)
    H, M, r, Ch = 2, 5, 2, 1
    d0, d1, b = 0.5 * rand_c(H, M), 0.5 * rand_c(H, M), rand_c(H, M)
    U0, G0, U1, G1 = (0.2 * rand_c(H, r, M) for _ in range(4))
    C, D = rand_c(Ch, H, M), torch.randn(Ch, H, dtype=torch.float64)
    u = torch.randn(3, 30, H, dtype=torch.float64)

    def low_rank(z, G, U):  # sum_r U_r Re(G_r . z)
        rho = (G * z.unsqueeze(-2)).sum(-1).real                            # (batch, H, r)
        return (rho.unsqueeze(-1) * U).sum(-2)

    z = torch.zeros(3, H, M, dtype=C128)
    ref = []
    for t in range(30):
        v = d0 * z - low_rank(z, G0, U0) + b * u[:, t, :, None]
        z = d1 * v - low_rank(v, G1, U1)
        ref.append(((C.unsqueeze(0) * z.unsqueeze(1)).sum(-1).real + D * u[:, t].unsqueeze(1)).reshape(3, -1))
    close(run(ChannelDPLRStepForm(d0, U0, G0, b, d1, U1, G1, C, D), u), torch.stack(ref, 1))


def test_channel_dense_form_keeps_a_slow_system_accurate():
    # zoh LegS (N=8) at dt = 1e-5 .. 1e-4: A_bar is I + O(1e-4). Rounding A_bar itself to float32
    # perturbs A_bar - I by up to 6e-8 / 1e-5 relative, an error that grows ~L: 9e-6 - 2.9e-5 of
    # max|y| after 4096 steps (3 seeds). The form keeps A_bar - I (exact to float32 rounding), and
    # its rounding errors grow ~sqrt(L): 1.1e-6 - 1.6e-6. 4e-6 lies between the two.
    from lrnnx_zoo import hippo
    from lrnnx_zoo.discretization import zoh_dense
    g = torch.Generator().manual_seed(0)
    A, B = hippo.transition("legs", 8)
    dt = torch.tensor([1e-5, 3e-5, 1e-4], dtype=torch.float64)
    A_bar, B_bar = zoh_dense(A.expand(3, 8, 8), B.expand(3, 8), dt)
    C = torch.randn(1, 3, 8, dtype=torch.float64, generator=g)
    u = torch.randn(2, 4096, 3, dtype=torch.float64, generator=g)
    x, ref = torch.zeros(2, 3, 8, dtype=torch.float64), []
    for t in range(u.shape[1]):
        x = (A_bar @ x.unsqueeze(-1)).squeeze(-1) + B_bar * u[:, t, :, None]
        ref.append((x * C).sum(-1))
    with step_form_dtype(torch.float32):
        form = ChannelDenseStepForm(A_bar, B_bar, C)
    close(run(form, u), torch.stack(ref, 1), rel=4e-6)




@pytest.mark.parametrize("name, form_type", [("digits-s4d", ChannelDiagonalStepForm), ("digits-s4", ChannelDPLRStepForm)])
def test_trained_slow_modes_keep_their_poles_over_a_long_stream(name, form_type):
    # A pole rounded to float32 is off by up to ~6e-8; a mode that remembers 1 / (1 - |lam|) steps
    # turns that into a fixed output error that many times larger (these checkpoints' slowest:
    # thousands of steps). The per-channel forms keep their diagonal as two float32 numbers: over
    # 4096 steps of noise with a mean (as a block's normalised, biased input has), each block of the
    # shipped checkpoint stays within 3e-6 of its float64 form, relative to max|y|. Measured (session 15's
    # retrained weights): digits-s4d 0.7e-6 - 0.9e-6 (rounded once: 0.9e-5 - 1.4e-5), digits-s4 0.3e-6 -
    # 1.2e-6 (1.4e-6 - 9.0e-6).
    import lrnnx_zoo

    model = lrnnx_zoo.from_pretrained(name)
    torch.manual_seed(0)
    L = 4096
    for block in model.blocks:
        form = block.layer.step_form()
        assert isinstance(form, form_type)
        with step_form_dtype(torch.float64):
            exact = block.layer.step_form()
        u = torch.randn(1, L, form.d_input, dtype=torch.float64) + 1.0
        close(run(form, u), run(exact, u, torch.float64), rel=3e-6)


def test_split_poles_false_builds_the_forms_with_poles_rounded_once(tmp_path):
    # The opt-out of the hi + lo poles, for throughput: no lo buffers, four elementwise nodes fewer
    # per block in the exported graph, and the same system to float32 rounding.
    import lrnnx_zoo
    from lrnnx_zoo.export import to_onnx
    from lrnnx_zoo.step_forms import split_poles

    torch.manual_seed(0)
    lam, B, C = 0.9 * torch.exp(1j * torch.rand(4, 8, dtype=torch.float64)), rand_c(4, 8), rand_c(1, 4, 8)
    with split_poles(False):
        rounded = ChannelDiagonalStepForm(lam, B, C)
    split = ChannelDiagonalStepForm(lam, B, C)
    assert rounded.lam_re_lo is None and split.lam_re_lo is not None
    u = torch.randn(1, 50, 4, dtype=torch.float64)
    close(run(rounded, u), run(split, u))
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer="s4d", d_input=2, d_output=2, d_model=8,
                                                          n_layers=2, layer_kwargs={"d_state": 8})).eval()
    with split_poles(False):
        fast = to_onnx(model, tmp_path / "fast.onnx")
    precise = to_onnx(model, tmp_path / "precise.onnx")
    assert precise.graph["nodes"] - fast.graph["nodes"] == 4 * 2
    with pytest.raises(TypeError, match="True or False"):
        with split_poles("no"):
            pass


def test_unfused_diagonal_form_keeps_slow_poles_over_a_long_stream():
    # DiagonalStepForm unfused (LRU blocks wider than FUSE_LIMIT) splits lam into hi + lo like the
    # per-channel forms: |lam| in [0.999, 0.99999] (memories of 1e3 - 1e5 steps), 16,384 steps of
    # biased noise, within 5e-6 of the float64 form relative to max|y| (measured 2.5e-6; lam rounded
    # once: 7.9e-5).
    torch.manual_seed(0)
    M, H, L = 16, 8, 16384
    r = 1 - torch.logspace(-5, -3, M, dtype=torch.float64)
    lam = r * torch.exp(1j * torch.rand(M, dtype=torch.float64) * 2 * torch.pi)
    B, C = rand_c(M, H) * (1 - r[:, None] ** 2).sqrt(), rand_c(H, M)
    form = DiagonalStepForm(lam, B, C, fuse=False)
    assert form.lam_re_lo is not None
    with step_form_dtype(torch.float64):
        exact = DiagonalStepForm(lam, B, C, fuse=False)
    u = torch.randn(1, L, H, dtype=torch.float64) + 1.0
    close(run(form, u), run(exact, u, torch.float64), rel=5e-6)


@pytest.mark.parametrize("layer, reduce_sums_per_block", [("s4d", 0), ("s4", 2)])
def test_sums_over_modes_export_as_matmuls(tmp_path, layer, reduce_sums_per_block):
    # ONNX Runtime ran ReduceSum over an axis that is not innermost 4-10x slower than the same sum as
    # ones(1, n) @ t at batch 1 (step_forms.sum_rows): the per-channel forms' sums over their modes
    # (S4D's readout, S4's low-rank update) must reach the graph as MatMul. S4's two small sums
    # (the readouts over 2M rows and over the rank) stay ReduceSum, which ran as fast there.
    import onnx

    import lrnnx_zoo
    from lrnnx_zoo.export import to_onnx
    from lrnnx_zoo.step_forms import sum_rows

    torch.manual_seed(0)
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer=layer, d_input=2, d_output=2, d_model=8,
                                                          n_layers=2, layer_kwargs={"d_state": 8})).eval()
    res = to_onnx(model, tmp_path / "m.onnx")            # validated against the eager step inside
    ops = [n.op_type for n in onnx.load(str(res.path)).graph.node]
    assert ops.count("ReduceSum") == 2 * reduce_sums_per_block and ops.count("MatMul") >= 2, ops
    t = torch.randn(3, 4, 5, 6)
    torch.testing.assert_close(sum_rows(t, 5), t.sum(-2))   # eager torch sums


def test_dense_form_steps_without_a_copy_of_its_matrices_per_batch_row():
    # dA @ x.unsqueeze(-1) made torch copy the (H, n, n) matrices for every batch row: (B, H, n, n)
    # per step, 120 ms a step at batch 64, H=128, n=64 (1.2 ms now). Nothing larger than dA or the
    # readout's product (the state once per output channel) may appear (the copy was 4x that here);
    # the result is the plain per-channel recurrence.
    torch.manual_seed(0)
    H, N, batch = 3, 4, 16
    A, B, C, D = rand_c(H, N, N) / 4, rand_c(H, N), rand_c(2, H, N), torch.randn(2, H)
    form = ChannelDenseStepForm(A, B, C, D).double()
    s, u = torch.randn(batch, form.state_size, dtype=torch.float64), torch.randn(batch, H, dtype=torch.float64)
    with torch.no_grad(), LargestTensor() as seen:
        y, s_next = form(u, s)
    assert seen.numel <= max(form.dA.numel(), 2 * s.numel())
    x = s.reshape(batch, H, 2 * N)
    want = x + torch.einsum("hij,bhj->bhi", form.dA, x) + form.B * u.unsqueeze(-1)
    assert torch.allclose(s_next.reshape(batch, H, 2 * N), want, rtol=1e-12, atol=1e-12)
