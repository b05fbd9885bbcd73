"""Gradients and autograd of the layers beyond ``loss.backward()``: torch.func transforms (grad,
jacrev, vmap over a batch of parameters or of samples), caches and frozen parameters.

Tolerances. Every comparison here is float64 and sets one way of differentiating (or batching) the
same layer against another: the same sums in another order (e.g. the plain rfft path against the
hand-written real-transform backward), so they agree to ~1e-15 relative; 1e-10 leaves room for
that and still catches any wrong term (a missing or extra contribution is O(1e-2..1)).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Tuple

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, stack_module_state, vmap

import lrnnx_zoo
from lrnnx_zoo.scan import diagonal_scan, sequential_scan

TOL = dict(rtol=1e-10, atol=1e-10)

# (layer name, constructor options): every family and the modes whose paths differ.
CASES = [("s4d", {}), ("lru", {"backend": "scan"}), ("lru", {"backend": "fft"}), ("s4", {}),
         ("s4", {"bidirectional": True, "discretization": "zoh"}), ("fftconv", {}),
         ("fftconv", {"bidirectional": True, "channels": 2})]
IDS = [name + "".join(f"-{k}={v}" for k, v in kw.items()) for name, kw in CASES]


def make(name: str, **kw: Any) -> nn.Module:
    torch.manual_seed(0)
    m = lrnnx_zoo.create_layer(name, 3, d_state=4, **kw).double()
    with torch.no_grad():          # S4 sets its C~ for this length once, before parameters are copied
        m(torch.randn(1, 6, 3, dtype=torch.float64))
    return m


def first(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def loss_of(m: nn.Module):
    buffers = dict(m.named_buffers())

    def loss(params: Dict[str, Tensor], x: Tensor) -> Tensor:
        return first(functional_call(m, (params, buffers), (x,))).square().sum()
    return loss


def backward_grads(m: nn.Module, x: Tensor) -> Dict[str, Tensor]:
    m.zero_grad()
    first(m(x)).square().sum().backward()
    return {k: p.grad.clone() for k, p in m.named_parameters()}


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_func_grad_equals_backward(name, kw):
    # torch.func.grad over any layer failed: "In order to use an autograd.Function with functorch
    # transforms ... it must override the setup_context staticmethod".
    m = make(name, **kw)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    ref = backward_grads(m, x)
    m.eval()
    with torch.no_grad():          # a cached inference kernel must not stand in for the transform's
        m(x)
    got = grad(loss_of(m))({k: p.detach().clone() for k, p in m.named_parameters()}, x)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], **TOL, msg=k)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_per_sample_gradients_with_vmap_of_grad(name, kw):
    m = make(name, **kw)
    x = torch.randn(3, 6, 3, dtype=torch.float64)
    loss = loss_of(m)
    params = {k: p.detach().clone() for k, p in m.named_parameters()}
    got = vmap(grad(lambda p, xi: loss(p, xi[None])), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        ref = backward_grads(m, x[i:i + 1])
        for k in ref:
            torch.testing.assert_close(got[k][i], ref[k], **TOL, msg=f"{k}, sample {i}")


@pytest.mark.parametrize("layer", ["lru", "s4d", "s4", "fftconv"])
@pytest.mark.parametrize("pooling", ["mean", "last", None])
def test_per_sample_gradients_of_a_padded_batch_with_batched_lengths(layer, pooling):
    # vmap(grad(...)) with lengths batched along with the inputs (per-example gradients of variable-
    # length sequences, as in DP-SGD) failed in the lengths checks, which read the values (.item()
    # under vmap; an audit).
    torch.manual_seed(0)
    cfg = lrnnx_zoo.ModelConfig(layer=layer, d_input=2, d_output=3, d_model=6, n_layers=2,
                                layer_kwargs={"d_state": 4}, pooling=pooling)
    model = lrnnx_zoo.SequenceModel(cfg).double()
    x, lengths = torch.randn(3, 10, 2, dtype=torch.float64), torch.tensor([10, 7, 3])
    with torch.no_grad():          # S4's C~ for this length first, as make() does
        model(x)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}

    def loss(p, xi, li):
        return functional_call(model, p, (xi[None], li[None])).square().sum()
    got = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, lengths)
    for i in range(3):
        model.zero_grad()
        model(x[i:i + 1], lengths[i:i + 1]).square().sum().backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(got[k][i], p.grad, **TOL, msg=f"{k}, sample {i}")


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_jacrev_wrt_input(name, kw):
    m = make(name, **kw)
    x = torch.randn(1, 5, 3, dtype=torch.float64)
    got = jacrev(lambda x: first(m(x)))(x)
    ref = torch.autograd.functional.jacobian(lambda x: first(m(x)), x)
    torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
@pytest.mark.parametrize("no_grad", [True, False], ids=["no_grad", "grad"])
def test_vmap_over_an_ensemble_of_models(name, kw, no_grad):
    # Model ensembling: vmap over stacked parameters failed in every family ("Batching rule not
    # implemented for aten::equal" in the kernel cache, or "does not have vmap support").
    models = [make(name, **kw) for _ in range(2)]
    with torch.no_grad():
        for i, m in enumerate(models[1:], 1):
            for p in m.parameters():
                p.mul_(1 + 0.1 * i)
    params, _ = stack_module_state(models)
    buffers = dict(models[0].named_buffers())
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    with torch.set_grad_enabled(not no_grad):
        y = vmap(lambda p, x: first(functional_call(models[0], (p, buffers), (x,))), in_dims=(0, None))(params, x)
    with torch.no_grad():
        for i, m in enumerate(models):
            torch.testing.assert_close(y[i].detach(), first(m(x)), **TOL)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_vmap_over_a_float32_ensemble(name, kw):
    # float32, where S4's kernel refines ill-conditioned nodes in float64 by value (a nonzero over
    # the nodes, which vmap cannot batch: "Batching rule not implemented for aten::nonzero_numpy").
    # Under vmap the refinement is skipped, as in compiled graphs; each model's output against its
    # own eager forward within 1e-5 of the largest value (measured <= 4e-7 here).
    torch.manual_seed(0)
    models = [lrnnx_zoo.create_layer(name, 3, d_state=4, **kw) for _ in range(2)]
    with torch.no_grad():
        for i, m in enumerate(models):
            m(torch.randn(1, 6, 3))
            for p in m.parameters():
                p.mul_(1 + 0.1 * i)
    params, _ = stack_module_state(models)
    buffers = dict(models[0].named_buffers())
    x = torch.randn(2, 6, 3)
    y = vmap(lambda p, x: first(functional_call(models[0], (p, buffers), (x,))), in_dims=(0, None))(params, x)
    with torch.no_grad():
        for i, m in enumerate(models):
            want = first(m(x))
            assert (y[i].detach() - want).abs().max() <= 1e-5 * want.abs().max()


def test_vmap_over_s4_length_buffers_says_what_to_do():
    # All of S4's buffers stacked by stack_module_state: its internal length is one int for all models.
    # It failed with "It looks like you're calling .item() on a Tensor", naming nothing of the layer.
    models = [make("s4") for _ in range(2)]
    params, buffers = stack_module_state(models)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"length buffer 'L' is batched.*in_dims=\(0, None\)"):
        vmap(lambda p, b, x: first(functional_call(models[0], (p, b), (x,))), in_dims=(0, 0, None))(params, buffers, x)


@pytest.mark.parametrize("lam_batched", [False, True])
@pytest.mark.parametrize("per_row_lam", [False, True])
@pytest.mark.parametrize("s0", ["none", "batched", "shared"])
@pytest.mark.parametrize("reverse", [False, True])
def test_diagonal_scan_vmap_rule_and_its_gradient(lam_batched, per_row_lam, s0, reverse):
    # The vmap rule folds the vmapped dim into the batch; compared with a loop of sequential scans,
    # and its gradient (vmap of grad: the backward is batched by the same rule) with plain autograd.
    g = torch.Generator().manual_seed(0)
    V, B, L, N = 3, 2, 7, 4

    def rnd(*shape: int) -> Tensor:
        return torch.complex(torch.randn(*shape, generator=g, dtype=torch.float64),
                             torch.randn(*shape, generator=g, dtype=torch.float64))
    rows = B if per_row_lam else 1
    lam = 0.9 * rnd(*((V,) if lam_batched else ()), rows, N) / 2 ** 0.5
    x = rnd(V, B, L, N)
    h0 = {"none": None, "batched": rnd(V, B, N), "shared": rnd(B, N)}[s0]
    dims = (0 if lam_batched else None, 0, 0 if s0 == "batched" else None)

    def f(lam: Tensor, x: Tensor, h0: Any) -> Tensor:
        return torch.view_as_real(diagonal_scan(lam, x, h0, reverse=reverse, chunk_size=2)).square().sum()

    def ref(v: int) -> Tuple[Tensor, Tensor]:
        def flip(t: Tensor) -> Tensor:
            return t.flip(1) if reverse else t
        lv = lam[v] if lam_batched else lam
        hv = None if h0 is None else (h0[v] if s0 == "batched" else h0)
        ys = flip(sequential_scan(lv, flip(x[v]), hv))
        return ys, torch.view_as_real(ys).square().sum()
    y = vmap(lambda l, x, h: diagonal_scan(l, x, h, reverse=reverse, chunk_size=2), in_dims=dims)(lam, x, h0)
    gl, gx = vmap(grad(f, argnums=(0, 1)), in_dims=dims)(lam, x, h0)
    for v in range(V):
        lv = (lam[v] if lam_batched else lam).clone().requires_grad_(True)
        xv = x[v].clone().requires_grad_(True)
        hv = None if h0 is None else (h0[v] if s0 == "batched" else h0)
        ys = diagonal_scan(lv, xv, hv, reverse=reverse, chunk_size=2)
        torch.testing.assert_close(y[v], ref(v)[0], **TOL)
        rl, rx = torch.autograd.grad(torch.view_as_real(ys).square().sum(), (lv, xv))
        torch.testing.assert_close(gl[v], rl, **TOL)
        torch.testing.assert_close(gx[v], rx, **TOL)


def test_second_derivatives_through_func_grad():
    # A gradient penalty through the FFT convolution: autograd.grad(..., create_graph=True) refuses
    # (its backward keeps spectra without a graph); the error now names torch.func.grad, whose first
    # derivative differentiates again. Checked against finite differences (gradcheck of the gradient,
    # float64, eps 1e-6, atol 1e-6: central differences err by ~eps^2 |f'''| + 1e-16 / eps).
    m = make("s4d")
    x = torch.randn(1, 5, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="no second derivative.*torch.func.grad"):
        g, = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
        g.sum().backward()
    first_derivative = grad(lambda x: m(x).square().sum())
    assert torch.autograd.gradcheck(first_derivative, (x,), eps=1e-6, atol=1e-6)
    penalty = first_derivative(x).square().sum()
    grads = torch.autograd.grad(penalty, list(m.parameters()))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_s4_func_transforms_at_a_new_length_leave_C_tilde_alone():
    # S4 extends its stored C~ in place for a longer sequence; inside torch.func.grad that write
    # raised "attempted to call in-place operation ... that would mutate a captured Tensor", so the
    # README said to run the model once at the longest length first. Inside a transform the kernel
    # now takes C~ for a covering length without storing it (as compiled graphs and
    # extend_length_in_place=False do): gradients equal a backward that keeps C~ too, float64, 1e-10.
    torch.manual_seed(0)
    m = lrnnx_zoo.create_layer("s4", 3, d_state=8).double()
    x = torch.randn(2, 40, 3, dtype=torch.float64)
    C_before, length = m.kernel.C.detach().clone(), m.kernel.length
    got = grad(loss_of(m))({k: p.detach().clone() for k, p in m.named_parameters()}, x)
    assert torch.equal(m.kernel.C, C_before) and m.kernel.length == length
    kept = copy.deepcopy(m)
    kept.kernel.extend_length_in_place = False
    ref = backward_grads(kept, x)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-10 * ref[k].abs().max().item(), msg=k)
    per_sample = vmap(grad(lambda p, xi: loss_of(m)(p, xi[None])), in_dims=(None, 0))(
        {k: p.detach().clone() for k, p in m.named_parameters()}, torch.randn(3, 50, 3, dtype=torch.float64))
    assert all(bool(torch.isfinite(g).all()) for g in per_sample.values())


@pytest.mark.parametrize("pooling, bad", [("mean", 11), ("mean", -1), ("last", 0), ("mean", 0), (None, 15)])
def test_out_of_range_lengths_are_refused_under_vmap_too(pooling, bad):
    # The value checks once stood aside under vmap, and a length of 0, -1 or 11 (of 10 steps) gave
    # finite, wrong outputs there (review); they read the whole batch's values instead.
    torch.manual_seed(0)
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer="s4d", d_input=2, d_output=3, d_model=6,
                                                          n_layers=1, layer_kwargs={"d_state": 4}, pooling=pooling))
    x, lengths = torch.randn(3, 10, 2), torch.tensor([10, bad, 3])
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 10\]|needs at least one valid step"):
        model(x, lengths)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 10\]|needs at least one valid step"):
        vmap(lambda xi, li: model(xi[None], li[None]))(x, lengths)
