"""What differs on Windows and macOS, simulated on Linux where the rule can be reproduced.

The suite runs on Linux only, so each test below recreates one rule of another platform in this
process (CPython's own Windows code path, a Windows system call's refusal, a Windows console's
encoding) and checks the library keeps working under it.
"""

from __future__ import annotations

import errno
import io
import os
import pathlib
import sys
import types

import pytest

if not sys.platform.startswith("linux"):      # the simulations read /proc/self/fd and use fcntl
    pytest.skip("simulates Windows on Linux", allow_module_level=True)

import fcntl  # noqa: E402

import torch

import lrnnx_zoo
from lrnnx_zoo import folder_swap
from lrnnx_zoo.training_state import read_snapshot, write_snapshot


def small_model() -> lrnnx_zoo.SequenceModel:
    torch.manual_seed(0)
    cfg = lrnnx_zoo.ModelConfig(layer="s4d", d_input=3, d_output=2, d_model=8, n_layers=1,
                                layer_kwargs={"d_state": 4})
    return lrnnx_zoo.SequenceModel(cfg).eval()


def test_the_folder_swap_module_loads_on_windows(monkeypatch):
    # CPython's ctypes.CDLL takes its Windows branch when os.name is "nt" (it imports nt for a flag);
    # there CDLL(None) is `'/' in None`, a TypeError that failed the import of folder_swap (which looks
    # renameat2 up at import), and so every save and export
    with monkeypatch.context() as m:          # undone before pytest reports: its paths read os.name
        m.setattr(os, "name", "nt")
        m.setitem(sys.modules, "nt", types.SimpleNamespace(_LOAD_LIBRARY_SEARCH_DEFAULT_DIRS=0x1000))
        on_windows(m)
        try:
            found = folder_swap._renameat2()
        except Exception as exc:        # noqa: BLE001 - shown below, once os.name is restored
            found = exc
    assert found is None, repr(found)   # then two renames swap the folder, as on macOS


def on_windows(monkeypatch) -> None:
    """sys.platform "win32" as folder_swap sees it (set for the whole process, it sent the libraries
    imported on the way, such as filelock, down their Windows branches, which need msvcrt)."""
    monkeypatch.setattr(folder_swap, "sys", types.SimpleNamespace(platform="win32"), raising=False)


@pytest.fixture
def windows_fsync(monkeypatch):
    """sys.platform "win32", no renameat2, and os.fsync refusing a handle that may not write, as
    Windows' FlushFileBuffers does (os.fsync there raises EBADF for a file opened "rb")."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    on_windows(monkeypatch)
    monkeypatch.setattr(folder_swap, "_RENAMEAT2", None)


def test_saving_on_windows_flushes_through_a_handle_that_may_write(windows_fsync, tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path / "ckpt")
    model.save_pretrained(tmp_path / "ckpt")           # over an existing checkpoint: the swap
    loaded = lrnnx_zoo.from_pretrained(tmp_path / "ckpt")
    x = torch.randn(2, 5, 3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))       # the same float32 weights: bit for bit
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]    # no hidden sibling left


def test_a_training_snapshot_is_written_on_windows(windows_fsync, tmp_path):
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    folder = write_snapshot(tmp_path, 7, tensors, {"note": "x"})
    read, record = read_snapshot(folder)
    assert torch.equal(read["w"], tensors["w"]) and record["step"] == 7


def test_the_demo_escapes_a_name_a_cp1252_stdout_cannot_print(monkeypatch, capsys):
    # A Windows stdout redirected to a file is cp1252, strict: printing a checkpoint path under a user
    # folder such as "Łukasz" raised UnicodeEncodeError, a ValueError the demo reported as the
    # checkpoint's own error ("'charmap' codec can't encode ..."), and the checkpoint never ran
    from lrnnx_zoo import demo

    raw = io.BytesIO()
    stdout = io.TextIOWrapper(raw, encoding="cp1252", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(demo, "tune_allocator", lambda: False)     # the process-wide malloc setting
    assert demo.main(["./\u0141ukasz-missing"]) == 2
    stdout.flush()
    err = capsys.readouterr().err
    assert "codec" not in err and "no checkpoint" in err
    assert raw.getvalue().decode("cp1252") == "== ./\\u0141ukasz-missing\n"


def _open_here(path) -> bool:
    """Whether this process has ``path`` (or a file under it) open, read from /proc/self/fd."""
    target = os.path.realpath(path)
    for fd in os.listdir("/proc/self/fd"):
        try:
            held = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if held == target or held.startswith(target + os.sep):
            return True
    return False


@pytest.fixture
def windows_open_files(monkeypatch):
    """Windows' rule for open files: one that is open (or a folder holding one) cannot be deleted,
    renamed or replaced (PermissionError, WinError 32); Linux allows all three."""
    for name, paths in (("unlink", 1), ("remove", 1), ("rmdir", 1), ("rename", 2), ("replace", 2)):
        real = getattr(os, name)

        def refusing(*args, _real=real, _paths=paths, **kwargs):
            for path in args[:_paths]:
                if _open_here(path):
                    raise PermissionError(errno.EACCES, "[WinError 32] The process cannot access the file "
                                          "because it is being used by another process", os.fspath(path))
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, refusing)


def test_a_torchscript_export_deletes_its_scratch_file_after_closing_it(windows_open_files, tmp_path):
    # _save_torchscript re-reads torch.jit.save's archive through a reader that held it open until the
    # reader was freed, after the unlink of the scratch file: on Windows that unlink failed, and so
    # did every TorchScript export
    from lrnnx_zoo.export import to_torchscript
    from lrnnx_zoo.export.torchscript_export import load_torchscript

    model = small_model()
    result = to_torchscript(model, tmp_path / "m.ts", validate=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ts"]
    graph = load_torchscript(result.path)
    x, state = torch.randn(2, 3), torch.zeros(2, result.state_size)
    y, _ = graph(x, state)
    with torch.no_grad():       # a one-step sequence from the zero state; float32, other op order: 1e-5
        torch.testing.assert_close(y, model(x[:, None]).reshape(2, 2), rtol=0, atol=1e-5)


@pytest.fixture
def windows_text_mode(monkeypatch):
    """Path.write_text as on Windows: with newline=None (the default) each "\\n" is written as
    os.linesep there, "\\r\\n"; a newline given is kept."""
    real = pathlib.Path.write_text

    def write_text(self, data, encoding=None, errors=None, newline=None):
        if newline is None:
            data, newline = data.replace("\n", "\r\n"), ""
        return real(self, data, encoding=encoding, errors=errors, newline=newline)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)


def test_text_files_are_written_with_the_same_bytes_on_windows(windows_text_mode, tmp_path):
    # config.json, an export's config.json and card, and a snapshot's record were written in text
    # mode: "\r\n" on Windows, so one model saved there and on Linux gave different files (and a
    # re-push uploaded them again), beside a model card huggingface_hub writes with "\n"
    from lrnnx_zoo.export import export_folder

    model = small_model()
    model.save_pretrained(tmp_path / "ckpt")
    export_folder(model, tmp_path / "onnx", latency_steps=20, validation_length=16)
    snapshot = write_snapshot(tmp_path / "run", 1, {"w": torch.ones(2)}, {})
    written = [tmp_path / "ckpt" / "config.json", tmp_path / "ckpt" / "README.md",
               tmp_path / "onnx" / "config.json", tmp_path / "onnx" / "README.md", *snapshot.glob("*.json")]
    assert len(written) == 5
    crlf = [p.relative_to(tmp_path).as_posix() for p in written if b"\r\n" in p.read_bytes()]
    assert not crlf, f"written with \\r\\n: {crlf}"
