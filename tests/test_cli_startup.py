"""``lrnnx-zoo`` before and around its work: what --help, --version and a usage error import, a
Ctrl-C at any moment (while torch loads, or while an export writes), and a reader that leaves the
pipe early. Each case runs in a fresh process: what a process imported, and its exit status, are
the things under test. No wall time is asserted (a loaded machine would make that flaky): the
check is that torch is not imported."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

#: Modules that cost a second or more to import; none is needed to parse a command line.
HEAVY = ("torch", "onnx", "onnxruntime", "pluggy", "huggingface_hub", "numpy")


def run_python(code: str, *, env: Optional[Dict[str, str]] = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -c code`` with SIGINT at its default (as from a terminal), text output captured."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["export", "--help"], ["evaluate", "--help"],
                                  ["train", "--help"], ["info", "--help"],
                                  ["export", "nosuchthing"],                 # --out missing: a usage error
                                  ["train", "digits-s4d", "--out", "x", "--epochs", "0"], ["nosuchcommand"],
                                  # flags that do not go together: refused before torch loads
                                  ["export", "digits-lru", "--out", "x", "--format", "torchscript", "--quantize", "int8"],
                                  ["export", "digits-lru", "--out", "x", "--format", "torchscript", "--batch", "2"]])
def test_help_version_and_usage_errors_do_not_import_torch(argv: List[str]):
    # `lrnnx-zoo --version` took 1.8 s and every --help or usage error 1.5-4 s: `import lrnnx_zoo`
    # imported torch, pluggy and the hub code before argparse ran, and the subcommand modules
    # imported the library at their top. `export --format torchscript --quantize int8` was refused
    # by export_folder's checks, after torch and the exporters had loaded (1.5-6 s).
    code = ("import sys\nfrom lrnnx_zoo.cli import main\n"
            f"try:\n    status = main({argv!r})\nexcept SystemExit as exc:\n    status = exc.code\n"
            f"print(status, sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n")
    done = run_python(code)
    status, imported = done.stderr.strip().splitlines()[-1].split(" ", 1)
    assert imported == "[]", done.stderr
    assert status == ("0" if "--help" in argv or "--version" in argv else "2"), done.stderr


def test_importing_the_package_imports_no_library_yet_its_names_still_work():
    done = run_python("import sys, lrnnx_zoo\n"
                      f"before = [m for m in {HEAVY!r} if m in sys.modules]\n"
                      "from lrnnx_zoo import create_layer, hookimpl\n"
                      "print(before, 'torch' in sys.modules, lrnnx_zoo.wording.__name__, hookimpl.project_name)\n")
    assert done.stdout.split() == ["[]", "True", "lrnnx_zoo.wording", "lrnnx_zoo"], done.stderr


def _interrupt_in_import_of(module: str) -> str:
    """Source that sends this process SIGINT when ``module`` is first imported (a Ctrl-C while it loads)."""
    return ("import os, signal, sys\n"
            "class CtrlC:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name == {module!r}:\n"
            "            sys.meta_path.remove(self)\n"
            "            os.kill(os.getpid(), signal.SIGINT)\n"
            "        return None\n"
            "sys.meta_path.insert(0, CtrlC())\n")


def test_ctrl_c_while_torch_loads_is_one_line_and_status_130():
    # The first 1-2 s of every command import torch: a Ctrl-C then printed a 30-line KeyboardInterrupt
    # traceback from `from lrnnx_zoo.cli import main` (main's handler was not yet running).
    done = run_python(_interrupt_in_import_of("torch") + "from lrnnx_zoo.cli import main\nsys.exit(main(['layers']))\n")
    assert (done.returncode, done.stderr, done.stdout) == (130, "lrnnx-zoo layers: interrupted\n", ""), done.stderr


def _interrupt_after(module: str, function: str) -> str:
    """Source that makes ``module.function`` send this process SIGINT once it has done its work."""
    return ("import functools, importlib, os, signal\n"
            f"owner = importlib.import_module({module!r})\n"
            f"real = getattr(owner, {function!r})\n"
            "@functools.wraps(real)\n"
            "def then_ctrl_c(*args, **kwargs):\n"
            "    value = real(*args, **kwargs)\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    return value\n"
            f"setattr(owner, {function!r}, then_ctrl_c)\n")


@pytest.mark.parametrize("moment", ["torch import", "graph written", "weights written"])
def test_ctrl_c_during_export_leaves_no_folder_and_no_staging_copy(tmp_path: Path, moment: str):
    # An export writes into a hidden sibling (.OUT.tmp-XXXXXXXX) and swaps it in at the end; a Ctrl-C
    # at any moment must leave neither that sibling nor a half-written --out, and say one line.
    prelude = {"torch import": _interrupt_in_import_of("torch"),
               "graph written": _interrupt_after("lrnnx_zoo.export.folder", "to_torchscript"),
               "weights written": _interrupt_after("lrnnx_zoo.export.folder", "write_safetensors")}[moment]
    out = tmp_path / "exported"
    argv = ["export", "digits-lru", "--out", str(out), "--format", "torchscript", "--latency-steps", "0",
            "--validation-length", "8"]
    done = run_python(prelude + f"import sys\nfrom lrnnx_zoo.cli import main\nsys.exit(main({argv!r}))\n")
    assert (done.returncode, done.stderr) == (130, "lrnnx-zoo export: interrupted\n"), done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "left behind"


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["backends"]])
def test_a_reader_leaving_the_pipe_early_gets_no_broken_pipe_message(argv: List[str]):
    # `lrnnx-zoo backends | head -1` (and --help, layers, plugins, export ...): the output waited in
    # Python's buffer until the flush at exit, after main had returned, which printed "Exception
    # ignored in: <_io.TextIOWrapper name='<stdout>' ...> BrokenPipeError" and exited 120.
    # PYTHONUNBUFFERED (set in some CI and dev shells) hid it: each print then raised inside main.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    # the reader has left before the first line: the pipe's read end is closed before the process
    # starts (closing it after the start raced the process, which could have written into the pipe)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "lrnnx_zoo", *argv], stdout=write_end,
                              stderr=subprocess.PIPE, env=env, timeout=120)
    finally:
        os.close(write_end)
    err, status = done.stderr.decode(), done.returncode
    assert "BrokenPipeError" not in err and "Exception ignored" not in err, err
    assert status == (0 if argv[0].startswith("--") else 1), err    # argparse's own status for --help


def test_console_script_and_python_dash_m_give_the_same_usage_error():
    # The same program name in the usage line and the same exit status whichever way it is run.
    script = shutil.which("lrnnx-zoo", path=os.path.dirname(sys.executable)) or shutil.which("lrnnx-zoo")
    if script is None:
        pytest.skip("the lrnnx-zoo console script is not installed beside this interpreter")
    argv = ["export", "nosuchthing"]
    by_script = subprocess.run([script, *argv], capture_output=True, text=True, timeout=120)
    by_module = subprocess.run([sys.executable, "-m", "lrnnx_zoo", *argv], capture_output=True, text=True, timeout=120)
    assert by_script.returncode == by_module.returncode == 2
    assert by_script.stderr == by_module.stderr
    assert by_module.stderr.startswith("usage: lrnnx-zoo export "), by_module.stderr
