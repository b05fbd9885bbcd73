"""Process-wide state that the library's per-call code must leave to its caller's other threads.

A server runs loads, forwards and exports from several threads at once. torch's intra-op thread count
is per thread, but torch.set_num_threads also sets the process default that each thread takes at its
first torch call; one_torch_thread (validation streams, latency runs, the demo) must change only its
own thread's count. The warnings filters are the process's: a load (ModelConfig, from_pretrained) must
not swap them, since swaps from two threads that do not nest restore each other's. (Its shape probes
still fork the global random generator, so that a model built next draws as it would have: building
them on the meta device instead, which draws nothing, imported sympy on a process's first load.)
"""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path
from typing import Callable, Iterator, List

import pytest
import torch

from lrnnx_zoo.export.validate import one_torch_thread


def in_new_thread(work: Callable[[], int]) -> int:
    """What ``work()`` returns in a thread started now (its torch count taken from the process default)."""
    out: List[int] = []
    t = threading.Thread(target=lambda: out.append(work()))
    t.start()
    t.join(30)
    return out[0]


def process_default() -> int:
    """The thread count a thread starting now gets."""
    return in_new_thread(torch.get_num_threads)


@pytest.fixture
def two_threads() -> Iterator[None]:
    """This thread and the process default at 2 (not 1, so a leaked 1 shows), put back afterwards."""
    mine, default = torch.get_num_threads(), process_default()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(mine)
    in_new_thread(lambda: (torch.set_num_threads(default), 0)[1])


def test_a_thread_started_during_one_torch_thread_gets_the_process_count(two_threads: None) -> None:
    # one_torch_thread's set_num_threads(1) also made 1 the process default while it ran: a thread whose
    # first torch call fell in that window (a server's new worker, a thread pool growing) ran
    # single-threaded for good (old: 1 inside the window; now: 2, the process's).
    inside, done = threading.Event(), threading.Event()
    seen: List[int] = []

    def measure() -> None:
        with one_torch_thread():
            seen.append(torch.get_num_threads())
            inside.set()
            done.wait(10)
        seen.append(torch.get_num_threads())

    t = threading.Thread(target=measure)
    t.start()
    inside.wait(10)
    try:
        during = process_default()
    finally:
        done.set()
        t.join(30)
    assert seen == [1, 2]                          # the caller's own: 1 inside, its count after
    assert during == 2 and torch.get_num_threads() == 2


def test_one_torch_thread_in_a_worker_keeps_the_count_another_thread_set(two_threads: None) -> None:
    # A server exports from a worker thread (count 2) after its main thread set 3: leaving
    # one_torch_thread put the worker's 2 back as the process default (old: threads started after it
    # got 2; now: 3, as set).
    ready, go = threading.Event(), threading.Event()

    def worker() -> None:
        torch.get_num_threads()                    # the worker's count is taken now: 2
        ready.set()
        go.wait(10)
        with one_torch_thread():
            pass

    t = threading.Thread(target=worker)
    t.start()
    ready.wait(10)
    torch.set_num_threads(3)
    go.set()
    t.join(30)
    assert process_default() == 3 and torch.get_num_threads() == 3


def test_overlapping_one_torch_threads_leave_the_process_count_as_it_was(two_threads: None) -> None:
    # Two threads' runs overlapping without nesting (A in, B in, A out, B out), B's first torch call
    # inside A's: B read 1 as its count before, and put it back last, as the process default
    # (old: every thread started afterwards ran single-threaded; now: 2).
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with one_torch_thread():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def second() -> None:
        a_in.wait(10)
        with one_torch_thread():
            b_in.set()
            a_out.wait(10)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert process_default() == 2 and torch.get_num_threads() == 2


def probe_held_open(monkeypatch, inside: threading.Event, release: threading.Event) -> None:
    """Hold ModelConfig's first probe layer build open until ``release`` (``inside`` set meanwhile)."""
    from lrnnx_zoo import models
    create = models.create_layer

    def slow_create(*args, **kwargs):
        if not inside.is_set():
            inside.set()
            release.wait(10)
        return create(*args, **kwargs)
    monkeypatch.setattr(models, "create_layer", slow_create)


def large_state_config():
    """A config whose d_state is past the probes, so layer_shapes builds them."""
    from lrnnx_zoo.models import ModelConfig
    return ModelConfig(layer="s4d", d_input=1, d_output=2, d_model=4, n_layers=1, layer_kwargs={"d_state": 64})


def test_a_load_overlapping_a_warnings_swap_leaves_the_filters_as_they_were(monkeypatch) -> None:
    # ModelConfig's probes silenced their warnings with catch_warnings, which restores the filters it
    # found: a load (ignore all) overlapping another thread's catch_warnings without nesting (an export's,
    # a caller's) had its "ignore" put back by the other's exit, and every later warning of the process
    # was dropped (old: an 'ignore' filter left first; now: the filters as they were).
    inside, release = threading.Event(), threading.Event()
    probe_held_open(monkeypatch, inside, release)
    config = large_state_config()
    filters = list(warnings.filters)
    load = threading.Thread(target=config.layer_shapes)
    load.start()
    inside.wait(10)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        release.set()
        load.join(30)
    assert warnings.filters == filters
    with pytest.warns(UserWarning):
        warnings.warn("shown", UserWarning)


def quantize_held_open(monkeypatch, inside: threading.Event, release: threading.Event) -> Callable[[], None]:
    """A quantize_int8 call (to run in a thread) whose onnxruntime quantize_dynamic logs its advice to
    the root logger as onnxruntime's does, waits for ``release`` (``inside`` set meanwhile), then fails."""
    import onnxruntime.quantization as ortq
    from onnx import TensorProto, helper

    from lrnnx_zoo.export.quantize import quantize_int8
    advice = compile("import logging\nlogging.warning('Please consider to run pre-processing')",
                     ortq.__file__, "exec")     # logged from onnxruntime's file, as its quantizer does

    def slow_quantize(*args, **kwargs):
        exec(advice, {})
        inside.set()
        release.wait(10)
        raise RuntimeError("stand-in quantizer: nothing written")
    monkeypatch.setattr(ortq, "quantize_dynamic", slow_quantize)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    proto = helper.make_model(graph)

    def run() -> None:
        try:
            quantize_int8(Path("unused.onnx"), Path("unused-int8.onnx"), {}, proto)
        except RuntimeError:
            pass
    return run


def test_an_int8_export_leaves_the_root_logger_to_other_threads(monkeypatch, caplog) -> None:
    # quantize_int8 set the root logger's level to ERROR while onnxruntime quantised and put back the
    # level it found: meanwhile every other thread's warnings to loggers inheriting root's level were
    # dropped (old: a server's logger not enabled for WARNING), and a level another thread set
    # meanwhile was undone (old: root back at WARNING). Now only the quantizer's own records are dropped.
    inside, release = threading.Event(), threading.Event()
    run = quantize_held_open(monkeypatch, inside, release)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        with caplog.at_level(logging.DEBUG, logger="lrnnx-test-capture"):    # the handler takes all
            t = threading.Thread(target=run)
            t.start()
            inside.wait(10)
            server_enabled = logging.getLogger("lrnnx-test-server").isEnabledFor(logging.WARNING)
            root.setLevel(logging.INFO)
            release.set()
            t.join(30)
        after = root.level
    finally:
        root.setLevel(level)
    assert server_enabled and after == logging.INFO
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()]   # the advice stays quiet


def test_two_training_runs_in_two_threads_leave_the_deterministic_mode_and_generator_as_they_were(
        monkeypatch) -> None:
    # train() sets torch's deterministic-algorithms mode and forks the global generator for its run (both
    # process-wide), each putting back what it found: two runs overlapping without nesting (A in, B in,
    # A out, B out) put back each other's (old: deterministic mode on for good, and the caller's draws
    # after them from A's seeded stream). Now the second run waits for the first.
    pytest.importorskip("sklearn")                 # the digits ship with scikit-learn
    from lrnnx_zoo import training
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    class Stop(Exception):
        pass

    def held_run(*args, **kwargs):                 # A holds its run open until B is in its own (before) or 1 s
        torch.manual_seed(99)
        if not a_in.is_set():
            a_in.set()
            b_in.wait(1.0)
        else:
            b_in.set()
            a_out.wait(10)
        raise Stop

    monkeypatch.setattr(training, "_run", held_run)

    def run(first: bool) -> None:
        if not first:
            a_in.wait(10)
        try:
            training.train("digits-tiny", progress=False)
        except Stop:
            pass
        if first:
            a_out.set()

    mode = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    threads = [threading.Thread(target=run, args=(first,)) for first in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) == mode
    assert torch.equal(torch.rand(3), expected)
