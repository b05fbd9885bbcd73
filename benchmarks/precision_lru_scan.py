"""Precision and speed of the LRU scan backend with lam rounded to complex64 vs kept in complex128.

The scan forms the carries between chunks from powers of lam. Rounding lam = exp(log lam) to
complex64 before the scan (the scan then raises it back to complex128 for the powers, too late)
makes every lam^k that of a lam off by ~6e-8, i.e. lam^k off by ~k * 6e-8 relative; near the unit
circle (|lam| up to 0.99999 keeps ~1e5 steps of memory) that reaches the output. Passing lam in
complex128 with ``diagonal_scan(..., lam_dtype=torch.complex128)`` removes it; x stays complex64.

Precision: max|y32 - y64| / max|y64| of a float32 LRU (r in [0.999, 0.99999], H=N=16, L=65536)
against the same weights in float64, over seeds. Speed: forward (no autograd) at B=8, L=1024,
H=128, N=64, both variants timed interleaved so that this machine's drift moves both alike.

    python benchmarks/precision_lru_scan.py [--seeds 3] [--rounds 30]
"""

from __future__ import annotations

import argparse
import copy
from typing import Optional

import torch
from torch import Tensor

import lrnnx_zoo
from lrnnx_zoo.export.latency import interleaved_steps
from lrnnx_zoo.modal import modal_scan, project_in, project_out
from lrnnx_zoo.scan import diagonal_scan
from lrnnx_zoo.training_cli import positive_int  # argparse type: 0 was a crash, not a usage error


def rounded_lam_scan(u: Tensor, log_lam: Tensor, B: Tensor, C: Tensor,
                     initial_state: Optional[Tensor] = None) -> Tensor:
    """The scan backend as it was: lam rounded to u's complex dtype before the scan.
    u: (Bsz, L, H), log_lam: (N,), B: (N, H), C: (H_out, N) -> (Bsz, L, H_out)."""
    cx = torch.promote_types(u.dtype, torch.complex64)
    return project_out(diagonal_scan(torch.exp(log_lam).to(cx), project_in(u, B), initial_state), C)


def lru_forward(layer, x: Tensor, scan) -> Tensor:
    """LRU.forward with the modal backend replaced by ``scan``: (B, L, H) -> (B, L, H)."""
    _, B, C = layer.discretize()
    return scan(x, layer.log_lambda(torch.complex128), B, C) + layer.D * x


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b).abs().max() / b.abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=positive_int, default=3, help="layers (seeds 0, 1, ...) whose precision is measured (default 3)")
    ap.add_argument("--rounds", type=positive_int, default=30, help="interleaved rounds of the speed comparison (default 30)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("precision, r in [0.999, 0.99999], H=N=16, B=1, L=65536 (max|y32 - y64| / max|y64|):")
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        layer = lrnnx_zoo.create_layer("lru", 16, d_state=16, r_min=0.999, r_max=0.99999, backend="scan")
        ref = copy.deepcopy(layer).double()
        x = torch.randn(1, 65536, 16)
        with torch.no_grad():
            y64 = lru_forward(ref, x.double(), modal_scan)
            old = rel_err(lru_forward(layer, x, rounded_lam_scan), y64)
            new = rel_err(lru_forward(layer, x, modal_scan), y64)
        print(f"  seed {seed}: lam complex64 {old:.2e}   lam complex128 {new:.2e}")

    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("lru", 128, d_state=64, backend="scan")
    x = torch.randn(8, 1024, 128)
    fns = {name: (lambda fn=fn: lru_forward(layer, x, fn)) for name, fn in
           (("lam complex64", rounded_lam_scan), ("lam complex128", modal_scan))}
    with torch.no_grad():
        ms = {k: v / 1e3 for k, v in interleaved_steps(fns, steps=args.rounds * 4, rounds=args.rounds).items()}
    print("speed, forward, B=8, L=1024, H=128, N=64 (median ms of interleaved calls):")
    for k, v in ms.items():
        print(f"  {k}: {v:.2f} ms")
    print(f"  ratio complex128 / complex64: {ms['lam complex128'] / ms['lam complex64']:.3f}")


if __name__ == "__main__":
    main()
