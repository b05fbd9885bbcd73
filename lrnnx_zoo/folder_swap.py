"""Replace a folder's files all at once: write a hidden sibling, then swap it in.

A checkpoint or an export folder is several files that only make sense together (config.json
describes the weights and the graph beside it). Written in place, a failure or an interrupt halfway
leaves a folder whose files disagree. :func:`replaced_folder` instead yields a fresh sibling
``.NAME.tmp-XXXXXXXX`` to write into; when the block ends without an exception, the files of the old
folder that the caller keeps are hard-linked in, and the two folders are exchanged.

On Linux the exchange is one ``renameat2(RENAME_EXCHANGE)`` call: at every instant the path holds
either the complete old folder or the complete new one. Elsewhere (or on a file system without
it) two renames are used, with the old folder renamed back if the second fails; between them the
path is briefly absent. A mount point, or a folder whose parent is read-only, cannot be swapped:
its files are replaced one by one instead (see :func:`replaced_folder`). Nor is a folder swapped
that holds nothing the write replaces, or whose kept entries are many or hold a mount point: a swap
re-creates the kept entries' whole tree in the new folder (see :func:`_swappable`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import sys
import uuid
from pathlib import Path
from typing import Callable, Iterator, List, Optional

from .utf8 import expand_home

__all__ = ["replaced_folder", "exchange_paths"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
#: rename() of a folder fails with these when the folder cannot be moved: a mount point (EBUSY), or
#: a sibling on another mount (EXDEV: the parent's file system, a bind mount of the same one)
_UNMOVABLE = (errno.EBUSY, errno.EXDEV)
#: mkdir() of the sibling fails with these when the parent is read-only or not the user's
_UNWRITABLE_PARENT = (errno.EACCES, errno.EPERM, errno.EROFS)


def _renameat2() -> Optional[Callable[..., int]]:
    """libc's renameat2, or None where there is none. Looked up on Linux only, the one system that has
    it: on Windows ``ctypes.CDLL(None)`` (no handle on a C library there) raised TypeError, which failed
    the import of this module and with it every save and export."""
    if not sys.platform.startswith("linux"):
        return None
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


def _copy_access(old: Path, new: Path) -> None:
    """Give ``new`` the permission bits of ``old``, and its group (a folder shared with a team) and,
    for root, its owner: best effort, as a user may not be a member of that group."""
    st = old.stat()
    if hasattr(os, "chown"):
        with contextlib.suppress(OSError):       # before chmod: chown may clear the setgid bit
            os.chown(new, st.st_uid if os.geteuid() == 0 else -1, st.st_gid)
    os.chmod(new, stat.S_IMODE(st.st_mode))


def _sync_dir(path: Path) -> None:
    """Flush ``path``'s entries to disk: a rename survives a power cut only once its folder is
    flushed (the files' own fsync does not cover their names). Best effort: some file systems and
    platforms cannot open or flush a folder."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sync_files(folder: Path) -> None:
    """Flush every file the block wrote into ``folder`` (and the names of its subfolders' entries)
    before any of them goes live, so callers need not fsync what they write."""
    # Windows flushes a file only through a handle that may write (FlushFileBuffers needs write access:
    # os.fsync of one opened "rb" is EBADF, which failed every save and export there); POSIX through
    # any, so a file the block made read-only is still flushed
    mode = "r+b" if sys.platform == "win32" else "rb"
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                with open(path, mode) as fh:
                    os.fsync(fh.fileno())
        if root != os.fspath(folder):
            _sync_dir(Path(root))


def _created(tmp: Path, target: Path) -> bool:
    """Rename ``tmp`` to a missing ``target``; False if ``target`` exists, also when another process
    (a second save to the same new folder) created it after we looked: then it is replaced as usual."""
    if target.exists():
        return False
    try:
        os.rename(tmp, target)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    return True


def _swap_in(tmp: Path, target: Path, old: Path) -> bool:
    """Put ``tmp`` at ``target``. The old ``target`` ends up at ``tmp`` (exchange) or at ``old`` (two
    renames); :func:`_clean_up` then removes it, or puts it back if the second rename never happened.

    False, having changed nothing, when ``target`` cannot be renamed: a mount point (EBUSY), or a
    bind mount the sibling is not on (EXDEV)."""
    try:
        if exchange_paths(tmp, target):
            return True
        os.rename(target, old)
    except OSError as exc:
        if exc.errno in _UNMOVABLE:
            return False
        raise
    os.rename(tmp, target)
    return True


#: Written last into a folder updated in place: a crash before it leaves no config.json that
#: describes files not yet there (a fresh folder then holds no checkpoint, not half of one).
_LAST = "config.json"
#: The most entries a swap carries over (hard links, in one walk) before the folder is updated in
#: place instead: a save into a large folder (a home folder, a project) re-created its whole tree.
CARRY_LIMIT = 2000


def remove_entry(path: Path) -> None:
    """Remove ``path``: a folder with its contents, a file, or a link itself (never what it points to);
    nothing if it is gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


def _update_in_place(staging: Path, written: List[str], target: Path, keep: Callable[[str], bool], tag: str) -> None:
    """Move the ``written`` entries of ``staging`` into ``target`` one by one (each rename atomic),
    config.json last, then remove the entries of ``target`` that ``keep`` rejects and that were not
    written. For a folder that is not swapped whole (:func:`_swappable`).

    Where ``staging`` is on another file system (a mount point's sibling), every entry is first
    copied next to its destination and only then renamed: a full disk fails before any file is
    replaced (copied and renamed one at a time, an ENOSPC on the weights left the new config.json
    and card beside the old weights, a checkpoint that no longer loaded)."""
    order = sorted(written, key=lambda name: name == _LAST)
    renames = _renames_into(staging, target, tag)
    moves = []
    try:
        for name in order:
            src = staging / name
            if not renames:
                part = target / f".{name}.tmp-{tag}"
                moves.append((part, name))
                if src.is_dir() and not src.is_symlink():
                    shutil.copytree(src, part, symlinks=True)
                else:
                    shutil.copy2(src, part, follow_symlinks=False)
            else:
                moves.append((src, name))
        for src, name in moves:
            dst = target / name
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)
            os.replace(src, dst)
    finally:
        for src, _ in moves:
            if src.parent == target:         # a copy that was not renamed (a failure on the way)
                remove_entry(src)
    for entry in list(target.iterdir()):
        if entry.name in written or entry == staging or keep(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _renames_into(staging: Path, target: Path, tag: str) -> bool:
    """Whether an entry of ``staging`` can be renamed into ``target`` (False across file systems and
    bind mounts, EXDEV), tried with an empty probe file."""
    probe = staging / f".probe-{tag}"
    probe.touch()
    try:
        os.replace(probe, target / probe.name)
    except OSError as exc:
        probe.unlink()
        if exc.errno != errno.EXDEV:
            raise
        return False
    (target / probe.name).unlink()
    return True


def _swappable(target: Path, written: List[str], keep: Callable[[str], bool]) -> bool:
    """Whether the existing folder ``target`` is replaced by a swap (its kept entries carried into
    the new folder) rather than updated in place. Not when it holds nothing the write replaces (none
    of the ``written`` names, nothing ``keep`` rejects: files are only added, and the user's own are
    left where they are), nor when the entries to carry hold a mount point (copied onto the parent's
    disk, and then emptied with the old folder) or more than :data:`CARRY_LIMIT` entries."""
    kept, replaces = [], False
    for entry in os.scandir(target):
        if entry.name in written or not keep(entry.name):
            replaces = True
        else:
            kept.append(entry)
    if not replaces:
        return False
    device, seen = os.lstat(target).st_dev, 0
    stack = kept
    while stack:
        entry = stack.pop()
        seen += 1
        if seen > CARRY_LIMIT:
            return False
        info = entry.stat(follow_symlinks=False)
        if info.st_dev != device:
            return False
        if entry.is_dir(follow_symlinks=False):
            try:
                stack.extend(os.scandir(entry.path))
            except OSError:                 # unreadable: copytree would fail on it too
                return False
    return True


def _rmtree(path: Path) -> None:
    """Remove the folder ``path``, also one holding read-only folders (a user's own, carried over):
    they are made writable first, as their entries cannot be removed otherwise. Never raises."""
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    for root, dirs, _ in os.walk(path):          # top-down: a folder is opened after it is made readable
        for name in [os.curdir] + dirs if root == os.fspath(path) else dirs:
            folder = os.path.join(root, name)
            with contextlib.suppress(OSError):   # folders only: files may be hard links to kept ones
                os.chmod(folder, stat.S_IMODE(os.lstat(folder).st_mode) | stat.S_IRWXU)
    shutil.rmtree(path, ignore_errors=True)


def _clean_up(target: Path, tmp: Path, old: Path) -> None:
    """Put an old folder that was only moved aside back at ``target``, and remove the hidden siblings.

    An interrupt (Ctrl-C) can come between any two lines, also here: the clean-up then runs once
    more before the KeyboardInterrupt goes on, so no hidden folder is left behind."""
    interrupted: Optional[BaseException] = None
    for _ in range(2):
        try:
            if os.path.lexists(old) and not os.path.lexists(target):
                os.rename(old, target)
            for leftover in (tmp, old):
                if os.path.islink(leftover):
                    os.unlink(leftover)
                elif os.path.lexists(leftover):
                    _rmtree(leftover)
            break
        except KeyboardInterrupt as exc:
            interrupted = exc
    if interrupted is not None:
        raise interrupted


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

    The new folder takes the old one's permission bits (a private 0700 folder stays private) and
    group (and owner, when saving as root), so a folder shared with others stays shared.
    On an exception nothing at ``target`` changes and the temporary folder is removed. What the
    block wrote is flushed to disk before it goes live, and the folder's new names after.

    A folder that cannot be swapped (a mount point, such as a container's output volume) or whose
    parent cannot take a sibling (read-only, or not the user's) is updated in place instead: the
    block writes into a hidden folder inside it, then each file replaces its old version with one
    rename (config.json last), after every file is on the folder's disk. Each file is then whole at
    every instant, but the folder as a whole is not: a crash between two renames leaves some files
    new and some old. So is an existing folder that holds nothing the block replaces (the files are
    only added: a home folder given by mistake is not re-created), or whose kept entries hold a
    mount point or more than :data:`CARRY_LIMIT` entries (:func:`_swappable`).
    """
    # the folder itself: a symlinked target is written through (swapping the link would replace it by
    # a folder and leave the link behind as a hidden sibling), and "~", "." or ".." name real folders
    target = Path(os.path.realpath(expand_home(target)))
    created: List[Path] = []
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        created.append(parent)
        parent = parent.parent
    for folder in reversed(created):
        folder.mkdir()
    tag = uuid.uuid4().hex[:8]
    tmp = target.with_name(f".{target.name}.tmp-{tag}")
    old = target.with_name(f".{target.name}.old-{tag}")        # the two-rename fallback's
    in_place = False
    try:
        try:
            tmp.mkdir()
        except OSError as exc:
            if exc.errno not in _UNWRITABLE_PARENT or not target.is_dir():
                raise
            # e.g. a writable volume under a read-only root: stage inside the folder itself
            tmp, in_place = target / tmp.name, True
            tmp.mkdir()
        yield tmp
        written = sorted(os.listdir(tmp))
        _sync_files(tmp)
        if in_place:
            _update_in_place(tmp, written, target, keep, tag)
            _sync_dir(target)
        elif not _created(tmp, target):
            if not _swappable(target, written, keep):
                _update_in_place(tmp, written, target, keep, tag)
                _sync_dir(target)
            else:
                _carry_over(target, tmp, keep)
                _copy_access(target, tmp)
                _sync_dir(tmp)                           # the new folder's names before it goes live
                if _swap_in(tmp, target, old):
                    _sync_dir(target.parent)
                else:                                    # a mount point: its files are replaced instead
                    _update_in_place(tmp, written, target, keep, tag)
                    _sync_dir(target)
        else:
            _sync_dir(target)
            _sync_dir(target.parent)
    except BaseException:
        _clean_up(target, tmp, old)
        for folder in created:                   # innermost first; one that holds files stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        _clean_up(target, tmp, old)
