"""A long-lived server: what repeated loads, exports, streams and failures leave behind.

Each test repeats an operation a server does thousands of times, or runs two at once from two
threads, and checks that memory does not grow with the count and that process-wide state (sys.stderr,
the warnings filters, logger levels) is as it was. Allocations are counted with tracemalloc (Python's
own allocator: exact, unlike RSS, which the allocator's caching blurs); the thresholds are a fraction
of what the defect added, over iteration counts kept small for speed.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import tracemalloc
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from lrnnx_zoo import hub


def traced_growth(run: Callable[[], object], times: int, warm_up: int = 5) -> int:
    """Bytes of Python memory that ``times`` calls of ``run`` add to what ``warm_up`` calls made while
    tracing hold (one-time caches and free lists fill during the warm-up, inside the trace)."""
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(warm_up):
            run()
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(times):
            run()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_reading_a_weights_file_again_and_again_keeps_no_memory(tmp_path: Path) -> None:
    # safetensors' default (mmap) reader kept ~56 B of Python memory per tensor read (and ~12 kB of the
    # process per load of the 46-tensor digits checkpoint: +12 MB RSS per 1000 from_pretrained calls).
    # 20 reads of 500 tensors kept ~560 kB; now ~0 (the bound, 50 kB, is a tenth of the old growth).
    path = tmp_path / "model.safetensors"
    save_file({f"w{i}": torch.full((2,), float(i)) for i in range(500)}, str(path))
    assert hub._read_weights(path)["w7"].tolist() == [7.0, 7.0]
    assert traced_growth(lambda: hub._read_weights(path), 20) < 50_000


def test_exports_in_two_threads_leave_stderr_warnings_and_loggers_as_they_were() -> None:
    # An export swaps process-wide state while it traces (sys.stderr held back, the warnings filters and
    # hook recording, the exporters' loggers muted) and restores what it found on entry. Two server
    # threads' exports overlapping without nesting (A in, B in, A out, B out) restored each other's:
    # sys.stderr stayed A's StringIO for good (every later write of the process kept in memory, none
    # shown), the filters "always", the loggers muted. Now the second export waits for the first.
    # A holds its export open until B has entered its own (at once, before) or 1 s has passed (B waits).
    from lrnnx_zoo.export.onnx_export import _quiet
    from lrnnx_zoo.export.step_graph import tracing
    stderr, filters = sys.stderr, list(warnings.filters)
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def export(first: bool) -> None:
        if not first:
            a_in.wait(10)
        with _quiet([]), tracing(torch.nn.Linear(1, 1), "test"):
            if first:
                a_in.set()
                b_in.wait(1.0)
            else:
                b_in.set()
                a_out.wait(10)
        if first:
            a_out.set()

    threads = [threading.Thread(target=export, args=(first,)) for first in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sys.stderr is stderr
    assert warnings.filters == filters and onnx_log.level == level


def test_loading_a_torchscript_graph_beside_an_export_leaves_the_warnings_filters_as_they_were(
        tmp_path: Path, monkeypatch) -> None:
    # load_torchscript (export_folder's latency run, a server's own loads) silences torch.jit's deprecation
    # warning with catch_warnings, which restores the filters and hook it found: entered during another
    # thread's export and left after it, it put back the export's "always" filters and recording hook,
    # so every later warning of the process was appended to that export's list and never shown.
    from lrnnx_zoo.export import torchscript_export
    from lrnnx_zoo.export.onnx_export import _quiet
    path = tmp_path / "m.ts"
    torch.jit.save(torch.jit.script(torch.nn.Linear(1, 1)), str(path))
    filters, hook = list(warnings.filters), getattr(warnings, "_showwarnmsg_impl", None)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    load = torch.jit.load

    def slow_load(*args, **kwargs):                # holds the load open until the export is over
        b_in.set()
        a_out.wait(10)
        return load(*args, **kwargs)
    monkeypatch.setattr(torch.jit, "load", slow_load)

    def export() -> None:
        with _quiet([]):
            a_in.set()
            b_in.wait(1.0)                         # the load starts inside the export (before) or waits (now)
        a_out.set()

    def load_graph() -> None:
        a_in.wait(10)
        torchscript_export.load_torchscript(path)

    threads = [threading.Thread(target=export), threading.Thread(target=load_graph)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert warnings.filters == filters and getattr(warnings, "_showwarnmsg_impl", None) is hook
