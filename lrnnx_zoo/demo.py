"""``python -m lrnnx_zoo.demo`` (``bash scripts/demo.sh``): DESCRIPTION below says what it does."""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import torch

from . import from_pretrained, list_models
from .cli import escaped_output
from .runtime import tune_allocator
from .training import MissingDependencyError, checkpoint_data, evaluate, score
from .training_cli import Terminated, positive_int, stop_signals_raise
from .utf8 import expand_home

DEFAULT = "forecast-sunspots-s4d"
#: What ``--help`` says: a constant, not the module docstring, which ``python -OO`` strips (the help
#: then had no description).
DESCRIPTION = """\
The main job: a shipped checkpoint from load to edge.

1. load it (``from_pretrained``) and evaluate it on the split its config records;
2. export it to an ONNX step graph (validated against the PyTorch model before it is written);
3. stream the whole evaluation set through ONNX Runtime one step at a time from a zero state;
4. print the parity between the streamed and the PyTorch outputs, both scores, a stream
   continued in ONNX Runtime from a prompt read by ``model.prefill``, and the per-step latency
   at batch 1 against the PyTorch model's own eager step;
5. export a chunk graph (32 steps per call) and print its parity with the step stream and its
   latency per step.
"""


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def _file_stem(name: str) -> str:
    """The stem of a checkpoint's .onnx files in --out: a folder's own name, a Hub id's "org--name".
    The name itself was joined to --out, so a folder given as an absolute path or through ".." wrote
    its graphs next to the checkpoint, outside --out, and a Hub id into a subfolder of it."""
    try:
        path = expand_home(name)
        if path.is_dir():
            return path.resolve().name or "checkpoint"
    except (OSError, ValueError):       # an unreadable folder, "~user" of no user: loading it says what is wrong
        pass
    return re.sub(r"[\\/:]+", "--", name.strip("\\/")) or "checkpoint"


def _file_stems(names: List[str]) -> List[str]:
    """:func:`_file_stem` of each of ``names``, one of its own each: a later name whose graphs would take
    an earlier one's file names (runs/exp1/final and runs/exp2/final, both "final"; a case apart only,
    which is one name on Windows and macOS) gets "-2", "-3", ... ("final-2")."""
    taken: set = set()
    stems = []
    for name in names:
        base = stem = _file_stem(name)
        files, n = {f.casefold() for f in _graph_files(stem)}, 1
        while files & taken:
            n += 1
            stem = f"{base}-{n}"
            files = {f.casefold() for f in _graph_files(stem)}
        taken |= files
        stems.append(stem)
    return stems


def _graph_files(stem: str) -> List[str]:
    """The names of the files :func:`run` writes into --out for a checkpoint of file stem ``stem``."""
    return [f"{stem}.onnx", f"{stem}-chunk{CHUNK}.onnx"]


def run(name: str, out_dir: Path, steps: int, stem: Optional[str] = None) -> int:
    """Load checkpoint ``name``, evaluate it, export its step and chunk graphs into ``out_dir`` as
    ``stem``.onnx and ``stem``-chunk32.onnx (default :func:`_file_stem` of the name) and check them."""
    from .export import OnnxStreamer, to_onnx
    from .export.latency import time_steps
    from .export.validate import one_torch_thread

    print(f"== {name}")
    model = from_pretrained(name)
    info = model.checkpoint_info
    data = checkpoint_data(info)
    print(f"loaded: {info['family']} model, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"task {info['task']}, data {info['dataset']['name']}")
    print(f"model card : {_fmt(info['metrics'])}")
    t = time.perf_counter()
    pytorch = evaluate(model, data)
    print(f"evaluated  : {_fmt(pytorch)}  ({len(data.x_test)} test sequences, {time.perf_counter() - t:.1f} s)")

    t = time.perf_counter()
    stem = stem or _file_stem(name)
    graph, chunk_graph = _graph_files(stem)
    result = to_onnx(model, out_dir / graph)
    print(f"exported   : {result.path} ({Path(result.path).stat().st_size / 1024:.0f} KiB, "
          f"state_size={result.state_size}, {time.perf_counter() - t:.1f} s)")
    print(f"validated  : {result.validation}")

    streamer = OnnxStreamer(result.path)
    x = data.x_test.numpy()
    t = time.perf_counter()
    streamed = torch.from_numpy(streamer.run(x))
    stepped = streamed.numpy()           # every step's output, for the chunk graph's parity
    n_steps = x.shape[0] * x.shape[1]
    print(f"streamed   : {x.shape[0]} sequences x {x.shape[1]} steps through ONNX Runtime "
          f"({time.perf_counter() - t:.1f} s)")
    compared = f"every output of the {n_steps} steps"
    if data.task == "sequence-classification":
        streamed = streamed[:, -1]   # the last step's output is the whole sequence's logits
        compared = f"the {x.shape[0]} sequences' logits (their last step's outputs; {n_steps} steps streamed)"
    with torch.no_grad():
        reference = model(data.x_test)
    parity = (streamed - reference).abs().max().item()
    onnx_scores = score(streamed, data)
    print(f"parity     : max |ONNX stream - PyTorch forward| = {parity:.2e} over {compared}")
    print(f"ONNX score : {_fmt(onnx_scores)}")
    handover = _prefill_then_stream(model, result.path, x)

    streamer.reset(1)
    x1 = x[:1, 0]
    onnx_us = time_steps(lambda: streamer.step(x1), steps)["median_us"]
    cache = model.allocate_inference_cache(1)
    xt = torch.from_numpy(x1)
    with torch.no_grad(), one_torch_thread():   # one stream of tiny steps, as ONNX Runtime runs it
        eager_us = time_steps(lambda: model.step(xt, cache), steps)["median_us"]
    print(f"latency    : {onnx_us:.1f} us/step ONNX Runtime vs {eager_us:.1f} us/step eager PyTorch "
          f"at batch 1 ({eager_us / onnx_us:.1f}x)")
    chunked = _chunk_graph(model, out_dir / chunk_graph, x, stepped, onnx_us, steps)
    ok = parity < 1e-4 and handover < 1e-4 and chunked < 1e-4
    print("result     : " + ("OK" if ok else "PARITY FAILED") + "\n")
    return 0 if ok else 1


CHUNK = 32


def _chunk_graph(model, path: Path, x, stepped, step_us: float, steps: int) -> float:
    """Export a chunk graph of CHUNK steps per call, stream the sequences' whole chunks through it
    and time it at batch 1; returns max |chunk stream - step stream|."""
    import numpy as np
    from .export import OnnxStreamer, to_onnx
    from .export.latency import time_steps

    result = to_onnx(model, path, chunk=CHUNK)
    streamer = OnnxStreamer(result.path)
    n = x.shape[1] // CHUNK * CHUNK
    diff = float(np.abs(streamer.run(x[:, :n]) - stepped[:, :n]).max()) if n else 0.0
    streamer.reset(1)
    frame = np.random.default_rng(0).standard_normal((1, CHUNK, x.shape[2])).astype(np.float32)
    us = time_steps(lambda: streamer.step(frame), max(steps // CHUNK, 20))["median_us"] / CHUNK
    print(f"chunked    : {us:.2f} us/step through a chunk graph of {CHUNK} steps per call ({step_us / us:.1f}x the "
          f"step graph; {Path(result.path).stat().st_size / 1024:.0f} KiB); max |chunk - step stream| = {diff:.2e} "
          f"over {x.shape[0] * n} steps")
    return diff


def _prefill_then_stream(model, graph, x) -> float:
    """Read the first half of each test sequence with ``model.prefill`` (one convolution-mode pass),
    hand its state to a fresh ONNX stream and stream the second half; returns the largest difference
    from streaming every step in ONNX Runtime."""
    from .export import OnnxStreamer, state_from_cache

    half = x.shape[1] // 2
    t = time.perf_counter()
    with torch.no_grad():
        _, cache = model.prefill(torch.from_numpy(x[:, :half]))
    prefill_s = time.perf_counter() - t
    whole, resumed = OnnxStreamer(graph), OnnxStreamer(graph)
    expected = whole.run(x)[:, half:]
    resumed.reset(x.shape[0])
    resumed.state = state_from_cache(model, cache)
    error = float(abs(resumed.run(x[:, half:]) - expected).max())
    print(f"prefill    : first {half} steps of each sequence read by model.prefill ({prefill_s * 1e3:.0f} ms), "
          f"the rest streamed in ONNX Runtime from its state: max |difference| = {error:.2e}")
    return error


def main(argv=None) -> int:
    # prog: argparse's default is the file's name, 'demo.py', which no command runs
    ap = argparse.ArgumentParser(prog="python -m lrnnx_zoo.demo", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="*", default=[DEFAULT],
                    help=f"shipped names, folders or Hub ids (default {DEFAULT}; 'all' for every shipped one)")
    ap.add_argument("--out", type=Path, default=None, help="where to write the .onnx files (default: a temp dir)")
    ap.add_argument("--steps", type=positive_int, default=2000, help="steps timed for the latency figure")
    args = ap.parse_args(argv)
    if args.out is not None:                  # a file there was a FileExistsError traceback from mkdir
        from .export.paths import check_output
        args.out = args.out.expanduser()
        try:
            check_output(args.out, "--out", folder=True)
        except OSError as exc:
            ap.error(str(exc))
    tune_allocator()
    names = list_models() if args.checkpoints == ["all"] else args.checkpoints
    try:
        # SIGTERM (`timeout`, a scheduler) or SIGHUP (the terminal closed) killed the demo outright and
        # left its temporary folder of .onnx files (2-30 MB) in /tmp: now raised, so the folder goes.
        # escaped_output: a path with a character stdout's encoding lacks (a Windows user folder "Łukasz"
        # under a cp1252 stdout redirected to a file) failed the print with UnicodeEncodeError, a
        # ValueError, which _run_or_report then showed as the checkpoint's error, and the demo did not run
        with escaped_output(), stop_signals_raise(), tempfile.TemporaryDirectory() as tmp:
            out = args.out or Path(tmp)
            out.mkdir(parents=True, exist_ok=True)
            return max(_run_or_report(name, out, args.steps, stem) for name, stem in zip(names, _file_stems(names)))
    except KeyboardInterrupt:   # Ctrl-C (the demo runs for a while): one line and 128 + SIGINT, as lrnnx-zoo does
        print("demo: interrupted", file=sys.stderr)
        return 130
    except Terminated as stop:  # as lrnnx-zoo's commands: one line and 128 + the signal
        print(f"demo: terminated by {stop.name}", file=sys.stderr)
        return 128 + stop.signum


def _run_or_report(name: str, out_dir: Path, steps: int, stem: Optional[str] = None) -> int:
    """run(), with the user's mistakes (an unknown name, a checkpoint with no recorded data split,
    a model that cannot stream, the digits without scikit-learn) reported in one line: CheckpointError
    and ExportError are ValueErrors, as is checkpoint_data's refusal; a missing optional package is a
    MissingDependencyError, which says what to install (it was a chained traceback). The other
    checkpoints still run."""
    try:
        return run(name, out_dir, steps, stem)
    except (ValueError, MissingDependencyError) as exc:
        print(f"error: {name}: {exc}\n", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
