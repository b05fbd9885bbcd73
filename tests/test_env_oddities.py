"""The library and the ``lrnnx-zoo`` command under the conditions real users run them in: files this
user may not read, ``python -OO`` (no docstrings), an ASCII stdout, SIGTERM, torchrun's variables
left in the environment, a ``~`` with no home to expand to, Ctrl-C in the demo (an audit).

Conditions a root test process cannot create for real (a file root may not read) are simulated at
the one call that meets them, with the error the operating system gives there.
"""

from __future__ import annotations

import builtins
import errno
import pathlib
import re

import pytest

import lrnnx_zoo
from lrnnx_zoo import hub
from lrnnx_zoo.cli import main


def _permission_denied_for(monkeypatch: pytest.MonkeyPatch, target: pathlib.Path) -> None:
    """Opening ``target`` (by ``open`` or ``Path.open``) fails as for a file mode 000 to a non-root user."""
    real_open, real_path_open = builtins.open, pathlib.Path.open

    def refuse(path: object) -> None:
        if pathlib.Path(str(path)).resolve() == target.resolve():
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

    def fake_open(file, *args, **kwargs):
        refuse(file)
        return real_open(file, *args, **kwargs)

    def fake_path_open(self, *args, **kwargs):
        refuse(self)
        return real_path_open(self, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(pathlib.Path, "open", fake_path_open)


@pytest.fixture
def copied(tmp_path: pathlib.Path) -> pathlib.Path:
    """A copy of a shipped checkpoint folder (config.json, model.safetensors, README.md)."""
    import shutil
    folder = tmp_path / "ckpt"
    shutil.copytree(lrnnx_zoo.hub.shipped_checkpoints()["digits-lru"], folder)
    return folder


@pytest.mark.parametrize("command", ["info", "evaluate"])
def test_a_model_card_this_user_may_not_read_is_named_not_a_traceback(command, copied, monkeypatch, capsys):
    # `lrnnx-zoo info DIR` and `evaluate DIR` ended in a PermissionError traceback when README.md was
    # mode 000 (a copied or shared folder): from_pretrained never reads the card, so only these failed.
    _permission_denied_for(monkeypatch, copied / "README.md")
    assert main([command, str(copied)]) == 0
    out, err = capsys.readouterr()
    said = out if command == "info" else err
    assert "README.md (the model card) cannot be read: PermissionError" in said, (out, err)


def test_weights_this_user_may_not_read_are_not_called_corrupt(copied, monkeypatch):
    # safetensors reports a weights file without read permission as "No such file or directory", and
    # from_pretrained said the file was "truncated or corrupt" and advised re-saving it.
    from safetensors import SafetensorError
    weights = copied / "model.safetensors"
    _permission_denied_for(monkeypatch, weights)
    message = hub._unreadable(weights, SafetensorError("No such file or directory (os error 2)"))
    assert "corrupt" not in message and "cannot be read (Permission denied)" in message, message
    assert "permissions" in message


def test_demo_help_keeps_its_description_without_docstrings(monkeypatch, capsys):
    # `python -OO -m lrnnx_zoo.demo --help` (docstrings stripped) printed only the usage and the
    # options: the description was the module docstring.
    from lrnnx_zoo import demo
    monkeypatch.setattr(demo, "__doc__", None)                 # what -OO leaves
    with pytest.raises(SystemExit) as stop:
        demo.main(["--help"])
    assert stop.value.code == 0
    assert "The main job: a shipped checkpoint from load to edge." in capsys.readouterr().out


def test_a_non_ascii_folder_name_on_an_ascii_stdout_is_escaped_not_a_traceback(copied, tmp_path, monkeypatch):
    # `PYTHONIOENCODING=ascii lrnnx-zoo evaluate DIR`, DIR named with a u-umlaut or Chinese characters (or
    # a Windows cp1252 stdout redirected to a file), measured the metrics, then ended in a
    # UnicodeEncodeError traceback printing the name.
    import io
    import sys
    folder = copied.rename(tmp_path / "\u00fcber \u4e2d\u6587")
    raw = io.BytesIO()
    stdout = io.TextIOWrapper(raw, encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["evaluate", str(folder)]) == 0
    stdout.flush()
    assert b"\\xfcber \\u4e2d\\u6587: 360 test sequences" in raw.getvalue(), raw.getvalue()
    assert stdout.errors == "strict"                       # the caller's stream is given back as it was


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_during_export_leaves_no_staging_folder_and_says_so(signame, tmp_path, monkeypatch, capsys):
    # SIGTERM (`timeout 60 lrnnx-zoo export ...`, a job scheduler, `docker stop`) killed the export
    # outright, exit 143 and no word, and left its hidden staging folder .OUT.tmp-XXXXXXXX beside
    # --out each time; only train turned SIGTERM into a clean stop. SIGHUP (the terminal closed) did
    # the same after SIGTERM was handled.
    import os
    import signal
    import threading
    from lrnnx_zoo.export import folder as export_folder_module
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("Python runs signal handlers on the main thread only")
    signum = getattr(signal, signame)

    def half_written(model, path, **kwargs):
        pathlib.Path(path).write_bytes(b"half a graph")
        os.kill(os.getpid(), signum)
        raise AssertionError(f"the export went on after {signame}")
    monkeypatch.setattr(export_folder_module, "to_onnx", half_written)
    heard = []

    def callers(*_: object) -> None:       # the caller's own handler (without one, old code killed pytest)
        heard.append(1)
    before = signal.signal(signum, callers)
    try:
        code = main(["export", "digits-lru", "--out", str(tmp_path / "out"), "--latency-steps", "0"])
        after = signal.getsignal(signum)
    finally:
        signal.signal(signum, before)
    assert code == 128 + signum and not heard and after is callers        # and the caller's handler is put back
    assert capsys.readouterr().err == f"lrnnx-zoo export: terminated by {signame}\n"
    assert sorted(os.listdir(tmp_path)) == [], os.listdir(tmp_path)


def test_a_hangup_the_caller_ignores_stays_ignored(tmp_path, monkeypatch):
    # `nohup lrnnx-zoo train ...`: SIGHUP is ignored so that the run outlives its terminal; a command must
    # not turn it back into a stop
    import os
    import signal
    import threading
    from lrnnx_zoo.export import folder as export_folder_module
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("Python runs signal handlers on the main thread only")

    def hung_up(model, path, **kwargs):
        os.kill(os.getpid(), signal.SIGHUP)
        raise RuntimeError("carried on after the ignored hangup")
    monkeypatch.setattr(export_folder_module, "to_onnx", hung_up)
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with pytest.raises(RuntimeError, match="carried on after the ignored hangup"):
            main(["export", "digits-lru", "--out", str(tmp_path / "out"), "--latency-steps", "0"])
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


@pytest.mark.parametrize("env, said", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 says this is one of 2 processes, but RANK, MASTER_ADDR, MASTER_PORT are "
                          "not set, as torchrun sets them: launch it with torchrun"),
    ({"WORLD_SIZE": "abc"}, "environment variable WORLD_SIZE is 'abc'; expected an integer"),
])
def test_a_stray_or_malformed_world_size_is_one_line_before_training(env, said, tmp_path, monkeypatch, capsys):
    # WORLD_SIZE left in the environment without torchrun's other variables (a scheduler's, another
    # job's) made `lrnnx-zoo train` fail in torch's rendezvous with a 30-line ValueError traceback, and
    # WORLD_SIZE=abc in a bare int() one.
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    assert main(["train", "digits-tiny", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lrnnx-zoo train: {said}") and err.count("\n") == 1, err
    assert not out.exists()


def test_a_stray_rank_outside_torchrun_neither_fails_nor_hides_the_metrics(tmp_path, monkeypatch, capsys):
    # RANK means something only under torchrun (WORLD_SIZE > 1): RANK=x failed with a ValueError
    # traceback after the run had trained and saved, and RANK=1 hid the metrics line of a one-process run.
    import lrnnx_zoo.training as training
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(training, "train", lambda recipe, **kwargs: (None, {"test_accuracy": 0.5}))
    for rank in ("x", "1"):
        monkeypatch.setenv("RANK", rank)
        assert main(["train", "digits-tiny", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
        assert capsys.readouterr().out == '{"test_accuracy": 0.5}\n'


@pytest.mark.parametrize("script", ["bench_cauchy", "bench_kernels"])
def test_benchmark_help_runs_without_docstrings(script, monkeypatch, capsys):
    # `python -OO benchmarks/bench_cauchy.py --help` (and bench_kernels) died in an AttributeError:
    # their description was __doc__.splitlines()[0], and -OO leaves __doc__ None.
    import importlib.util
    import sys
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(f"_oo_{script}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.__doc__ = None                                        # what -OO leaves
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as stop:
        module.main()
    assert stop.value.code == 0 and "--repeats" in capsys.readouterr().out


@pytest.mark.parametrize("argv, said", [
    (["info", "~/runs/m"], "cannot expand ~ in '~/runs/m': HOME is not set and this user has no home directory"),
    (["export", "digits-lru", "--out", "~/m-onnx"], "cannot expand ~ in '~/m-onnx': HOME is not set"),
    (["info", "~no-such-user-x/m"], "cannot expand ~no-such-user-x in '~no-such-user-x/m': there is no user "
                                    "'no-such-user-x'; pass the full path (./~no-such-user-x/m"),
])
def test_a_tilde_that_cannot_be_expanded_is_a_usage_error(argv, said, monkeypatch, capsys):
    # HOME unset for a user without a home directory (a container's arbitrary uid), or ~name for no such
    # user: every command taking a path ended in "RuntimeError: Could not determine home directory."
    import pwd

    def no_entry(uid: int) -> None:
        raise KeyError(f"getpwuid(): uid not found: {uid}")
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"lrnnx-zoo: error: {said}" in err and "Traceback" not in err, err


@pytest.mark.parametrize("call", ["from_pretrained", "save_pretrained", "to_onnx"])
@pytest.mark.parametrize("home", ["unset", "no such user"])
def test_a_tilde_the_python_api_cannot_expand_says_why(call, home, tmp_path, monkeypatch):
    # The command line said why; from Python, from_pretrained, save_pretrained and to_onnx raised
    # "RuntimeError: Could not determine home directory." from deep inside pathlib.
    import pwd

    import lrnnx_zoo
    from lrnnx_zoo.export import to_onnx
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer="s4d", d_input=1, d_output=1, d_model=4, n_layers=1,
                                                          layer_kwargs={"d_state": 2}))
    if home == "unset":
        def no_entry(uid: int) -> None:
            raise KeyError(f"getpwuid(): uid not found: {uid}")
        monkeypatch.delenv("HOME", raising=False)
        monkeypatch.setattr(pwd, "getpwuid", no_entry)
        path, said = "~/runs/m", "cannot expand ~ in '~/runs/m': HOME is not set and this user has no home directory"
    else:
        path, said = "~no-such-user-x/m", "cannot expand ~no-such-user-x in '~no-such-user-x/m': there is no user"
    run = {"from_pretrained": lambda: lrnnx_zoo.from_pretrained(path),
           "save_pretrained": lambda: model.save_pretrained(path),
           "to_onnx": lambda: to_onnx(model, path)}[call]
    with pytest.raises(ValueError, match=re.escape(said)) as raised:
        run()
    if call == "from_pretrained":
        assert isinstance(raised.value, lrnnx_zoo.CheckpointError)


def test_a_tilde_in_an_argument_that_is_no_path_is_left_alone():
    # only paths are expanded: push --message "~ fixed" names no user
    from lrnnx_zoo.cli import build_parser, unexpandable_home
    args = build_parser().parse_args(["push", "digits-lru", "org/m", "--message", "~ fixed"])
    assert unexpandable_home(args) is None
    assert "no user" in unexpandable_home(build_parser().parse_args(["push", "~no-such-user-x", "org/m"]))


def test_ctrl_c_during_the_demo_is_one_line_and_status_130(monkeypatch, capsys):
    # Ctrl-C during `bash scripts/demo.sh` (the README's first command, which runs for a while) printed
    # a KeyboardInterrupt traceback; lrnnx-zoo's commands say "interrupted" and exit 130.
    from lrnnx_zoo import demo

    def interrupted(*args: object) -> int:
        raise KeyboardInterrupt
    monkeypatch.setattr(demo, "run", interrupted)
    try:
        code = demo.main([])
    except KeyboardInterrupt:                 # caught here, or pytest would stop the whole session
        code = "a KeyboardInterrupt traceback"
    assert code == 130 and capsys.readouterr().err == "demo: interrupted\n"


@pytest.mark.parametrize("argv", [["info", "org/m"], ["push", "digits-lru", "org/m"]])
def test_a_timeout_huggingface_hub_cannot_read_is_named(argv, monkeypatch, capsys):
    # HF_HUB_ETAG_TIMEOUT=2.5 (our own messages name the variable; hub_timeout reads it as a float) made
    # every Hub load and push fail as "invalid literal for int() with base 10: '2.5'": huggingface_hub
    # reads it with int() when its constants are first imported, and no variable was named.
    import sys
    import huggingface_hub
    import huggingface_hub.constants  # noqa: F401  (loaded with this environment, to be removed below)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2.5")
    monkeypatch.delitem(sys.modules, "huggingface_hub.constants")       # imported afresh, as in a new process
    monkeypatch.delattr(huggingface_hub, "constants")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"lrnnx-zoo {argv[0]}: huggingface_hub cannot start with HF_HUB_ETAG_TIMEOUT='2.5': it takes a "
                   "whole number of seconds there (e.g. 10); set one, or unset it for 10\n"), err


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_the_demo_stopped_by_a_signal_removes_its_temporary_folder(monkeypatch, capsys, signame):
    # `timeout 60 bash scripts/demo.sh all` (SIGTERM) or a closed terminal (SIGHUP) killed the demo
    # outright: no word, and its temporary folder of .onnx files stayed in /tmp.
    import os
    import signal
    import time
    from lrnnx_zoo import demo
    folders = []

    def signalled(name: str, out_dir: pathlib.Path, steps: int, stem: object = None) -> int:
        folders.append(out_dir)
        (out_dir / f"{name}.onnx").write_bytes(b"graph")
        os.kill(os.getpid(), getattr(signal, signame))
        time.sleep(5)                         # the handler raises here
        return 0
    monkeypatch.setattr(demo, "run", signalled)
    signum = getattr(signal, signame)
    caught = []                               # where the demo has no handler (old code), this one runs
    def ours(*_: object) -> None:             # rather than killing pytest
        caught.append(signum)
    previous = signal.signal(signum, ours)
    try:
        code = demo.main([])
        after = signal.getsignal(signum)
    finally:
        signal.signal(signum, previous)
    assert code == 128 + signum and capsys.readouterr().err == f"demo: terminated by {signame}\n"
    assert folders and not folders[0].exists() and not caught
    assert after is ours                      # the caller's handler put back


@pytest.fixture
def latin1_folder(tmp_path):
    """A folder whose name is no UTF-8 (Latin-1 bytes, as from an old archive): Python holds those bytes
    as lone surrogates. Skipped where the file system refuses such a name (macOS, Windows)."""
    import os
    folder = pathlib.Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/mod\xe8le"))
    try:
        folder.mkdir()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system takes UTF-8 names only")
    return folder


def test_a_folder_named_in_another_encoding_saves_loads_and_exports(latin1_folder):
    # Session 31: save_pretrained into such a folder worked and from_pretrained then reported its
    # weights as "truncated or corrupt" (safetensors refused the path as not UTF-8); loaded, its ONNX
    # export failed writing the source into the graph's metadata, the TorchScript and torch.export ones
    # failed in torch's archive readers, and an export folder's card could not be written.
    import numpy as np
    import torch

    from lrnnx_zoo.export import OnnxStreamer, export_folder, to_onnx, to_torch_export, to_torchscript
    from lrnnx_zoo.export.torchscript_export import load_torch_export, load_torchscript
    torch.manual_seed(0)
    cfg = lrnnx_zoo.ModelConfig(layer="s4d", d_input=2, d_output=2, d_model=8, n_layers=1,
                                layer_kwargs={"d_state": 4}, pooling=None)
    model = lrnnx_zoo.SequenceModel(cfg).eval()
    model.save_pretrained(latin1_folder)
    loaded = lrnnx_zoo.from_pretrained(latin1_folder)
    x = torch.randn(1, 16, 2)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(loaded(x), want)
    result = to_onnx(loaded, latin1_folder / "model.onnx")
    assert result.metadata["lrnnx_zoo.source"] == "local:mod\\xe8le"       # the byte, escaped
    streamer = OnnxStreamer(latin1_folder / "model.onnx")
    got = streamer.run(x.numpy())
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)            # float32 stream vs forward
    for export, load in ((to_torchscript, load_torchscript), (to_torch_export, load_torch_export)):
        path = latin1_folder / f"step.{export.__name__}"
        export(loaded, path)
        assert load(path) is not None
    out = export_folder(latin1_folder, latin1_folder / "exported", latency_steps=0)
    assert "local:mod\\xe8le" in (out.folder / "README.md").read_text(encoding="utf-8")
