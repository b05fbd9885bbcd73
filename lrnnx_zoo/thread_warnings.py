"""Catch the warnings of the calling thread only, leaving the process's filters and hooks to everyone else.

``warnings.catch_warnings`` replaces the process's filter list and ``showwarning`` while it is open and
puts back what it found on exit. In a library called from a threaded application that is wrong twice:
meanwhile every other thread's warnings go through the swapped filters (an export's "record everything"
took a server thread's warnings into the export's result and never showed them), and on exit a filter
another thread added meanwhile is undone (two swaps that do not nest restore each other's).

:func:`this_threads_warnings` puts one entry at the front of the filter list that is current and takes
that entry alone out again, whatever else changed meanwhile. The entry matches only in the thread that
made it: the warnings module calls its message pattern's ``match(text)`` and then ``issubclass(category,
entry_category)`` (both in C and in the pure-Python module, message first), so one object in both slots
sees the text and then the category of each warning and answers False in every other thread, whose
warnings go on to the filters after it as if it were not there. Its action is "ignore": a caught warning
is handed to the caller's function and not shown. The filter list's version is bumped on entry and exit
(as ``warnings.simplefilter`` does), so no warning is skipped as "already shown" by a registry
(``__warningregistry__``) written under another filter list. Where the warnings module has a lock (Python
3.14's has ``_lock`` and ``_filters_mutated_lock_held``, no ``_filters_mutated``) the list is edited and
the version bumped under it, as the module's own filter functions do.

:func:`this_threads_display` changes how the calling thread's warnings look (``lrnnx-zoo``'s one line
each), not which are shown: that stays the filters' say. It replaces ``warnings.showwarning``, the hook
Python documents for that, passing other threads' warnings on to the hook it found.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Any, Callable, Iterator, List, Optional, Tuple, Type, Union, cast

#: Called with (category, message text) for each caught warning.
WarningHandler = Callable[[Type[Warning], str], None]
#: A warning category, or a tuple of them (as ``issubclass`` takes).
Categories = Union[Type[Warning], Tuple[Type[Warning], ...]]


class _ThreadGate:
    """A filter entry's message pattern and category at once: matches ``category`` in its own thread only."""

    def __init__(self, category: Categories, handler: Optional[WarningHandler]) -> None:
        self.thread = threading.get_ident()
        self.category, self.handler = category, handler
        self.active = True
        self.text: Optional[str] = None

    def match(self, text: str) -> bool:
        """The message slot (called first): keeps the text for the category check in this thread."""
        if not self.active or threading.get_ident() != self.thread:
            return False
        self.text = text
        return True

    def __subclasscheck__(self, category: type) -> bool:
        """The category slot: True (the warning is caught and handled) for a ``category`` warning of this
        thread whose text :meth:`match` saw; False otherwise (it goes on to the next filter)."""
        if not self.active or threading.get_ident() != self.thread or self.text is None:
            return False
        text, self.text = self.text, None
        if not issubclass(category, self.category):
            return False
        if self.handler is not None:
            self.handler(category, text)
        return True

    def __repr__(self) -> str:
        kinds = self.category if isinstance(self.category, tuple) else (self.category,)
        return f"<warnings of {', '.join(k.__name__ for k in kinds)} in thread {self.thread} (lrnnx_zoo)>"


def _edit_filters(edit: Callable[[], None]) -> None:
    """Run ``edit`` (a change of the filter list) and tell the warnings module the list changed, so the
    warnings its registries already record as shown are looked up again. Python 3.14's module bumps the
    version only through ``_filters_mutated_lock_held``, under its ``_lock`` (the list is edited under
    it too); without them (3.10-3.12) ``_filters_mutated`` bumps it. Found by neither, only the edit."""
    lock = getattr(warnings, "_lock", None)
    bump_held = getattr(warnings, "_filters_mutated_lock_held", None)
    if lock is not None and bump_held is not None:
        with lock:
            edit()
            bump_held()
        return
    edit()
    bump = getattr(warnings, "_filters_mutated", None)
    if bump is not None:
        bump()


@contextlib.contextmanager
def this_threads_warnings(handler: Optional[WarningHandler] = None,
                          category: Categories = Warning) -> Iterator[None]:
    """Inside, each warning of ``category`` the calling thread raises goes to ``handler(category, text)``
    (dropped when ``handler`` is None) and is not shown; other threads' warnings, and this thread's of
    other categories, are filtered and shown as usual. Nests (the innermost catches first). A filter put
    in front of it meanwhile (``warnings.simplefilter("error")`` in any thread) takes precedence, as a
    newer filter does. Inside another thread's ``catch_warnings`` that is left first, this thread's
    warnings are filtered as usual from then on (that exit puts back a list without the entry)."""
    gate = _ThreadGate(category, handler)
    entry = ("ignore", gate, gate, None, 0)
    # typeshed types the list's entries as patterns and classes; the entry holds the gate in both slots
    filters = cast(List[Any], warnings.filters)
    _edit_filters(lambda: filters.insert(0, entry))
    try:
        yield
    finally:
        gate.active = False          # inert where a copy of the list (another catch_warnings') still holds it

        def take_out() -> None:
            for current in {id(filters): filters, id(warnings.filters): cast(List[Any], warnings.filters)}.values():
                for i, item in enumerate(current):
                    if item is entry:
                        del current[i]
                        break
        _edit_filters(take_out)


class _ThreadDisplay:
    """A ``warnings.showwarning``: the warnings of one thread to ``show(category, text)``, others' (and all
    once it is no longer active) to the ``showwarning`` it replaced."""

    def __init__(self, show: WarningHandler, previous: Callable[..., Any]) -> None:
        self.thread = threading.get_ident()
        self.show, self.previous = show, previous
        self.active = True

    def __call__(self, message: Union[Warning, str], category: Type[Warning], filename: str, lineno: int,
                 file: Any = None, line: Optional[str] = None) -> None:
        if self.active and threading.get_ident() == self.thread:
            self.show(category, str(message))
        else:
            self.previous(message, category, filename, lineno, file, line)

    def __repr__(self) -> str:
        return f"<warnings shown by {self.show!r} in thread {self.thread} (lrnnx_zoo)>"


@contextlib.contextmanager
def this_threads_display(show: WarningHandler) -> Iterator[None]:
    """Inside, each warning of the calling thread that the filters let through is shown by ``show(category,
    text)`` instead of Python's ``file:line: Category: text`` and the source line below it. Whether a
    warning is shown, and how often, stays the filters' say (``-W error`` raises it, ``-W ignore`` drops
    it, the default shows it once per place it is raised from), as it is for other threads, whose warnings
    go on to the ``warnings.showwarning`` found on entry. That hook (the one Python documents for
    replacing the display) is this one's while open; on exit the one found is put back if this is still
    in place, else this one only stops showing (another hook set meanwhile stays). Warnings shown before
    entry (by an earlier command in this process) are shown again, as in a process of their own."""
    display = _ThreadDisplay(show, _live(warnings.showwarning))
    # the version bump makes each "already shown" record of the warnings' registries stale
    _edit_filters(lambda: setattr(warnings, "showwarning", display))
    try:
        yield
    finally:
        display.active = False
        if warnings.showwarning is display:
            warnings.showwarning = _live(display.previous)


def _live(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook`` without the displays in front of it that have stopped showing (two threads' displays left
    in another order than they were opened: the first left stays in the chain of the second)."""
    while isinstance(hook, _ThreadDisplay) and not hook.active:
        hook = hook.previous
    return hook
