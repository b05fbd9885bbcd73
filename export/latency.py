"""Per-step latency of a step graph: median over many single steps, after a warm-up."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import numpy as np
import torch

from .options import DEFAULT_STEPS
from .runtime import OnnxStreamer
from .validate import one_torch_thread

WARMUP_STEPS = 50


def time_steps(step: Callable[[], Any], steps: int = DEFAULT_STEPS, warmup: int = WARMUP_STEPS) -> Dict[str, float]:
    """Time ``steps`` calls of ``step()`` one by one; returns median / p10 / p90 in microseconds."""
    for _ in range(warmup):
        step()
    times = np.empty(steps)
    clock = time.perf_counter
    for i in range(steps):
        t0 = clock()
        step()
        times[i] = clock() - t0
    us = times * 1e6
    return {"median_us": float(np.median(us)), "p10_us": float(np.percentile(us, 10)),
            "p90_us": float(np.percentile(us, 90)), "steps": steps}


def interleaved_steps(steps_by_name: Dict[str, Callable[[], Any]], steps: int = DEFAULT_STEPS,
                      rounds: int = 10, warmup: int = WARMUP_STEPS) -> Dict[str, float]:
    """Median single-step time (us) of each callable, timed in ``rounds`` turns of steps/rounds
    steps each, so that a shared machine's drift in speed moves every figure alike (ratios
    between runtimes are then from the same moments)."""
    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
    per_round = max(1, steps // rounds)
    times: Dict[str, list] = {k: [] for k in steps_by_name}
    clock = time.perf_counter
    for _ in range(rounds):
        for name, step in steps_by_name.items():
            for _ in range(per_round):
                t0 = clock()
                step()
                times[name].append(clock() - t0)
    return {k: float(np.median(v)) * 1e6 for k, v in times.items()}


def calls_for(steps: int, chunk: Optional[int]) -> int:
    """Calls that time ``steps`` time steps of a graph taking ``chunk`` per call (at least 10)."""
    return steps if not chunk else max(10, steps // chunk)


def per_step(out: Dict[str, Any], chunk: Optional[int]) -> Dict[str, Any]:
    """A latency record of a chunk graph: its median per call (``median_us``, one chunk) with
    ``chunk`` and ``per_step_us`` (the median over its steps) beside."""
    if chunk:
        out.update(chunk=chunk, per_step_us=out["median_us"] / chunk)
    return out


def onnx_latency(path: Union[str, Path], batch: Optional[int] = 1, steps: int = DEFAULT_STEPS,
                 intra_op_threads: int = 1) -> Dict[str, Any]:
    """Per-step latency of an ONNX step graph through :class:`OnnxStreamer` (random inputs); of a
    chunk graph, per call (one chunk) over about ``steps`` steps, with the per-step figure beside."""
    streamer = OnnxStreamer(path, intra_op_threads=intra_op_threads)
    batch = streamer.fixed_batch or batch or 1
    streamer.reset(batch)
    shape = (batch,) + ((streamer.chunk,) if streamer.chunk else ()) + (streamer.d_input,)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out = time_steps(lambda: streamer.step(x), calls_for(steps, streamer.chunk))
    out.update(runtime="onnxruntime (OnnxStreamer, IOBinding)", batch=batch, threads=intra_op_threads)
    return per_step(out, streamer.chunk)


@torch.no_grad()
def torch_latency(module: Callable[[torch.Tensor, torch.Tensor], Any], d_input: int, state_size: int,
                  batch: int = 1, steps: int = DEFAULT_STEPS, runtime: str = "torch",
                  chunk: Optional[int] = None) -> Dict[str, Any]:
    """Per-step latency of a torch callable (x_t, state) -> (y_t, state'), single-threaded; of a
    chunk module (x (batch, chunk, d_input)), per call, with the per-step figure beside."""
    shape = (batch,) + ((chunk,) if chunk else ()) + (d_input,)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    holder = [torch.zeros(batch, state_size, dtype=torch.float32)]

    def one() -> None:
        _, holder[0] = module(x, holder[0])

    with one_torch_thread():
        out = time_steps(one, calls_for(steps, chunk))
    out.update(runtime=runtime, batch=batch, threads=1)
    return per_step(out, chunk)
