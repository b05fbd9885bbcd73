"""Process-wide state the library must leave to the application around it (a threaded server, a notebook).

What the library silences or records for itself (an export's upstream warnings, ModelConfig's probes,
torch.jit's deprecation warnings on load, a command's warning lines) is the calling thread's
only: ``warnings.catch_warnings`` swapped the process's filters and showwarning, so another thread's
warnings went into an export's result (never shown) or were ignored while it ran, and a filter set
meanwhile was undone on exit. A load does not move the caller's random stream, and an int8 export does
not leave onnxruntime's implicit root handler behind.

Each threaded test holds the library's context open in a worker with events (no sleeps, no timing):
the main thread acts only while the worker is known to be inside.
"""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path
from typing import Callable, ContextManager, List, Tuple

import pytest
import torch

from lrnnx_zoo.thread_warnings import this_threads_warnings


class Held:
    """Run ``work(hold)`` in a worker thread, whose ``hold()`` (called inside the library's context) waits
    until the ``with`` block is left: the block runs while the worker is known to be inside."""

    def __init__(self, work: Callable[[Callable[[], None]], object]) -> None:
        self.entered, self.go = threading.Event(), threading.Event()
        self.errors: List[BaseException] = []

        def hold() -> None:
            self.entered.set()
            self.go.wait(30)

        def run() -> None:
            try:
                work(hold)
            except BaseException as exc:    # noqa: BLE001 -- reported by the test
                self.errors.append(exc)
            finally:
                self.entered.set()
        self.thread = threading.Thread(target=run)

    def __enter__(self) -> "Held":
        self.thread.start()
        assert self.entered.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.go.set()
        self.thread.join(30)
        assert not self.errors


def inside(context: Callable[[], ContextManager[object]]) -> Callable[[Callable[[], None]], None]:
    """Work for :class:`Held`: hold inside ``context()``."""
    def work(hold: Callable[[], None]) -> None:
        with context():
            hold()
    return work


@pytest.fixture
def shown(monkeypatch) -> List[Tuple[str, str]]:
    """The warnings the process shows (category name, text), every time; filters put back afterwards."""
    seen: List[Tuple[str, str]] = []
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    monkeypatch.setattr(warnings, "showwarning", lambda message, category, *a, **k: seen.append(
        (category.__name__, str(message))))
    warnings.simplefilter("always")
    yield seen
    warnings._filters_mutated()


def held_work(name: str, monkeypatch, tmp_path: Path) -> Callable[[Callable[[], None]], None]:
    """What the worker runs for each of the library's own warning catches, held open inside it."""
    from lrnnx_zoo.export.onnx_export import _quiet
    from lrnnx_zoo.models import ignoring_warnings
    from lrnnx_zoo.cli import warning_line
    from lrnnx_zoo.thread_warnings import this_threads_display
    if name == "torchscript load":              # held inside torch.jit.load, under load_torchscript's catch
        from lrnnx_zoo.export.torchscript_export import load_torchscript
        path = tmp_path / "m.ts"
        path.write_bytes(b"")
        hold_here: List[Callable[[], None]] = []
        monkeypatch.setattr(torch.jit, "load", lambda *a, **k: hold_here[0]())
        return lambda hold: (hold_here.append(hold), load_torchscript(path))[1]
    return inside({"export": lambda: _quiet([]), "model probes": ignoring_warnings,
                   "command": lambda: this_threads_display(warning_line("train"))}[name])


CATCHES = ["export", "model probes", "command", "torchscript load"]


@pytest.mark.parametrize("name", CATCHES)
def test_another_threads_warnings_are_shown_while_the_library_catches_its_own(name: str, shown, monkeypatch,
                                                                              tmp_path: Path) -> None:
    # Old: under the worker's catch_warnings the main thread's warnings went into the export's record
    # (shown: []), were ignored (probes), printed as train lines through the command's showwarning, or
    # (torchscript load) its DeprecationWarning ignored.
    with Held(held_work(name, monkeypatch, tmp_path)):
        warnings.warn("from the server thread", UserWarning)
        warnings.warn("deprecated in the server thread", DeprecationWarning)
    assert shown == [("UserWarning", "from the server thread"),
                     ("DeprecationWarning", "deprecated in the server thread")]


@pytest.mark.parametrize("name", CATCHES)
def test_a_filter_another_thread_sets_meanwhile_stays(name: str, shown, monkeypatch, tmp_path: Path) -> None:
    # Old: leaving catch_warnings put back the list it had copied on entry, without the server's filter.
    entry = ("error", None, RuntimeWarning, None, 0)
    with Held(held_work(name, monkeypatch, tmp_path)):
        warnings.filters.insert(0, entry)
        warnings._filters_mutated()
    assert warnings.filters[0] == entry
    with pytest.raises(RuntimeWarning):
        warnings.warn("now an error", RuntimeWarning)


def test_an_export_records_its_own_warnings_every_time_and_shows_none(shown) -> None:
    # The export's record keeps what it had (category: first line), also for a warning the process has
    # already shown once under a "default" filter (its registry entry is not taken as "already shown").
    from lrnnx_zoo.export.onnx_export import _quiet
    warnings.simplefilter("default")

    def upstream() -> None:
        warnings.warn("traced a branch\nsecond line", UserWarning)
    upstream()
    records: List[List[str]] = [[], []]
    for record in records:
        with _quiet(record):
            upstream()
            warnings.warn("", FutureWarning)            # an empty message is recorded, not an IndexError
    assert records[0] == records[1] == ["FutureWarning: ", "UserWarning: traced a branch"]
    assert shown == [("UserWarning", "traced a branch\nsecond line")]


def test_nested_catches_take_the_innermost_first_and_leave_no_entry_behind(shown) -> None:
    outer: List[str] = []
    filters = list(warnings.filters)
    with this_threads_warnings(lambda c, t: outer.append(t)):
        with pytest.raises(KeyboardInterrupt):
            with this_threads_warnings(None, DeprecationWarning):
                warnings.warn("dropped", DeprecationWarning)
                warnings.warn("to the outer", UserWarning)
                raise KeyboardInterrupt                    # an interrupted call takes its entry out too
        warnings.warn("outer again", DeprecationWarning)
    warnings.warn("shown", UserWarning)
    assert outer == ["to the outer", "outer again"] and shown == [("UserWarning", "shown")]
    assert warnings.filters == filters


def test_an_entry_put_back_by_another_thread_is_inert(shown) -> None:
    # A server thread snapshots the filter list while an export runs (the export's entry in it) and puts
    # the snapshot back after the export has left: the entry is back in the list and must no longer catch
    # the exporting thread's warnings (they are shown).
    entered, snapped, left, restored = threading.Event(), threading.Event(), threading.Event(), threading.Event()
    caught: List[str] = []

    def export() -> None:
        with this_threads_warnings(lambda c, t: caught.append(t)):
            entered.set()
            snapped.wait(30)
        left.set()
        restored.wait(30)
        warnings.warn("after the export", UserWarning)       # the same thread, its entry back in the list

    t = threading.Thread(target=export)
    t.start()
    assert entered.wait(30)
    snapshot = list(warnings.filters)
    snapped.set()
    assert left.wait(30)
    warnings.filters[:] = snapshot
    warnings._filters_mutated()
    restored.set()
    t.join(30)
    assert caught == [] and shown == [("UserWarning", "after the export")]


def test_from_pretrained_leaves_the_callers_random_stream(tmp_path: Path) -> None:
    # Old: building the model drew its (then replaced) initial weights from the global generator, so
    # torch.randn after a load gave other numbers than without it.
    from lrnnx_zoo import ModelConfig, SequenceModel, from_pretrained
    SequenceModel(ModelConfig(layer="s4d", d_input=1, d_output=2, d_model=4, n_layers=1)).save_pretrained(tmp_path)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    from_pretrained(tmp_path)
    assert torch.equal(torch.rand(4), expected)


def _quantize_with_stand_in(monkeypatch, quantizer: Callable[[Callable[[], None]], None]) -> logging.Logger:
    """quantize_int8 with onnxruntime's quantize_dynamic replaced by ``quantizer(advise)`` (then a failure:
    nothing written), where ``advise()`` logs the quantizer's advice from onnxruntime's file with a
    module-level call, as its quantizer does. The root logger starts as in a process that configured no
    logging; it is returned afterwards."""
    import onnxruntime.quantization as ortq
    from onnx import TensorProto, helper

    from lrnnx_zoo.export.quantize import quantize_int8
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.WARNING)
    advice = compile("import logging\nlogging.info('Please consider to run pre-processing')", ortq.__file__, "exec")

    def stand_in(*args, **kwargs):
        quantizer(lambda: exec(advice, {}))
        raise RuntimeError("stand-in quantizer: nothing written")
    monkeypatch.setattr(ortq, "quantize_dynamic", stand_in)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(RuntimeError, match="stand-in"):
        quantize_int8(Path("unused.onnx"), Path("unused-int8.onnx"), {}, helper.make_model(graph))
    return root


def test_an_int8_quantisation_leaves_no_implicit_root_handler(monkeypatch) -> None:
    # onnxruntime's quantizer logs through logging.warning / logging.info, which give a root logger without
    # handlers logging.basicConfig()'s stderr handler, for good: an application's own basicConfig(level=...,
    # format=...) afterwards did nothing. Old: that handler was left; now taken off, while a handler the
    # application added meanwhile (with its own format) stays.
    mine = logging.StreamHandler()
    mine.setFormatter(logging.Formatter("%(levelname)s %(message)s"))

    def quantizer(advise: Callable[[], None]) -> None:
        advise()
        assert len(logging.getLogger().handlers) == 1      # basicConfig's, added by the module-level call
        logging.getLogger().addHandler(mine)
    assert _quantize_with_stand_in(monkeypatch, quantizer).handlers == [mine]


def test_an_applications_basic_config_made_during_an_int8_quantisation_stays(monkeypatch) -> None:
    # basicConfig(level=INFO) in another thread while the quantizer runs gives the root a handler exactly
    # like logging's implicit one (the level goes on the root): it was taken off as the quantizer's, and
    # the application's records were no longer printed. The root's level, changed meanwhile, tells them apart.
    def quantizer(advise: Callable[[], None]) -> None:
        logging.basicConfig(level=logging.INFO)           # the application, meanwhile
        advise()                                          # the root has a handler now: no implicit one
    root = _quantize_with_stand_in(monkeypatch, quantizer)
    assert len(root.handlers) == 1 and root.level == logging.INFO


def _step_module() -> torch.nn.Module:
    import lrnnx_zoo
    from lrnnx_zoo.export import build_step_module
    return build_step_module(lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer="lru", d_input=1, d_output=1,
                                                                          d_model=4, n_layers=1)))


def _failing_trace(hold: Callable[[], None]) -> None:
    """Work for :class:`Held`: an export that prints to stderr, holds, then fails (its printout dropped)."""
    import sys

    from lrnnx_zoo.export.step_graph import ExportError, tracing
    with pytest.raises(ExportError):
        with tracing(_step_module(), "test"):
            print("exporter noise", file=sys.stderr)
            hold()
            raise RuntimeError("the exporter failed")


def test_another_threads_stderr_is_written_while_an_export_holds_back_its_own(capsys) -> None:
    # tracing() held back the exporter's printout with contextlib.redirect_stderr, which swapped sys.stderr
    # for the whole process: a server thread's line printed meanwhile went into the export's buffer, and
    # was dropped with it when the export failed
    import sys
    stderr = sys.stderr
    with Held(_failing_trace):
        print("server line", file=sys.stderr)
    assert capsys.readouterr().err == "server line\n"       # shown, and the export's own noise not
    assert sys.stderr is stderr


def test_a_stderr_redirection_made_by_another_thread_during_an_export_stays() -> None:
    # leaving redirect_stderr put back the stream it had found on entry, undoing another thread's
    # contextlib.redirect_stderr entered meanwhile: that thread's later prints went to the terminal
    import io
    import sys
    stderr, theirs = sys.stderr, io.StringIO()
    try:
        with Held(_failing_trace):
            sys.stderr = theirs
        assert sys.stderr is theirs
        print("after", file=sys.stderr)
        assert theirs.getvalue() == "after\n"
    finally:
        sys.stderr = stderr


def test_an_export_that_succeeds_writes_its_held_back_printout_once(capsys) -> None:
    import sys

    from lrnnx_zoo.export.step_graph import tracing
    stderr = sys.stderr
    with tracing(_step_module(), "test"):
        print("exporter noise", file=sys.stderr)
        assert capsys.readouterr().err == ""             # held back while the export runs
    assert capsys.readouterr().err == "exporter noise\n"
    assert sys.stderr is stderr


def test_another_thread_sees_the_stderr_it_had_while_an_export_holds_back_its_own(monkeypatch, tmp_path: Path) -> None:
    # The router in front of sys.stderr is an io.TextIOBase, which answers encoding, fileno and isatty
    # itself (None, UnsupportedOperation, False): another thread's subprocess.run(..., stderr=sys.stderr)
    # failed during an export, and a stream's encoding read None.
    import sys

    from lrnnx_zoo.thread_streams import this_threads_stderr
    with open(tmp_path / "stderr.txt", "w", encoding="latin-1") as real:
        monkeypatch.setattr(sys, "stderr", real)
        with Held(inside(this_threads_stderr)):
            assert sys.stderr is not real                       # the router is in front
            seen = (sys.stderr.encoding, sys.stderr.errors, sys.stderr.fileno(), sys.stderr.isatty())
            print("server line", file=sys.stderr)
        assert seen == (real.encoding, real.errors, real.fileno(), real.isatty())
        assert sys.stderr is real
    assert (tmp_path / "stderr.txt").read_text(encoding="latin-1") == "server line\n"


def test_another_threads_writes_are_lost_quietly_without_a_stderr(monkeypatch) -> None:
    # Under pythonw sys.stderr is None and the standard library drops what it would show there (warnings,
    # thread tracebacks: "if sys.stderr is None: return"); with the router in front of None, another
    # thread's write raised AttributeError ('NoneType' object has no attribute 'write'), a shown warning too.
    import sys

    from lrnnx_zoo.thread_streams import this_threads_stderr
    monkeypatch.setattr(sys, "stderr", None)
    held: List[str] = []

    def work(hold: Callable[[], None]) -> None:
        with this_threads_stderr() as printed:
            print("exporter noise", file=sys.stderr)
            hold()
        held.append(printed.getvalue())
    with Held(work):
        stream = sys.stderr
        assert stream is not None                               # the router: what is written goes nowhere
        assert stream.write("server line\n") == len("server line\n")
        stream.flush()
        assert not stream.isatty()
    assert held == ["exporter noise\n"] and sys.stderr is None


class _FlagLock:
    """A stand-in for Python 3.14's ``warnings._lock``: says whether it is held."""

    def __init__(self) -> None:
        self.held = False

    def __enter__(self) -> "_FlagLock":
        self.held = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.held = False


def test_a_warning_already_shown_is_caught_where_the_module_bumps_its_version_only_under_its_lock(monkeypatch) -> None:
    # Python 3.14's warnings module has _filters_mutated_lock_held (to be called under warnings._lock) and no
    # _filters_mutated: the entry went in without a version bump, so a warning its registry recorded as
    # shown ("default") was skipped before the filters were read, and the handler never saw it.
    import _warnings
    lock, bumps = _FlagLock(), []

    def bump_held() -> None:
        assert lock.held, "the version was bumped outside warnings._lock"
        bumps.append(1)
        _warnings._filters_mutated()
    seen: List[str] = []
    caught: List[str] = []

    def upstream() -> None:
        warnings.warn("the same warning from the same line", UserWarning)
    monkeypatch.setattr(warnings, "filters", [("default", None, Warning, None, 0)])
    monkeypatch.setattr(warnings, "showwarning", lambda message, category, *a, **k: seen.append(str(message)))
    _warnings._filters_mutated()
    with monkeypatch.context() as py314:           # only here: catch_warnings (pytest's too) needs the old bump
        py314.delattr(warnings, "_filters_mutated")
        py314.setattr(warnings, "_lock", lock, raising=False)
        py314.setattr(warnings, "_filters_mutated_lock_held", bump_held, raising=False)
        upstream()                                                 # shown, and recorded as shown
        with this_threads_warnings(lambda c, t: caught.append(t)):
            upstream()
        upstream()                                                 # the list changed again: shown again
    assert caught == ["the same warning from the same line"] and len(bumps) == 2
    assert seen == ["the same warning from the same line"] * 2


def test_the_wrapped_transfer_map_passes_other_callers_arguments_as_given() -> None:
    # hub.transfers_in_this_thread wraps huggingface_hub's pooled map for good, for every thread: outside
    # its context a call went on to the pool with max_workers=None and tqdm_class=None added where the
    # caller gave neither, and tqdm's thread_map (huggingface_hub 1.x's) then took None for its bar class
    # (AttributeError: 'NoneType' object has no attribute 'get_lock'); inside, a caller's total= reached
    # the bar twice (TypeError).
    from tqdm.contrib.concurrent import thread_map

    from lrnnx_zoo import hub
    mapped = hub._map_in_caller(thread_map)
    ran_in: List[int] = []

    def double(x: int) -> int:
        ran_in.append(threading.get_ident())
        return 2 * x
    assert mapped(double, [1, 2, 3], disable=True) == [2, 4, 6]
    assert threading.get_ident() not in ran_in                     # outside the context: the pool's threads
    ran_in.clear()
    with hub.transfers_in_this_thread():
        assert mapped(double, [1, 2, 3], total=3, max_workers=2, disable=True) == [2, 4, 6]
    assert ran_in == [threading.get_ident()] * 3                   # inside: this thread, one after another


def test_a_huggingface_hub_laid_out_otherwise_keeps_its_pool_and_still_transfers(monkeypatch) -> None:
    # A module named in hub._POOLED_MAPS that this huggingface_hub lacks failed every download and push
    # with ModuleNotFoundError; it is now passed over (the maps found are wrapped), and with none of
    # them found the transfers keep the pool: the context says False.
    from lrnnx_zoo import hub
    missing = ("huggingface_hub._no_such_module", ("hf_thread_map",))
    monkeypatch.setattr(hub, "_POOLED_MAPS", hub._POOLED_MAPS + (missing,))
    with hub.transfers_in_this_thread() as wrapped:
        assert wrapped
    monkeypatch.setattr(hub, "_POOLED_MAPS", (missing,))
    with hub.transfers_in_this_thread() as wrapped:
        assert wrapped is False
