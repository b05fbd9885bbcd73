"""Hold back what the calling thread writes to ``sys.stderr``, leaving every other thread's output alone.

``contextlib.redirect_stderr`` replaces ``sys.stderr`` for the whole process while it is open: an
export that held back the exporter's printout (a partial graph before an error) also held back, and on
failure dropped, what a server's other threads printed meanwhile (shown warnings, tracebacks), and on
exit it put back the stream it found, undoing a redirection another thread had made in between.

:func:`this_threads_stderr` instead puts a :class:`_ThreadRouter` in front of the current stream once:
writes from a thread that is holding its output back go to that thread's buffer, all others to the
stream the router wraps. The router stays out of the way on exit: it is taken out only while it is still
``sys.stderr`` and no thread holds output back; replaced meanwhile, whoever replaced it keeps their stream.
"""

from __future__ import annotations

import contextlib
import io
import sys
import threading
from typing import Any, Dict, Iterator, Optional, TextIO

_LOCK = threading.Lock()


def _wrapped(name: str) -> Any:
    """A read-only attribute of :class:`_ThreadRouter` that is its wrapped stream's ``name`` (None without
    one), where io.TextIOBase has one of its own."""
    def get(router: "_ThreadRouter") -> Any:
        return getattr(router.target, name, None)

    def refuse(router: "_ThreadRouter", value: Any) -> None:
        raise AttributeError(f"the router's {name} is its stream's")
    return property(get, refuse)


class _ThreadRouter(io.TextIOBase):
    """A text stream that sends each thread's writes to that thread's buffer, if it holds one, else on to
    ``target``; everything else (encoding, fileno, isatty, buffer, ...) is the target's. ``target`` None
    (``sys.stderr`` is None under pythonw): what the other threads write is dropped, as it was lost before."""

    def __init__(self, target: Optional[TextIO]) -> None:
        super().__init__()
        self.target = target
        self.buffers: Dict[int, io.StringIO] = {}

    def write(self, text: str) -> int:
        held = self.buffers.get(threading.get_ident())
        if held is not None:
            return held.write(text)
        # None: a shown warning or a traceback in another thread raised AttributeError ('NoneType' ... 'write')
        return len(text) if self.target is None else self.target.write(text)

    def flush(self) -> None:
        if threading.get_ident() not in self.buffers and self.target is not None:
            self.target.flush()

    def writable(self) -> bool:
        return True

    # io.TextIOBase defines these itself (None, UnsupportedOperation, False), so __getattr__ never saw them:
    # another thread's subprocess.run(..., stderr=sys.stderr) failed on fileno() during an export
    encoding = _wrapped("encoding")
    errors = _wrapped("errors")
    newlines = _wrapped("newlines")

    def fileno(self) -> int:
        if self.target is None:
            raise io.UnsupportedOperation("fileno: sys.stderr was None when lrnnx_zoo held back a thread's output")
        return self.target.fileno()

    def isatty(self) -> bool:
        return self.target is not None and self.target.isatty()

    def __getattr__(self, name: str) -> Any:     # buffer, mode, name, reconfigure, ...: the target's
        return getattr(self.__dict__.get("target"), name)


def _router() -> _ThreadRouter:
    """The router in front of ``sys.stderr``, put there if it is not (called under :data:`_LOCK`)."""
    current = sys.stderr
    if isinstance(current, _ThreadRouter):
        return current
    router = _ThreadRouter(current)
    sys.stderr = router
    return router


@contextlib.contextmanager
def this_threads_stderr() -> Iterator[io.StringIO]:
    """Inside, what the calling thread writes to ``sys.stderr`` (Python-level writes: print, shown
    warnings, tracebacks) goes into the yielded buffer instead; other threads write where they did.
    Nests: an inner hold writes into its own buffer and, on exit, the caller decides what to do with it."""
    me = threading.get_ident()
    held = io.StringIO()
    with _LOCK:
        router = _router()
        outer: Optional[io.StringIO] = router.buffers.get(me)
        router.buffers[me] = held
    try:
        yield held
    finally:
        with _LOCK:
            if outer is not None:
                router.buffers[me] = outer
            else:
                router.buffers.pop(me, None)
            if not router.buffers and sys.stderr is router:
                sys.stderr = router.target
