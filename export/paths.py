"""Where an export is written: checked before any work, and left as it was when the export fails.

Exporting takes seconds (tracing, validation), so a path that cannot be written is refused first,
with the path named, instead of failing at the final move with a bare OSError ("Is a directory").
Folders the export had to create are removed again if it fails, so a refused or failed export
leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, List, Union

from lrnnx_zoo.hub import path_trouble
from lrnnx_zoo.hub_save import nearest_existing
from lrnnx_zoo.utf8 import expand_home


def as_path(value: Any, what: str) -> Path:
    """``value`` (a str or os.PathLike) as a Path with ``~`` expanded; a TypeError naming ``what``
    (the argument) otherwise: Path(None) said only "expected str, bytes or os.PathLike object"."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{what} must be a str or os.PathLike, got {value!r} ({type(value).__name__})")
    return expand_home(value)


def check_output(path: Path, what: str, folder: bool = False, example: str = "model.onnx") -> None:
    """Refuse a ``path`` that cannot become the file (or, ``folder=True``, the folder) asked for.

    Raises IsADirectoryError / NotADirectoryError naming ``what`` (the argument), the path and what
    was expected; a ValueError for a path that cannot be looked up (too long a name, a symlink loop)."""
    trouble = path_trouble(path)
    if trouble:
        raise ValueError(f"cannot write {what} {path}: the path cannot be looked up, {trouble}")
    if folder and path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} {path} is a file; expected a folder (it is created if missing)")
    if not folder and path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder; expected a file path, e.g. {path / example}")
    ancestor = nearest_existing(path if folder else path.parent)
    if not ancestor.is_dir():
        raise NotADirectoryError(f"cannot write {what} {path}: {ancestor} is a file, expected a folder")


@contextlib.contextmanager
def output_location(path: Union[str, Path], what: str, folder: bool = False, example: str = "model.onnx"
                    ) -> Iterator[Path]:
    """Check ``path`` (a file, or a folder with ``folder=True``), create its missing folders, yield
    it as a Path, and on an exception remove the folders created here (those still empty).

    ``what`` names the argument in messages (e.g. "path", "out_dir"); ``example``, a file name of the
    format written, completes a folder given for a file ("model.ts" for TorchScript).
    Raises IsADirectoryError / NotADirectoryError naming the path and what was expected.
    """
    path = as_path(path, what)
    check_output(path, what, folder, example)
    ancestor = nearest_existing(path if folder else path.parent)
    created: List[Path] = []
    missing = path if folder else path.parent
    while missing != ancestor:
        created.append(missing)
        missing = missing.parent
    for f in reversed(created):
        f.mkdir()
    try:
        yield path
    except BaseException:
        for f in created:                       # innermost first; a folder with files stays
            with contextlib.suppress(OSError):
                f.rmdir()
        raise
