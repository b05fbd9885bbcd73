"""Forward speed of the diagonal layers against the FFT floor, and peak memory, from one run.

The floor of any FFT-convolution layer is a bare rfft + irfft round trip of its input along time
in a contiguous (B, H, L) layout. Every layer is timed at the same shapes in the same process and
reported as a multiple of that floor, the floor and the layers in the same cache state: "warm"
(each timed call right after an untimed call of itself, as in a loop) and, for the forwards,
"cold" (each timed call after 64 MB written elsewhere). The forward is inference (torch.no_grad()),
where S4D and S4 reuse their kernel's spectrum while the weights stay the same; "kernel generated"
times it with that cache off (cache_inference_kernel = False), as a first call or a training
forward pays. Peak memory is measured in a fresh subprocess per layer as the rise of the resident
set's high-water mark (VmHWM, reset first) during one forward, over the input size.

    python benchmarks/bench_layers.py            # full table (about a minute)
    python benchmarks/bench_layers.py --quick    # one shape, fewer repeats
    python benchmarks/bench_layers.py --smoke    # tiny sizes: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict

import torch

import lrnnx_zoo
from lrnnx_zoo.runtime import tune_allocator


#: What a "cold" call runs after: more than this machine's caches hold.
FLUSH_BYTES = 64 * 2 ** 20


def interleaved_ms(fns: Dict[str, Callable[[], object]], rounds: int, state: str = "warm") -> Dict[str, float]:
    """Median wall time (ms) of each fn over ``rounds`` rounds that call every fn once in turn,
    after two warm-up calls each, every fn timed in the same cache ``state``: "warm", right after an
    untimed call of itself; "cold", right after FLUSH_BYTES are written. (Timed one after another
    without either, the first fn of a round ran after the last one's heaviest call: the floor, timed
    first, was 1.58-1.66 ms in that position and 1.24-1.26 ms warm, and every ratio came out low.)"""
    scratch = torch.empty(FLUSH_BYTES // 4) if state == "cold" else None
    ready = {k: (lambda: scratch.fill_(1.0)) if scratch is not None else fn for k, fn in fns.items()}
    for fn in fns.values():
        fn(), fn()
    times: Dict[str, list] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            ready[name]()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


# (label as in the README's table, registered name, keyword arguments)
LAYERS = [("s4d", "s4d", {"backend": "auto"}), ("lru (scan, default)", "lru", {"backend": "scan"}),
          ("lru (fft)", "lru", {"backend": "fft"}), ("s4", "s4", {"backend": "auto"})]

# Sizes of each mode: the timed shapes (B, L), H, N, rounds, and the peak-memory forward's
# (B, L, H, N) with the labels of the layers it covers (each a subprocess). Full: the README's table.
ALL = tuple(label for label, _, _ in LAYERS)
SIZES = {
    "full": {"shapes": [(8, 1024), (4, 4096)], "H": 128, "N": 64, "rounds": 15,
             "memory": (1, 65536, 64, 64), "memory_layers": ALL},
    "quick": {"shapes": [(8, 1024)], "H": 128, "N": 64, "rounds": 5,
              "memory": (1, 65536, 64, 64), "memory_layers": ALL},
    "smoke": {"shapes": [(2, 256)], "H": 16, "N": 8, "rounds": 2,
              "memory": (1, 16384, 16, 8), "memory_layers": ("lru (scan, default)",)},
}


def without_kernel_cache(layer: torch.nn.Module) -> torch.nn.Module:
    """``layer`` with its SSM kernels' inference cache off: every forward generates the kernel."""
    from lrnnx_zoo.ssm_kernel import SSMKernel
    for m in layer.modules():
        if isinstance(m, SSMKernel):
            m.cache_inference_kernel = False
    return layer


def shape_times(B: int, L: int, H: int, N: int, rounds: int) -> Dict[str, float]:
    """ms per call: "floor" (rfft+irfft of (B, H, L)), and "<label> fwd" (inference, no autograd),
    "<label> fwd+bwd" and "<label> block" (forward+backward of the layer, GELU and a Linear) for
    every entry of LAYERS, all warm from one interleaved run; "cold <...>" for the floor and the
    forwards from another; "<label> fwd generated" (inference with the kernel cache off) for the
    layers that cache one."""
    u = torch.randn(B, H, L)
    fns: Dict[str, Callable[[], object]] = {"floor": lambda: torch.fft.irfft(torch.fft.rfft(u), n=L)}
    x = torch.randn(B, L, H)
    xg = x.clone().requires_grad_(True)
    for label, name, kw in LAYERS:
        torch.manual_seed(0)
        layer = lrnnx_zoo.create_layer(name, H, d_state=N, **kw)

        def fwd(layer=layer):
            with torch.no_grad():
                return layer(x)
        if name in ("s4d", "s4"):
            torch.manual_seed(0)
            uncached = without_kernel_cache(lrnnx_zoo.create_layer(name, H, d_state=N, **kw))

            def fwd_generated(layer=uncached):
                with torch.no_grad():
                    return layer(x)
            fns[f"{label} fwd generated"] = fwd_generated

        def fwd_bwd(layer=layer):
            layer.zero_grad(set_to_none=True)
            layer(xg).sum().backward()

        # as trained: followed by an activation and a linear layer, which read the layer's output
        # layout (a transposed view made them copy with a row-sized stride, forward and backward)
        linear = torch.nn.Linear(H, H)

        def block_fwd_bwd(layer=layer, linear=linear):
            layer.zero_grad(set_to_none=True)
            linear(torch.nn.functional.gelu(layer(xg))).sum().backward()
        fns[f"{label} fwd"], fns[f"{label} fwd+bwd"], fns[f"{label} block"] = fwd, fwd_bwd, block_fwd_bwd
    times = interleaved_ms(fns, rounds, "warm")
    cold = interleaved_ms({k: f for k, f in fns.items() if k == "floor" or k.endswith(" fwd")}, rounds, "cold")
    return {**times, **{f"cold {k}": t for k, t in cold.items()}}


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(name: str, kw: dict, B: int, L: int, H: int, N: int, cache: bool = True) -> None:
    # default allocator here: a tuned one keeps freed memory, which would hide the true peak
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer(name, H, d_state=N, **kw)
    if not cache:
        without_kernel_cache(layer)
    x = torch.randn(B, L, H)
    with torch.no_grad():
        layer(x[:, :64])  # load code paths and compile kernels before measuring
    # Reset the high-water mark (Linux: writing 5 to clear_refs), so only the forward counts.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_mb("VmRSS")
    with torch.no_grad():
        y = layer(x)
    peak = _rss_mb("VmHWM") - before
    print(json.dumps({"peak_mb": peak, "input_mb": x.numel() * 4 / 2 ** 20, "ok": bool(torch.isfinite(y).all())}))


def peak_memory(name: str, kw: dict, B: int, L: int, H: int, N: int, cache: bool = True) -> dict:
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import bench_layers as b; "
            f"b.peak_memory_child({name!r}, {kw!r}, {B}, {L}, {H}, {N}, {cache})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = ap.add_mutually_exclusive_group()
    modes.add_argument("--quick", action="store_true", help="one shape (B=8, L=1024), 5 rounds; memory as in full")
    modes.add_argument("--smoke", action="store_true", help="tiny sizes, one layer's memory: checks that it runs")
    ap.add_argument("--default-allocator", action="store_true",
                    help="do not call lrnnx_zoo.runtime.tune_allocator (measure page-fault costs too)")
    args = ap.parse_args()
    tuned = False if args.default_allocator else tune_allocator()
    sizes = SIZES["smoke" if args.smoke else "quick" if args.quick else "full"]
    rounds, H, N = sizes["rounds"], sizes["H"], sizes["N"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; H={H}, N={N}, float32, CPU; "
          f"allocator {'tuned (lrnnx_zoo.runtime.tune_allocator)' if tuned else 'default'}; "
          f"medians of {rounds} interleaved rounds; warm: each timed call right after one of itself, cold: "
          f"after {FLUSH_BYTES >> 20} MB written; fwd: inference (no_grad), gen: with the kernel generated\n")
    print(f"{'shape':<14} {'layer':<20} {'fwd ms':>8} {'x floor':>8} {'cold x':>7} {'gen x':>6} {'fwd+bwd ms':>11} "
          f"{'x floor':>8} {'block f+b ms':>13} {'x floor':>8}")
    for B, L in sizes["shapes"]:
        t = shape_times(B, L, H, N, rounds)
        fl, cold_fl = t["floor"], t["cold floor"]
        print(f"{f'B={B} L={L}':<14} {'rfft+irfft floor':<20} {fl:>8.2f} {1.0:>8.2f} {1.0:>7.2f} "
              f"(cold {cold_fl:.2f} ms)")
        for label, _, _ in LAYERS:
            f, fb, blk = t[f"{label} fwd"], t[f"{label} fwd+bwd"], t[f"{label} block"]
            gen = t.get(f"{label} fwd generated", f)       # a layer without a kernel cache generates nothing
            print(f"{'':<14} {label:<20} {f:>8.2f} {f / fl:>8.2f} {t[f'cold {label} fwd'] / cold_fl:>7.2f} "
                  f"{gen / fl:>6.2f} {fb:>11.2f} {fb / fl:>8.2f} {blk:>13.2f} {blk / fl:>8.2f}")
    B, L, H, N = sizes["memory"]
    print(f"\npeak memory of one forward at B={B}, L={L}, H={H}, N={N} "
          f"(rise of peak RSS over the resident set before):")
    for label, name, kw in (layer for layer in LAYERS if layer[0] in sizes["memory_layers"]):
        for cache in ((True, False) if name in ("s4d", "s4") else (True,)):
            m = peak_memory(name, kw, B, L, H, N, cache)
            row = label + ("" if cache else ", no kernel cache")
            print(f"  {row:<36} {m['peak_mb']:8.1f} MB = {m['peak_mb'] / m['input_mb']:5.1f} x input "
                  f"({m['input_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
