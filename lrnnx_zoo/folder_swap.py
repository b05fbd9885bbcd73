"""Replace a folder's files all at once: write a hidden sibling, then swap it in.

A checkpoint or an export folder is several files that only make sense together (config.json
describes the weights and the graph beside it). Written in place, a failure or an interrupt halfway
leaves a folder whose files disagree. :func:`replaced_folder` instead yields a fresh sibling
``.NAME.tmp-XXXXXXXX`` to write into; when the block ends without an exception, the files of the old
folder that the caller keeps are hard-linked in, and the two folders are exchanged.

On Linux the exchange is one ``renameat2(RENAME_EXCHANGE)`` call: at every instant the path holds
either the complete old folder or the complete new one. Elsewhere (or on a file system without
it) two renames are used, with the old folder renamed back if the second fails; between them the
path is briefly absent.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import Callable, Iterator, List, Optional

__all__ = ["replaced_folder", "exchange_paths"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _renameat2() -> Optional[Callable[..., int]]:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2`` with RENAME_EXCHANGE).

    Returns False, having changed nothing, where the platform or the file system cannot do it;
    raises OSError for any other failure."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(old: Path, new: Path, keep: Callable[[str], bool]) -> None:
    """Hard-link (or copy) the entries of ``old`` that ``keep`` accepts into ``new``; ``old`` stays
    intact until the swap, so a failure here loses nothing."""
    for entry in old.iterdir():
        if not keep(entry.name) or (new / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


def _swap_in(tmp: Path, target: Path, tag: str) -> None:
    """Put ``tmp`` at ``target``; the old ``target`` ends up at ``tmp`` (exchange) or is removed."""
    if exchange_paths(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = target.with_name(f".{target.name}.old-{tag}")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def replaced_folder(target: Path, keep: Callable[[str], bool]) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``target`` to write into; swap it in when the block ends.

    Args:
        target: the folder to create or replace (its missing parents are created, and removed
            again if the block fails). A symlink is followed: the folder it points to is replaced
            and the link stays.
        keep: called with the name of each entry of an existing ``target``; entries it accepts,
            and that the block did not write itself, are carried into the new folder (a user's
            own files there are never lost). Entries it rejects are dropped with the old folder.

    The new folder takes the old one's permission bits (a private 0700 folder stays private).
    On an exception nothing at ``target`` changes and the temporary folder is removed.
    """
    # the folder itself: a symlinked target is written through (swapping the link would replace it by
    # a folder and leave the link behind as a hidden sibling), and "~", "." or ".." name real folders
    target = Path(os.path.realpath(Path(target).expanduser()))
    created: List[Path] = []
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        created.append(parent)
        parent = parent.parent
    for folder in reversed(created):
        folder.mkdir()
    tag = uuid.uuid4().hex[:8]
    tmp = target.with_name(f".{target.name}.tmp-{tag}")
    try:
        tmp.mkdir()
        yield tmp
        if target.exists():
            _carry_over(target, tmp, keep)
            os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
            _swap_in(tmp, target, tag)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:                   # innermost first; one that holds files stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
