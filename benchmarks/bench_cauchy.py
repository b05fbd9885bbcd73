"""Time and peak memory of ``cauchy_conj`` with the torch and keops backends, side by side.

Default problem: H = 256 independent systems, N = 32 poles (one per conjugate pair of a 64-state
SSM), L = 16384 nodes, complex64. Each (backend, mode) runs in its own subprocess so that the
peak resident set size (``ru_maxrss``) belongs to that measurement alone; the reported memory
is the peak minus the RSS just before the timed calls (inputs and a warm-up on a tiny problem,
which triggers keops' one-off compilation, are excluded). On CUDA the allocator's own peak is
reported instead.

    python benchmarks/bench_cauchy.py [--H 256] [--N 32] [--L 16384] [--repeats 3] [--backward]
                                      [--threads T] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from lrnnx_zoo.training_cli import positive_int  # argparse type: 0 was a crash, not a usage error


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(backend: str, H: int, N: int, L: int, repeats: int, backward: bool, device: str) -> dict:
    import torch

    from lrnnx_zoo.kernels.cauchy import cauchy_conj
    from lrnnx_zoo.kernels.keops_support import keops_available, keops_unavailable_reason

    if backend == "keops" and not keops_available():
        return {"error": f"keops unavailable: {keops_unavailable_reason()}"}
    g = torch.Generator().manual_seed(0)
    v = torch.randn(H, N, 2, generator=g)
    v = torch.view_as_complex(v).to(device)
    w = torch.complex(torch.full((H, N), -0.5), 10 * torch.randn(H, N, generator=g)).to(device)
    z = (1j * 5 * torch.randn(L, generator=g)).to(torch.complex64).to(device)
    if backward:
        v.requires_grad_()
        w.requires_grad_()

    def run(v, z, w):
        out = cauchy_conj(v, z, w, backend=backend)
        if backward:
            out.real.sum().backward()
        return out

    run(v[:2], z[:64], w[:2])  # warm-up: keops compiles here (outside the measurement)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mib()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = run(v, z, w)
        sync()
        times.append(time.perf_counter() - t0)
        del out
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mib()
    return {"time_s": min(times), "peak_mib": peak - base,
            "memory": "cuda allocator" if device == "cuda" else "max RSS delta"}


def row(mode: str, t: dict, k: dict) -> str:
    """One table row from the torch and keops workers' results; a backend that failed (keops without
    a compiler) shows "-" and the other its figures."""
    def cell(r: dict, key: str, width: int, digits: int) -> str:
        return f"{'-':>{width}}" if "error" in r else f"{r[key]:{width}.{digits}f}"
    ratio = "-" if "error" in t or "error" in k else f"{t['time_s'] / k['time_s']:.2f}"
    return (f"{mode:8s} {cell(t, 'time_s', 9, 3)} {cell(k, 'time_s', 9, 3)} {ratio:>6s}   "
            f"{cell(t, 'peak_mib', 10, 1)} {cell(k, 'peak_mib', 10, 1)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])  # python -OO: no docstring
    ap.add_argument("--H", type=positive_int, default=256, help="independent systems (default 256)")
    ap.add_argument("--N", type=positive_int, default=32, help="poles per system, one per conjugate pair (default 32)")
    ap.add_argument("--L", type=positive_int, default=16384, help="evaluation nodes (default 16384)")
    ap.add_argument("--repeats", type=positive_int, default=3, help="timed calls; the best is reported (default 3)")
    ap.add_argument("--backward", action="store_true", help="also time forward + backward")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch and keops' OpenMP (default: library defaults)")
    ap.add_argument("--worker", choices=["torch", "keops"], help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["fwd", "fwd+bwd"], default="fwd", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the workers
    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        res = worker(args.worker, args.H, args.N, args.L, args.repeats, args.mode == "fwd+bwd",
                     args.device)
        print("RESULT " + json.dumps(res))
        return

    import torch

    modes = ["fwd", "fwd+bwd"] if args.backward else ["fwd"]
    print(f"cauchy_conj  H={args.H} N={args.N} L={args.L}  complex64  device={args.device}  "
          f"threads={args.threads or torch.get_num_threads()}  best of {args.repeats}")
    print(f"{'mode':8s} {'torch s':>9s} {'keops s':>9s} {'t/k':>6s}   "
          f"{'torch MiB':>10s} {'keops MiB':>10s}")
    for mode in modes:
        res = {}
        for backend in ("torch", "keops"):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", backend, "--mode", mode,
                   "--H", str(args.H), "--N", str(args.N), "--L", str(args.L),
                   "--repeats", str(args.repeats), "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
            res[backend] = (json.loads(line[-1][7:]) if line else
                            {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]})
        for name, r in res.items():
            if "error" in r:
                print(f"  {name}: {r['error']}")
        print(row(mode, res["torch"], res["keops"]))
    print("t/k > 1: keops faster. Memory: peak RSS (or CUDA allocator) above the pre-run level.")


if __name__ == "__main__":
    main()
