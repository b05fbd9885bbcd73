"""How error messages name the arguments a user gave: as Python keywords (``init_from='x'``), or,
while a command line runs (:func:`command_line`), as the flags that were typed (``--init-from x``).

A message raised deep inside ``train`` or ``from_pretrained`` cannot know who called it; the
command sets the flag names for the duration of the call instead of every function taking them.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any, Iterator, Mapping, Optional

_FLAGS: ContextVar[Optional[Mapping[str, str]]] = ContextVar("lrnnx_zoo_cli_flags", default=None)


@contextlib.contextmanager
def command_line(flags: Mapping[str, str]) -> Iterator[None]:
    """While inside, messages spell the Python argument ``key`` as the flag ``flags[key]``. Nested,
    the inner map adds to the outer one (a subcommand's own flags beside the CLI's shared ones)."""
    token = _FLAGS.set({**(_FLAGS.get() or {}), **flags})
    try:
        yield
    finally:
        _FLAGS.reset(token)


def in_command_line() -> bool:
    """Whether a command line is running (its messages give flags and environment variables only)."""
    return _FLAGS.get() is not None


def name(key: str) -> str:
    """The argument ``key`` as the caller spelt it: the Python keyword, or the running command's flag."""
    return (_FLAGS.get() or {}).get(key, key)


def given(key: str, value: Any) -> str:
    """The argument ``key`` with the value it was given: ``key=value!r``, or ``--flag value`` (a
    switch, value True, as ``--flag`` alone)."""
    flag = (_FLAGS.get() or {}).get(key)
    if flag is None:
        return f"{key}={value!r}"
    return flag if value is True else f"{flag} {value}"


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)`` where exceptions take notes (Python >= 3.11): the exception goes on
    unchanged, with a line saying whose code raised it. On 3.10 it goes on without the note (an
    AttributeError here would replace the error it was to explain)."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
