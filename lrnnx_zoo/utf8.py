"""Paths and text that are not UTF-8, for the readers and formats that take UTF-8 only; and paths
whose leading ``~`` cannot be expanded.

On Linux a file name is bytes; Python holds the bytes that are no UTF-8 (a folder named in Latin-1,
copied from an old archive or another machine) as lone surrogates ("\\udcff"). safetensors, torch's
archive readers and ONNX Runtime refused such a path, and ONNX metadata and model cards could not
store a string holding one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional, Union


def is_utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """``text`` as UTF-8, each byte of a file name that was no UTF-8 written as its escape ("\\xff"),
    any other lone surrogate as "\\udXXX"."""
    if is_utf8(text):
        return text
    try:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:          # a surrogate that is no escaped byte ("\ud800" from JSON)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


@contextlib.contextmanager
def openable(path: Union[str, Path]) -> Iterator[str]:
    """``path`` as a string that a UTF-8-only reader opens: itself, or, where it is no UTF-8, the
    /dev/fd path of the file opened here for the duration (Linux and macOS; elsewhere file names are
    Unicode already)."""
    text = str(path)
    if is_utf8(text) or not os.path.isdir("/dev/fd"):
        yield text
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        yield f"/dev/fd/{fd}"
    finally:
        os.close(fd)


def home_trouble(path: Union[str, "os.PathLike[str]"]) -> Optional[str]:
    """Why the leading ``~`` of ``path`` cannot be expanded, or None (no ``~``, or it expands). With
    HOME unset for a user without a home directory (a container's arbitrary uid), or ``~name`` for no
    such user, Path.expanduser raised a bare RuntimeError ("Could not determine home directory")."""
    text = os.fspath(path)
    if not isinstance(text, str) or not text.startswith("~"):
        return None
    head = text.replace(os.altsep or os.sep, os.sep).split(os.sep, 1)[0]
    if os.path.expanduser(head) != head:
        return None
    if head == "~":
        return (f"cannot expand ~ in {text!r}: HOME is not set and this user has no home directory; "
                "pass the full path, or set HOME")
    return (f"cannot expand {head} in {text!r}: there is no user {head[1:]!r}; pass the full path "
            f"(./{text} for a folder of that name)")


def expand_home(path: Union[str, "os.PathLike[str]"]) -> Path:
    """``Path(path).expanduser()``, or a ValueError saying why its ``~`` cannot be expanded
    (:func:`home_trouble`)."""
    trouble = home_trouble(path)
    if trouble:
        raise ValueError(trouble)
    return Path(path).expanduser()
