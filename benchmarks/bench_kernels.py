"""Side-by-side timings of the hot-path kernels.

1. Vandermonde kernel (S4D): ``vandermonde_torch`` vs ``vandermonde_keops``, next to the
   rfft+irfft floor of the convolution that consumes the kernel (a length-L kernel is only useful
   if it costs about what the FFT convolution does).
2. Diagonal scan: ``diagonal_scan`` vs the equivalent FFT convolution (states = x * lam^t) vs a
   Python loop (``sequential_scan``) vs Hillis-Steele doubling through autograd, forward and
   forward+backward.

Run:  python benchmarks/bench_kernels.py [--repeats 5] [--no-keops] [--smoke]
Times are the minimum over repeats (the least noisy statistic on a shared machine), in ms.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable, Optional

import torch

from lrnnx_zoo.kernels.keops_support import keops_available, keops_unavailable_reason
from lrnnx_zoo.kernels.vandermonde import vandermonde_keops, vandermonde_torch
from lrnnx_zoo.runtime import tune_allocator
from lrnnx_zoo.scan import diagonal_scan, sequential_scan
from lrnnx_zoo.training_cli import positive_int  # argparse type: 0 was a crash, not a usage error


def timeit(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time of fn() over `repeats` runs after one warm-up, in ms.

    When the warm-up takes over 0.5 s (Python-loop backward, keops on CPU) one timed run is enough.
    """
    t0 = time.perf_counter()
    fn()
    if time.perf_counter() - t0 > 0.5:
        repeats = 1
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def fmt(ms: Optional[float]) -> str:
    return "      -" if ms is None else f"{ms:7.2f}"


def ratio(a: Optional[float], b: Optional[float]) -> str:
    return "    -" if a is None or b is None else f"{a / b:5.2f}x"      # 0.03x, not 0.0x, where keops wins


# ----------------------------------------------------------------------------------------------

# Sizes of each mode: Vandermonde (H, N, L) and scan (B, L, N) problems.
SIZES = {"full": {"vandermonde": [(128, 32, 1024), (128, 32, 4096), (64, 32, 65536)],
                  "scan": [(8, 1024, 64), (4, 4096, 64)]},
         "smoke": {"vandermonde": [(8, 4, 256)], "scan": [(1, 256, 8)]}}


def bench_vandermonde(repeats: int, use_keops: bool, sizes=SIZES["full"]["vandermonde"]) -> None:
    print("Vandermonde kernel, conj=True, float32 (ms; ratio = keops / torch)")
    print(f"{'H':>4} {'N':>3} {'L':>6} | {'torch':>7} {'keops':>7} {'ratio':>6} | "
          f"{'torch f+b':>9} {'keops f+b':>9} {'ratio':>6} | {'rfft floor':>10}")
    gen = torch.Generator().manual_seed(0)
    for H, N, L in sizes:
        log_lam = torch.complex(-0.5 * torch.rand(H, N, generator=gen) * 1e-2,
                                math.pi * torch.rand(H, N, generator=gen))
        v = torch.randn(H, N, dtype=torch.complex64, generator=gen)
        vg, lg = v.clone().requires_grad_(), log_lam.clone().requires_grad_()

        def fb(fn):
            return lambda: fn(vg, lg, L).sum().backward()

        t_fwd = timeit(lambda: vandermonde_torch(v, log_lam, L), repeats)
        t_fb = timeit(fb(vandermonde_torch), repeats)
        k_fwd = k_fb = None
        if use_keops:
            k_fwd = timeit(lambda: vandermonde_keops(v, log_lam, L), repeats)
            # keops backward on CPU at L = 65536 takes many seconds; skipped.
            k_fb = timeit(fb(vandermonde_keops), repeats) if L <= 8192 else None
        u = torch.randn(H, L, generator=gen)
        k = torch.randn(H, L, generator=gen)
        floor = timeit(lambda: torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(k, n=2 * L),
                                               n=2 * L)[..., :L], repeats)
        print(f"{H:>4} {N:>3} {L:>6} | {fmt(t_fwd)} {fmt(k_fwd)} {ratio(k_fwd, t_fwd):>6} | "
              f"{fmt(t_fb):>9} {fmt(k_fb):>9} {ratio(k_fb, t_fb):>6} | {fmt(floor):>10}")


# ----------------------------------------------------------------------------------------------

def fft_states(lam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The scan as a causal convolution: s_t = sum_k lam^{t-k} x_k via complex FFT of length 2L."""
    L = x.shape[1]
    t = torch.arange(L, dtype=x.real.dtype)
    K = torch.exp(t[:, None] * torch.log(lam))                      # (L, N)
    X = torch.fft.fft(x, n=2 * L, dim=1)
    return torch.fft.ifft(X * torch.fft.fft(K, n=2 * L, dim=0), dim=1)[:, :L]


def hillis_steele(lam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Log-depth doubling scan (log2 L full passes), differentiated by plain autograd."""
    s, p, d, L = x, lam, 1, x.shape[1]
    while d < L:
        s = torch.cat([s[:, :d], s[:, d:] + p * s[:, :-d]], 1)
        p, d = p * p, 2 * d
    return s


def bench_scan(repeats: int, sizes=SIZES["full"]["scan"]) -> None:
    print("\nDiagonal scan, complex64, |lam| in [0.9, 0.999] (ms; ratio = other / diagonal_scan)")
    methods = [("diagonal_scan", diagonal_scan), ("fft conv", fft_states),
               ("hillis-steele", hillis_steele), ("python loop", sequential_scan)]
    print(f"{'B':>3} {'L':>5} {'N':>3} {'pass':>9} | " + " ".join(f"{m:>15}" for m, _ in methods))
    gen = torch.Generator().manual_seed(0)
    for B, L, N in sizes:
        lam = torch.polar(0.999 - 0.099 * torch.rand(N, generator=gen),
                          math.pi * torch.rand(N, generator=gen)).to(torch.complex64)
        x = torch.randn(B, L, N, dtype=torch.complex64, generator=gen)
        g = torch.randn(B, L, N, dtype=torch.complex64, generator=gen)
        lg, xg = lam.clone().requires_grad_(), x.clone().requires_grad_()
        for kind in ("fwd", "fwd+bwd"):
            times = []
            for _, fn in methods:
                if kind == "fwd":
                    times.append(timeit(lambda fn=fn: fn(lam, x), repeats))
                else:
                    times.append(timeit(lambda fn=fn: fn(lg, xg).backward(g), repeats))
            cells = [f"{fmt(times[0]):>15}"] + [f"{fmt(t)} ({ratio(t, times[0])})" for t in times[1:]]
            print(f"{B:>3} {L:>5} {N:>3} {kind:>9} | " + " ".join(f"{c:>15}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])  # python -OO: no docstring
    ap.add_argument("--repeats", type=positive_int, default=5, help="timed calls; the minimum is reported (default 5)")
    ap.add_argument("--no-keops", action="store_true", help="skip the pykeops columns")
    ap.add_argument("--smoke", action="store_true", help="one tiny problem each: checks that it runs")
    ap.add_argument("--default-allocator", action="store_true",
                    help="do not call lrnnx_zoo.runtime.tune_allocator (measure page-fault costs too)")
    args = ap.parse_args()
    # as the other timing benchmarks: glibc's default served the kernels' MB-sized outputs with fresh
    # mmaps, and their page faults tripled the Vandermonde kernel's time (6.8 against 1.2-2.2 ms)
    tuned = False if args.default_allocator else tune_allocator()
    sizes = SIZES["smoke" if args.smoke else "full"]
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, allocator {'tuned' if tuned else 'default'}")
    use_keops = not args.no_keops and keops_available()
    if use_keops:
        import pykeops

        pykeops.set_verbose(False)   # keep the table free of its (one-off) compile log
    if not args.no_keops and not use_keops:
        print(f"keops unavailable: {keops_unavailable_reason()}")
    bench_vandermonde(args.repeats, use_keops, sizes["vandermonde"])
    bench_scan(args.repeats, sizes["scan"])


if __name__ == "__main__":
    main()
