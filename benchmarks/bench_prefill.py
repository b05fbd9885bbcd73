"""What reading a prompt costs, per registered family (a benchmark, not a timed test).

Model: 2 blocks, d_model=256, d_state = 16 / 64 / 256, d_input=d_output=16, batch 1 (--batch); a
prompt of 128 steps (--length); S4 bilinear unless --s4-discretization zoh. Columns, each the best of --repeat calls under ``torch.no_grad()``, with the
step forms already built (the first prefill or ``allocate_inference_cache`` of a model builds them,
once per weights: the "first cache" column):
- ``forward``: the convolution-mode forward of the prompt (kernel cached);
- ``prefill``: ``model.prefill(prompt)``, the forward and the state after it;
- ``stepping``: a fresh cache and ``model.step`` through the prompt, what a prefill replaces;
- ratios prefill / forward and stepping / prefill.
``--s4-paths`` also times S4's two ways to the state after the prompt, per layer, side by side: the
squares of its dense float64 A_bar (plugins/s4/dense.advance_state) and stepping its diagonal plus
low-rank form in float64 (advance_state_dplr), with the one ``dplr_state_cheaper`` picks.

    python benchmarks/bench_prefill.py [--families s4 s4d] [--length 128] [--s4-paths]
    python benchmarks/bench_prefill.py --families s4 --batch 16 --s4-discretization zoh
    python benchmarks/bench_prefill.py --smoke      # d_model=16, d_state 4 / 8, 16 steps: that it runs
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List, Optional

import torch

import lrnnx_zoo
from lrnnx_zoo.plugins.s4 import dense
from lrnnx_zoo.runtime import tune_allocator
from lrnnx_zoo.training_cli import positive_int

SIZES = {"full": {"d_model": 256, "d_states": (16, 64, 256), "length": 128, "s4_lengths": (16, 128, 1024, 4096)},
         "smoke": {"d_model": 16, "d_states": (4, 8), "length": 16, "s4_lengths": (4, 16)}}


def best_ms(f: Callable[[], object], repeat: int) -> float:
    """The fastest of ``repeat`` calls after one untimed call, in ms."""
    f()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def build(layer: str, d_model: int, d_state: int, s4_discretization: str = "bilinear") -> lrnnx_zoo.SequenceModel:
    torch.manual_seed(0)
    kwargs = {"d_state": d_state, **({"discretization": s4_discretization} if layer == "s4" else {})}
    cfg = lrnnx_zoo.ModelConfig(layer=layer, d_input=16, d_output=16, d_model=d_model, n_layers=2,
                                layer_kwargs=kwargs, pooling=None)
    return lrnnx_zoo.SequenceModel(cfg).eval()


@torch.no_grad()
def bench_model(layer: str, d_model: int, d_state: int, length: int, repeat: int, batch: int = 1,
                s4_discretization: str = "bilinear") -> Dict[str, float]:
    model = build(layer, d_model, d_state, s4_discretization)
    x = torch.randn(batch, length, 16)
    model(x)                                               # the kernels' lengths are set
    t0 = time.perf_counter()
    model.allocate_inference_cache(batch)                   # builds the step forms, once per weights
    first = (time.perf_counter() - t0) * 1e3

    def stepping() -> None:
        cache = model.allocate_inference_cache(batch)
        for t in range(length):
            model.step(x[:, t], cache)
    r = {"first_ms": first, "forward_ms": best_ms(lambda: model(x), repeat),
         "prefill_ms": best_ms(lambda: model.prefill(x), repeat), "stepping_ms": best_ms(stepping, max(1, repeat // 2))}
    return r


@torch.no_grad()
def bench_s4_paths(d_model: int, d_state: int, length: int, repeat: int) -> Dict[str, object]:
    """ms of one S4 layer's state after ``length`` steps by each path, and the one chosen."""
    torch.manual_seed(0)
    kernel = lrnnx_zoo.create_layer("s4", d_model=d_model, d_state=d_state).eval().kernel
    u = torch.randn(1, d_model, length)
    state = kernel.default_state(1)
    picked = dense.dplr_state_cheaper(1, d_model, d_state, length)
    times = {}
    original = dense.dplr_state_cheaper
    try:
        for name, choice in (("dense_ms", False), ("dplr_ms", True)):
            dense.dplr_state_cheaper = lambda *a, _c=choice: _c
            times[name] = best_ms(lambda: kernel.forward_state(u, state), repeat)
    finally:
        dense.dplr_state_cheaper = original
    return {**times, "picked": "dplr" if picked else "dense"}


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=["s4", "s4d", "fftconv", "lru"])
    p.add_argument("--length", type=positive_int, default=None, help="prompt length (default 128; smoke 16)")
    p.add_argument("--repeat", type=positive_int, default=3)
    p.add_argument("--s4-paths", action="store_true", help="also time S4's dense and DPLR state paths per layer")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--batch", type=positive_int, default=1, help="prompts read at once (default 1)")
    p.add_argument("--s4-discretization", choices=["bilinear", "zoh"], default="bilinear")
    args = p.parse_args(argv)
    sizes = SIZES["smoke" if args.smoke else "full"]
    length = args.length or sizes["length"]
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()
    print(f"prompt of {length} steps, batch {args.batch}, 2 blocks, s4 {args.s4_discretization}, d_model={sizes['d_model']}, {torch.get_num_threads()} "
          f"threads; ms, best of {args.repeat}")
    print(f"{'family':10s} {'d_state':>7s} {'first cache':>11s} {'forward':>8s} {'prefill':>8s} {'stepping':>9s} "
          f"{'prefill/forward':>15s} {'stepping/prefill':>16s}")
    for layer in args.families:
        for d_state in sizes["d_states"]:
            r = bench_model(layer, sizes["d_model"], d_state, length, args.repeat, args.batch, args.s4_discretization)
            print(f"{layer:10s} {d_state:7d} {r['first_ms']:11.1f} {r['forward_ms']:8.1f} {r['prefill_ms']:8.1f} "
                  f"{r['stepping_ms']:9.1f} {r['prefill_ms'] / r['forward_ms']:15.2f} "
                  f"{r['stepping_ms'] / r['prefill_ms']:16.2f}", flush=True)
    if args.s4_paths:
        print()
        print(f"S4 state after L steps, one layer, d_model={sizes['d_model']}, batch 1 (ms)")
        print(f"{'d_state':>7s} {'L':>6s} {'dense squares':>13s} {'DPLR steps':>10s} {'picked':>7s} {'dense / DPLR':>12s}")
        for d_state in sizes["d_states"]:
            for L in sizes["s4_lengths"]:
                r = bench_s4_paths(sizes["d_model"], d_state, L, args.repeat)
                print(f"{d_state:7d} {L:6d} {r['dense_ms']:13.1f} {r['dplr_ms']:10.1f} {r['picked']:>7s} "
                      f"{r['dense_ms'] / r['dplr_ms']:12.2f}", flush=True)


if __name__ == "__main__":
    main()
