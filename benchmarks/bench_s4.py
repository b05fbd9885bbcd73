"""S4 (NPLR) benchmark: kernel generation per Cauchy backend, layer forward against a bare FFT
round trip, and training memory. Each case runs in its own subprocess so that its peak resident
memory (ru_maxrss) is its own.

    python benchmarks/bench_s4.py            # everything (a few minutes on a 2-core CPU)
    python benchmarks/bench_s4.py --quick    # smaller sizes
    python benchmarks/bench_s4.py --smoke    # tiny sizes: checks that it runs
    python benchmarks/bench_s4.py --threads 1   # every case on one torch thread

Columns: threads = the case's torch threads; time = best of the repeats (the minimum is the least
disturbed by other processes on a shared machine), after one untimed call that takes the process's
one-off costs; peak = ru_maxrss at the end; rise = peak - resident memory before the measured call.
The FFT baseline itself varies up to 3x between processes on a shared 2-core VM (allocator page
faults on its 16 MB buffers), so compare absolute times across runs as well as ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch

MB = 2 ** 20


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # KiB on Linux


def best_of(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Interleaved timing: the minimum over ``repeats`` rounds, in ms."""
    for f in fns.values():
        f()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * min(v) for k, v in times.items()}


# -- child cases ---------------------------------------------------------------------------------

def case_kernel(backend: str, H: int, N: int, L: int, repeats: int) -> dict:
    from lrnnx_zoo.plugins.s4 import HippoSSKernel
    torch.manual_seed(0)
    k = HippoSSKernel(H, N=N, L=L, backend=backend)     # C~ for L is set up here, outside the timing
    k.cache_inference_kernel = False                    # time the generation itself, every call
    with torch.no_grad():
        gc.collect()
        before = rss_now()
        # best_of makes one untimed call first: the process's first kernel pays one-off costs (keops'
        # compilation or module load, torch's lazy set-up: 0.39 s against 0.015 s at H=256, L=1024), which
        # were the whole figure of a single repeat (L=65536 runs one)
        ms = best_of({"kernel": lambda: k(L=L)}, repeats)["kernel"]
    return {"time_ms": ms, "peak_mb": peak_rss() / MB, "rise_mb": (peak_rss() - before) / MB}


def case_forward(B: int, L: int, H: int, N: int, repeats: int) -> dict:
    from lrnnx_zoo.plugins.s4 import S4, S4Layer
    from lrnnx_zoo.convolution import fast_fft_size
    torch.manual_seed(0)
    s4 = S4(H, d_state=N, l_max=L, backend="torch").eval()             # SSM + GELU + output linear
    s4_gen = S4(H, d_state=N, l_max=L, backend="torch").eval()         # same, kernel generated every call
    s4_gen.load_state_dict(s4.state_dict())
    s4_gen.kernel.cache_inference_kernel = False
    core = S4Layer(H, d_state=N, l_max=L, backend="torch").eval()      # y = K * u + D u, (B, L, H) interface
    core.kernel.cache_inference_kernel = False
    u = torch.randn(B, H, L)
    x = u.transpose(1, 2).contiguous()
    n = fast_fft_size(2 * L - 1)                                        # the causal convolution's size
    with torch.no_grad():
        t = best_of({
            "floor": lambda: torch.fft.irfft(torch.fft.rfft(u), n=L),         # the floor of issue #3
            "roundtrip": lambda: torch.fft.irfft(torch.fft.rfft(u, n=n), n=n),
            "kernel": lambda: core.kernel(L=L),
            "core": lambda: core(x),
            "s4_gen": lambda: s4_gen(u),
            "s4": lambda: s4(u),
        }, repeats)
    return t


def case_train(B: int, L: int, H: int, N: int) -> dict:
    from lrnnx_zoo.plugins.s4 import S4
    torch.manual_seed(0)
    layer = S4(H, d_state=N, l_max=L, backend="torch").train()
    u = torch.randn(B, H, L)
    gc.collect()
    before = rss_now()
    ms = best_of({"train": lambda: layer(u)[0].square().mean().backward()}, repeats=2)["train"]
    return {"time_ms": ms, "peak_mb": peak_rss() / MB, "rise_mb": (peak_rss() - before) / MB}


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads) if args.threads else None
    if args.case == "forward":   # timings as the CLI runs them; memory cases keep the default allocator
        from lrnnx_zoo.runtime import tune_allocator
        tune_allocator()
    if args.case == "kernel":
        out = case_kernel(args.backend, args.H, args.N, args.L, args.repeats)
    elif args.case == "forward":
        out = case_forward(args.B, args.L, args.H, args.N, args.repeats)
    else:
        out = case_train(args.B, args.L, args.H, args.N)
    out["threads"] = torch.get_num_threads()
    print(json.dumps(out))


# -- parent ---------------------------------------------------------------------------------------

def run(**kw) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child"] + [f"--{k}={v}" for k, v in kw.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The sizes of each mode: kernel generation (H, N, [(L, repeats)]), layer forward (H, N, [(B, L)]),
# training step (B, L, H, N). The full sizes are those docs/performance.md quotes.
SIZES = {
    "full": {"kernel": (256, 64, [(16384, 3), (65536, 1)]), "forward": (128, 64, [(8, 1024), (4, 4096)]),
             "train": (4, 4096, 128, 64)},
    "quick": {"kernel": (256, 64, [(4096, 3), (16384, 1)]), "forward": (128, 64, [(8, 1024), (4, 2048)]),
              "train": (4, 2048, 128, 64)},
    "smoke": {"kernel": (16, 8, [(256, 2)]), "forward": (16, 8, [(2, 256)]), "train": (2, 256, 16, 8)},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --child and the sizes below it are the parent's instructions to one case's subprocess.
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", default="kernel", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="torch", help=argparse.SUPPRESS)
    for size in ("H", "N", "L", "B", "repeats"):
        p.add_argument(f"--{size}", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of every case (default: torch's default, one per core)")
    modes = p.add_mutually_exclusive_group()
    modes.add_argument("--quick", action="store_true", help="smaller sizes (a minute or two)")
    modes.add_argument("--smoke", action="store_true", help="tiny sizes, to check that it runs (seconds)")
    args = p.parse_args()
    if args.threads < 0:
        p.error(f"--threads must be a positive number of threads (or 0 for torch's default), got {args.threads}")
    if args.child:
        return child(args)

    from lrnnx_zoo.kernels.keops_support import keops_available
    backends = ["torch"] + (["keops"] if keops_available() else [])
    sizes = SIZES["smoke" if args.smoke else "quick" if args.quick else "full"]
    threads = {"threads": args.threads} if args.threads else {}
    rows = []
    print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads; "
          f"keops usable: {keops_available()}")
    H, N, lengths = sizes["kernel"]
    for L, reps in lengths:
        res = {b: run(case="kernel", backend=b, H=H, N=N, L=L, repeats=reps, **threads) for b in backends}
        for b, r in res.items():
            ratio = "" if b == "torch" or "error" in r else f"keops/torch {r['time_ms'] / res['torch']['time_ms']:.2f}x"
            rows.append((f"kernel H={H} N={N} L={L} [{b}]", r, ratio))
    H, N, shapes = sizes["forward"]
    for B, L in shapes:
        r = run(case="forward", B=B, L=L, H=H, N=N, repeats=15, **threads)
        if "error" in r:
            rows.append((f"forward B={B} L={L}", r, ""))
            continue
        rt = r["floor"]
        for key, name, ratio in (
                ("floor", f"floor: rfft+irfft, length L (B={B}, H={H}, L={L})", "1.00x (baseline)"),
                ("roundtrip", "  rfft+irfft at the causal size 2L", ""),
                ("kernel", f"  S4 kernel generation (H={H}, N={N}, L={L})", ""),
                ("core", "  S4Layer (registered): kernel + conv + D", ""),
                ("s4_gen", "  S4: kernel + conv + D + GELU + linear", " (target <= 4x)"),
                ("s4", "  S4, inference with the reused kernel", "")):
            rows.append((name, {"time_ms": r[key], "threads": r["threads"]},
                         ratio if key == "floor" else f"{r[key] / rt:.2f}x{ratio}"))
    B, L, H, N = sizes["train"]
    r = run(case="train", B=B, L=L, H=H, N=N, **threads)
    rows.append((f"fwd+bwd S4 B={B} H={H} N={N} L={L} [torch]", r,
                 "" if "error" in r else f"peak {'<' if r['peak_mb'] < 1024 else '>='} 1 GB"))

    print(f"\n{'case':<48} {'threads':>7} {'time ms':>10} {'peak MB':>9} {'rise MB':>9}  ratio")
    for name, r, ratio in rows:
        if "error" in r:
            print(f"{name:<48} ERROR {r['error']}")
            continue
        fmt = lambda key: f"{r[key]:>9.0f}" if key in r else f"{'':>9}"      # noqa: E731
        print(f"{name:<48} {r['threads']:>7} {r['time_ms']:>10.1f} {fmt('peak_mb')} {fmt('rise_mb')}  {ratio}")


if __name__ == "__main__":
    main()
