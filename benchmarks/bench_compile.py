"""Training step and inference forward with torch.compile (inductor) vs eager, per built-in family,
from one run.

Model: a SequenceModel of 2 blocks, d_model=128, d_state=64, on (B, L, 16) inputs, mean-pooled to
10 classes; one step = forward, cross-entropy, backward, AdamW update. Each family is compiled
once (the compile time is printed), then eager and compiled steps are timed in interleaved rounds
(export.latency.interleaved_steps), so the machine's drift moves both alike. max |diff| is the
largest difference between the compiled and the eager training forward (the graph that is timed).
The second table times the same model's inference forward (eval mode, torch.no_grad()), where the
convolution families reuse their kernel's spectrum, eager and compiled alike (SSMKernel.spectrum).

    python benchmarks/bench_compile.py [--B 8] [--L 1024] [--rounds 10] [--families s4d lru] [--backend inductor]
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Callable, List, Union

import torch

import lrnnx_zoo
from lrnnx_zoo.export.latency import interleaved_steps
from lrnnx_zoo.runtime import tune_allocator
from lrnnx_zoo.training_cli import positive_int  # argparse type: 0 was a crash, not a usage error


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               target: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        opt.step()
    return step


def bench_family(layer: str, B: int, L: int, rounds: int, backend: Union[str, Callable] = "inductor") -> dict:
    """Compile time (s), eager and compiled training-step medians (ms), and the largest difference of
    the compiled forward from the eager one, for a model of ``layer`` on (B, L, 16) inputs."""
    # Every model shares SequenceModel.forward's code: past 8 graphs (the 8th model of a run) dynamo
    # stopped compiling it and the last family ran eagerly on the compiled side.
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = lrnnx_zoo.ModelConfig(layer=layer, d_input=16, d_output=10, d_model=128, n_layers=2,
                                layer_kwargs={"d_state": 64}, pooling="mean")
    eager = lrnnx_zoo.SequenceModel(cfg)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend=backend)
    x, target = torch.randn(B, L, 16), torch.randint(0, 10, (B,))
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3)
    opt_c = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    start = time.perf_counter()
    train_step(compiled, opt_c, x, target)()      # compiles forward and backward
    compile_s = time.perf_counter() - start
    # The agreement of the graph that is timed: the training forward, with autograd. Under no_grad
    # dynamo compiled a second (inference) graph for this check alone, its time unreported, and the
    # eager side took the inference path (cached spectrum, blocked convolution) the step never runs.
    agree = float((compiled(x) - twin(x)).detach().abs().max())
    t = interleaved_steps({"eager": train_step(eager, opt_e, x, target),
                           "compiled": train_step(compiled, opt_c, x, target)},
                          steps=rounds, rounds=rounds, warmup=2)
    return {"compile_s": compile_s, "eager_ms": t["eager"] / 1e3, "compiled_ms": t["compiled"] / 1e3,
            "agree": agree}


def bench_inference(layer: str, B: int, L: int, rounds: int, backend: Union[str, Callable] = "inductor") -> dict:
    """Compile time (s), eager and compiled inference-forward medians (ms) and their largest
    difference, for the model of :func:`bench_family` in eval mode under torch.no_grad()."""
    torch._dynamo.reset()                       # as in bench_family
    torch.manual_seed(0)
    cfg = lrnnx_zoo.ModelConfig(layer=layer, d_input=16, d_output=10, d_model=128, n_layers=2,
                                layer_kwargs={"d_state": 64}, pooling="mean")
    eager = lrnnx_zoo.SequenceModel(cfg).eval()
    compiled = torch.compile(copy.deepcopy(eager), backend=backend)
    x = torch.randn(B, L, 16)
    with torch.no_grad():
        start = time.perf_counter()
        got = compiled(x)
        compile_s = time.perf_counter() - start
        agree = float((got - eager(x)).abs().max())
        t = interleaved_steps({"eager": lambda: eager(x), "compiled": lambda: compiled(x)},
                              steps=rounds, rounds=rounds, warmup=2)
    return {"compile_s": compile_s, "eager_ms": t["eager"] / 1e3, "compiled_ms": t["compiled"] / 1e3,
            "agree": agree}


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=positive_int, default=8, help="batch size (default 8)")
    ap.add_argument("--L", type=positive_int, default=1024, help="sequence length (default 1024)")
    ap.add_argument("--rounds", type=positive_int, default=10, help="interleaved rounds timed (default 10)")
    ap.add_argument("--families", nargs="*", default=["fftconv", "lru", "s4", "s4d"], choices=lrnnx_zoo.list_layers(),
                    help="layers to compare (default: the four built-in families)")
    ap.add_argument("--backend", default="inductor",
                    help="torch.compile backend (default inductor, which the README's table used; "
                         "aot_eager compiles in seconds, for a quick check that the script runs)")
    args = ap.parse_args(argv)
    tune_allocator()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; training step at B={args.B}, "
          f"L={args.L}, 2 blocks, d_model=128, d_state=64; torch.compile backend {args.backend}; "
          f"medians of {args.rounds} interleaved rounds\n")
    print(f"{'family':<9} {'compile s':>9} {'eager ms':>9} {'compiled ms':>12} {'speed-up':>9} {'max |diff|':>11}")
    for layer in args.families:
        r = bench_family(layer, args.B, args.L, args.rounds, args.backend)
        print(f"{layer:<9} {r['compile_s']:>9.1f} {r['eager_ms']:>9.2f} {r['compiled_ms']:>12.2f} "
              f"{r['eager_ms'] / r['compiled_ms']:>8.2f}x {r['agree']:>11.1e}")
    print("\nThe same model and input, inference forward (eval mode, torch.no_grad()):\n")
    print(f"{'inference':<9} {'compile s':>9} {'eager ms':>9} {'compiled ms':>12} {'speed-up':>9} {'max |diff|':>11}")
    for layer in args.families:
        r = bench_inference(layer, args.B, args.L, args.rounds, args.backend)
        print(f"{layer:<9} {r['compile_s']:>9.1f} {r['eager_ms']:>9.2f} {r['compiled_ms']:>12.2f} "
              f"{r['eager_ms'] / r['compiled_ms']:>8.2f}x {r['agree']:>11.1e}")


if __name__ == "__main__":
    main()
