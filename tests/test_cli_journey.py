"""``lrnnx-zoo`` as a user meets it from a shell: --version, ``python -m lrnnx_zoo``, each command's
own --help, Ctrl-C, and error messages that show the paths as typed."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import lrnnx_zoo
from lrnnx_zoo import cli
from lrnnx_zoo.cli import build_parser, main


def subcommands() -> dict:
    """name -> the subcommand's own ArgumentParser."""
    return dict(build_parser()._subparsers._group_actions[0].choices)


def test_version_flag_prints_the_package_version(capsys):
    # `lrnnx-zoo --version` was a usage error ("the following arguments are required: command").
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"lrnnx-zoo {lrnnx_zoo.__version__}\n"


def test_python_dash_m_runs_the_command_line():
    # `python -m lrnnx_zoo ...` said "No module named lrnnx_zoo.__main__" (exit 1): the usual way to
    # run a tool with a given interpreter, e.g. in a venv whose bin/ is not on PATH.
    done = subprocess.run([sys.executable, "-m", "lrnnx_zoo", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"lrnnx-zoo {lrnnx_zoo.__version__}\n", "")


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_each_command_help_says_what_it_does_with_an_example(name):
    # `lrnnx-zoo models --help` (and plugins, layers, backends, info, recipes) showed only
    # "usage:" and the options: the one-line summary of `lrnnx-zoo --help` was not repeated there,
    # and no command showed how it is called.
    text = subcommands()[name].format_help()
    description = text.split("\n\n")[1]
    assert not description.startswith(("positional arguments", "options")), text
    assert re.search(rf"\nexamples?:\n  lrnnx-zoo {name}\b", text), text


@pytest.mark.parametrize("command", ["models", "info", "evaluate", "export"])
def test_ctrl_c_ends_with_one_line_and_status_130(command, monkeypatch, capsys):
    # Ctrl-C during `lrnnx-zoo evaluate digits-s4` (or export, info, ...) printed a 20-line
    # KeyboardInterrupt traceback; only train caught it. Shells expect status 130 (128 + SIGINT).
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "build_parser", _parser_keeping(command, interrupted))
    argv = {"models": [], "info": ["digits-lru"], "evaluate": ["digits-lru"],
            "export": ["digits-lru", "--out", "x"]}[command]
    assert main([command, *argv]) == 130
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"lrnnx-zoo {command}: interrupted\n", captured.err


def _parser_keeping(command, handler):
    """build_parser, with COMMANDS[command] set to ``handler`` after the modules registered theirs."""
    real = build_parser

    def build():
        parser = real()
        cli.COMMANDS[command] = handler
        return parser
    return build


def test_ctrl_c_in_a_real_process_exits_130_without_a_traceback(tmp_path):
    # The same in a real process, signal and all: a SIGINT while `lrnnx-zoo info` runs.
    import signal
    code = ("import os, signal, sys, lrnnx_zoo.cli as cli\n"
            "cli.COMMANDS.clear()\n"
            "real = cli.build_parser\n"
            "def build():\n"
            "    p = real(); cli.COMMANDS['info'] = lambda a: os.kill(os.getpid(), signal.SIGINT); return p\n"
            "cli.build_parser = build\n"
            "sys.exit(cli.main(['info', 'digits-lru']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr == "lrnnx-zoo info: interrupted\n"


def test_failed_push_shows_a_relative_source_path_as_typed(local_hub, tmp_path, monkeypatch, capsys):
    # `lrnnx-zoo push t1 REPO` that failed ended "T1 is unchanged.": the sentence's capital letter
    # changed the folder's name (t1 and T1 are different folders on Linux).
    from huggingface_hub import HfApi
    monkeypatch.chdir(tmp_path)
    lrnnx_zoo.from_pretrained("digits-lru").save_pretrained(tmp_path / "t1")
    HfApi().create_repo("acme/other")
    HfApi().upload_file(path_or_fileobj=b'{"model_type": "bert"}', path_in_repo="config.json", repo_id="acme/other")
    assert main(["push", "t1", "acme/other"]) == 2
    err = capsys.readouterr().err
    assert "refusing to upload" in err and "T1" not in err and " t1 is unchanged." in err, err


def test_export_whose_graph_fails_validation_exits_1_not_2(tmp_path, monkeypatch, capsys):
    # A graph that did not reproduce the model exited 2, the status of a usage error (a bad flag),
    # though nothing in the command line was wrong; evaluate --check and a diverged train exit 1.
    import lrnnx_zoo.export.folder as folder
    from lrnnx_zoo.export.validate import ValidationError, ValidationReport
    report = ValidationReport(runtime="onnxruntime", max_abs_error=3.1e-2, tolerance=1e-4, errors={"final step": 3.1e-2},
                              batch=2, length=64, sequence="default", compared="outputs")

    def fails(*args, **kwargs):
        raise ValidationError(report)
    monkeypatch.setattr(folder, "export_folder", fails)
    assert main(["export", "digits-lru", "--out", str(tmp_path / "out"), "--latency-steps", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lrnnx-zoo export: onnxruntime step graph disagrees") and err.count("\n") == 1, err


def test_train_names_a_registry_error_in_one_line(monkeypatch, capsys, tmp_path):
    # A layer, initializer or backend the plugins do not provide (an ambiguous name, found by an
    # audit) ended `lrnnx-zoo train` with a 44-line traceback; evaluate and export print one line.
    import lrnnx_zoo.training
    from lrnnx_zoo.registry import RegistryError

    def unresolved(*args, **kwargs):
        raise RegistryError("unknown layer 'nope'; available: fftconv, lru, s4, s4d.")
    monkeypatch.setattr(lrnnx_zoo.training, "train", unresolved)
    assert main(["train", "digits-tiny", "--out", str(tmp_path / "run")]) == 2
    captured = capsys.readouterr()
    assert captured.err == "lrnnx-zoo train: unknown layer 'nope'; available: fftconv, lru, s4, s4d.\n", captured.err
