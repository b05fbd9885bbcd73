"""The torch Vandermonde kernel's memory at many rows (channels x d_model systems).

An inference call held the factors of every row at once, and its block length T was clamped as
rows grew, which moved the values from the (rows, N, T) factor into the (rows, N, J) one: FFTConv
with 64 channels of d_model=256, N=256 (16384 rows, L=256) took 3.7 GB and 11 s for a 16 MB kernel,
against 0.33 GB and 0.9 s at 16 channels. Inference now runs the rows in blocks within
``_BLOCK_BYTES``, at the balanced T.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

import lrnnx_zoo.kernels.vandermonde as V
from lrnnx_zoo import create_layer


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(*shape, dtype=torch.complex64, generator=g)
    log_lam = torch.complex(-0.1 * torch.rand(*shape, dtype=torch.float64, generator=g),
                            torch.randn(*shape, dtype=torch.float64, generator=g))
    return v, log_lam


def test_block_length_does_not_shrink_with_rows():
    # the factors hold rows * N * (T + J) values, fewest at T ~ sqrt(L) whatever the rows
    for L in (256, 1024, 4096):
        assert V.default_block_size(L, rows=16384, N=128, itemsize=4) == V.default_block_size(L)
    assert V.default_block_size(256, rows=16384, N=128, itemsize=4) == 16      # was 4 (J 64)


def test_inference_factors_stay_within_the_block_budget(monkeypatch):
    """An FFTConv layer's kernel (16 channels x 32 systems = 512 rows, N=32, L=1024) with a 2 MB budget:
    every block's factors fit it, and the output is the one of a single block, bit for bit (each row's
    kernel is computed by the same ops whatever the rows beside it)."""
    torch.manual_seed(0)
    layer = create_layer("fftconv", 32, d_state=64, channels=16).eval()
    x = torch.randn(2, 1024, 32)
    with torch.no_grad():
        whole = layer(x)                  # 25 MB of factors: one block under the default 64 MB
    sizes = []
    factors = V._factors

    def spy(*args, **kwargs):
        out = factors(*args, **kwargs)
        sizes.append(sum(t.numel() * t.element_size() for t in out))
        return out

    budget = 2 * 2**20
    monkeypatch.setattr(V, "_factors", spy)
    monkeypatch.setattr(V, "_BLOCK_BYTES", budget)
    fresh = create_layer("fftconv", 32, d_state=64, channels=16).eval()
    fresh.load_state_dict(layer.state_dict())          # no cached kernel
    with torch.no_grad():
        blocked = fresh(x)
    assert len(sizes) > 1, sizes
    assert max(sizes) <= budget, f"factor bytes per call {sizes}, budget {budget}"
    # the rows' own arithmetic, grouped otherwise: equal here bit for bit; a BLAS may block a matmul
    # of fewer rows differently, so float32 rounding (1e-6 relative) is what is asserted
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-6)


def test_differentiated_calls_stay_whole(monkeypatch):
    """Under autograd the factors are saved for the backward: one call, whatever the budget, with the
    gradients of before; its values equal the blocked inference call's, bit for bit."""
    v, log_lam = _inputs((3, 40, 16))
    monkeypatch.setattr(V, "_BLOCK_BYTES", 50_000)      # 3 rows of 120 per block in inference
    calls = []
    factors = V._factors
    monkeypatch.setattr(V, "_factors", lambda *a, **k: calls.append(1) or factors(*a, **k))
    for conj in (True, False):
        calls.clear()
        vg = v.clone().requires_grad_()
        K = V.vandermonde_torch(vg, log_lam, 300, conj=conj)
        assert len(calls) == 1
        (K.real if K.is_complex() else K).sum().backward()
        assert vg.grad is not None and torch.isfinite(torch.view_as_real(vg.grad)).all()
        calls.clear()
        with torch.no_grad():
            blocked = V.vandermonde_torch(v, log_lam, 300, conj=conj)
        assert len(calls) == 40
        assert blocked.shape == K.shape == (3, 40, 300) and blocked.dtype == K.dtype
        torch.testing.assert_close(blocked, K.detach(), rtol=1e-6, atol=1e-6)   # (bit for bit here; see above)


def test_many_rows_peak_memory_in_a_subprocess():
    """16384 rows, N=128, L=256 in float32 (FFTConv's 64 channels of d_model=256, N=256): the peak
    resident growth stays under 1 GB (measured 0.12 GB; before, 3.7 GB). Generous: an 8x margin."""
    code = textwrap.dedent("""
        import json, torch
        torch.set_num_threads(1)
        from lrnnx_zoo.kernels.vandermonde import vandermonde_torch
        def hwm():
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
        g = torch.Generator().manual_seed(0)
        v = torch.randn(16384, 128, dtype=torch.complex64, generator=g)
        a = torch.complex(-0.1 * torch.rand(16384, 128, dtype=torch.float64, generator=g),
                          torch.randn(16384, 128, dtype=torch.float64, generator=g))
        before = hwm()
        with torch.no_grad():
            K = vandermonde_torch(v, a, 256)
        print(json.dumps({"grew": hwm() - before, "finite": bool(torch.isfinite(K).all())}))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["finite"]
    assert result["grew"] < 2**30, f"peak grew by {result['grew'] / 2**20:.0f} MB"
