"""S4's C~ = (I - A_bar^L)^T C from steps of the bilinear A_bar's diagonal plus low-rank form.

A first forward (and a length extension) squared the dense float64 (H, N, N) A_bar log2(L) times:
O(H N^3 log L), 9.8 s and 0.77 GB at H=128, N=512, L=1024, where the kernel itself takes 0.05 s.
Where the cost model expects it cheaper (large N), c^T A_bar^L now comes from L steps of the
transposed DPLR map, O(H N r L), no N x N matrix.

Tolerances: both paths are float64 evaluations of the same product, ~1e-14 relative apart (a wrong
transpose, sign or swapped half of the map is off by O(dt) or more); 1e-12 relative is asserted.
"""

from __future__ import annotations

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo import hippo
from lrnnx_zoo.plugins.s4 import HippoSSKernel, dense
from memory_probe import LargestTensor


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("measure,rank", [("legs", 1), ("legt", 2), ("fourier", 1)])
@pytest.mark.parametrize("L", [0, 1, 77])
def test_rows_times_power_dplr_is_the_dense_power(measure, rank, L):
    torch.manual_seed(0)
    k = HippoSSKernel(5, N=16, measure=measure, rank=rank)
    with torch.no_grad():
        A_bar, _ = k.dense_system()
        c = torch.randn(2, 5, 16, dtype=torch.float64)                  # (C, H, N) rows
        want = dense.per_channel(hippo.power(L, A_bar).transpose(-1, -2), c)     # c^T A_bar^L
        got = dense.rows_times_power_dplr(k._dplr_system(), c, L)
    assert rel_err(got, want) < 1e-12


def _layer_after(forced: bool, monkeypatch) -> dict:
    """A float64 S4 layer through its C~ paths with the DPLR steps forced on or off: the first
    forward (C~ set), an inference forward beyond it (C~ for a doubled length, not stored) and a
    training forward beyond it (C~ extended in place)."""
    monkeypatch.setattr(dense, "dplr_power_cheaper", lambda *a: forced)
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("s4", 3, d_state=16).double()
    x = torch.randn(2, 100, 3, dtype=torch.float64)
    out = {}
    with torch.no_grad():
        out["first"] = layer(x[:, :40])
        out["C_40"] = layer.kernel.C.detach().clone()
        layer.eval()
        out["longer"] = layer(x)
        assert layer.kernel.length == 40                                  # not stored in inference
    layer.train()
    out["extended"] = layer(x)
    out["C_160"] = layer.kernel.C.detach().clone()
    assert layer.kernel.length == 160
    return out


def test_c_tilde_by_dplr_steps_equals_the_dense_squares(monkeypatch):
    by_steps = _layer_after(True, monkeypatch)
    by_squares = _layer_after(False, monkeypatch)
    for name in by_squares:
        assert rel_err(by_steps[name].detach(), by_squares[name].detach()) < 1e-12, name


def test_first_forward_at_a_large_state_forms_no_dense_matrix(monkeypatch):
    # H=2, N=256, L=64: the cost model takes the steps (1.7 ms expected against 12.6 ms of squares).
    # The old code called hippo.power on the (2, 256, 256) A_bar (131,072 elements, each square a new
    # one); now no op makes a tensor a quarter of that size, and hippo.power is not called.
    H, N = 2, 256
    powers = []
    real_power = hippo.power
    monkeypatch.setattr(hippo, "power", lambda *a, **kw: powers.append(a[0]) or real_power(*a, **kw))
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("s4", H, d_state=N)
    x = torch.randn(1, 64, H)
    with torch.no_grad(), LargestTensor() as seen:
        y = layer(x)
    assert layer.kernel.length == 64
    assert powers == [] and seen.numel < H * N * N // 4, (powers, seen.numel)
    # the same output as the dense path gives (float32 layer: 1e-5 of max|y|)
    monkeypatch.setattr(dense, "dplr_power_cheaper", lambda *a: False)
    torch.manual_seed(0)
    dense_layer = lrnnx_zoo.create_layer("s4", H, d_state=N)
    with torch.no_grad():
        assert rel_err(y, dense_layer(x)) < 1e-5


def test_the_cost_model_keeps_small_states_on_the_dense_squares():
    # small H and N: the steps' fixed ~25 us each outweigh the products (the tests' kernels, tiny models
    # keep their bits); N=256 and 512 at H=128, L=1024 take the steps
    assert not dense.dplr_power_cheaper(1, 4, 16, 1024, dense.power_products(1024))
    assert dense.dplr_power_cheaper(1, 128, 256, 1024, dense.power_products(1024))
    assert dense.dplr_power_cheaper(1, 128, 512, 1024, dense.power_products(1024))
    assert [dense.power_products(L) for L in (1, 2, 3, 64, 100)] == [0, 1, 2, 6, 8]
