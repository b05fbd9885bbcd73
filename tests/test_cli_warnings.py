"""How ``lrnnx-zoo`` shows a warning raised while a command runs: one ``lrnnx-zoo COMMAND: warning: TEXT``
line on stderr, whichever command (``train`` alone did so; the others showed Python's
``/path/to/lrnnx-zoo:8: PluginVersionWarning: TEXT`` and the script's line ``sys.exit(console_main())``),
with the user's ``-W`` / ``PYTHONWARNINGS`` filters deciding whether, and how often, it is shown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Iterator, List

import pytest

import lrnnx_zoo
from lrnnx_zoo import registry
from lrnnx_zoo.cli import main, run_commands
from lrnnx_zoo.registry import DISABLE_AUTOLOAD_ENV, PluginVersionWarning
from plugin_fixtures import GOOD_PLUGIN, activate, installed, make_distribution, reinstall

NOTE = "tp_warny: the fast kernel is not built; using the slow one"


def _warny(root: Path) -> Path:
    """A distribution whose plugin module warns (NOTE, a UserWarning) when imported, and registers 'wema'."""
    code = f"import warnings\nwarnings.warn({NOTE!r})\n" + GOOD_PLUGIN.replace("{layer_name}", "wema")
    make_distribution(root, "tp-warny", {"tp_warny": code}, {"warny": "tp_warny"})
    return root


@pytest.fixture
def warny_unloaded(tmp_path: Path, monkeypatch) -> Iterator[None]:
    """tp-warny installed, and no plugin loaded yet: the next command loads them, and hears its warning."""
    activate(_warny(tmp_path / "site"), monkeypatch)
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    monkeypatch.setattr(registry, "_registry", None)         # the registry of before comes back afterwards
    monkeypatch.setattr(registry, "_pm", None)
    yield
    sys.modules.pop("tp_warny", None)


@pytest.mark.parametrize("command", ["plugins", "layers", "backends"])
@pytest.mark.parametrize("as_json", [False, True])
def test_a_plugins_warning_is_one_line_of_the_command(warny_unloaded, capsys, command: str, as_json: bool):
    status = main([command] + (["--json"] if as_json else []))
    out, err = capsys.readouterr()
    assert status == 0 and err == f"lrnnx-zoo {command}: warning: {NOTE}\n", err
    if as_json:
        json.loads(out)                              # stdout holds the JSON document alone
    assert "wema" in lrnnx_zoo.list_layers()


def _ema_dist(where: Path, version: str) -> Path:
    return make_distribution(where, "tp-good", {"tp_good": GOOD_PLUGIN.replace("{layer_name}", "ema")},
                             {"ema": "tp_good"}, version)


@pytest.fixture
def saved_with_another_release(tmp_path: Path, monkeypatch) -> Iterator[tuple]:
    """(a checkpoint saved with tp-good 1.0.0, the PluginVersionWarning's text), with tp-good 2.0.0 installed."""
    with installed(_ema_dist(tmp_path / "v1", "1.0.0"), monkeypatch):
        folder = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer="ema", d_input=1, d_output=2, d_model=4,
                                                               n_layers=1)).save_pretrained(tmp_path / "ck")
        reinstall(monkeypatch, _ema_dist(tmp_path / "v2", "2.0.0"))
        with pytest.warns(PluginVersionWarning) as record:
            lrnnx_zoo.from_pretrained(folder)
        yield folder, str(record[0].message)


@pytest.mark.parametrize("command", ["export", "evaluate", "train", "push"])
def test_a_plugin_version_warning_is_one_line_of_the_command(saved_with_another_release, tmp_path, capsys, command,
                                                             request):
    folder, text = saved_with_another_release
    argv = {"export": ["export", str(folder), "--out", str(tmp_path / "out"), "--format", "torchscript",
                       "--latency-steps", "0", "--validation-length", "4"],
            "evaluate": ["evaluate", str(folder), "--json"],      # refused after loading: it records no data spec
            "train": ["train", "digits-tiny", "--out", str(tmp_path / "run"), "--layer", "ema",
                      "--init-from", str(folder)],                # refused after loading: another model's sizes
            "push": ["push", str(folder), "acme/ema"]}[command]
    if command == "push":
        request.getfixturevalue("local_hub")
    status = main(argv)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert lines[0] == f"lrnnx-zoo {command}: warning: {text}", err
    assert sum(text in line for line in lines) == 1 and "console_main" not in err, err
    assert status == {"export": 0, "evaluate": 2, "train": 2, "push": 0}[command], err
    if command == "evaluate":
        assert out == ""                              # --json: no warning on stdout


class _Trained(Exception):
    """Raised where training would start (the warning about epochs comes before)."""


def test_the_users_filters_say_whether_a_warning_is_shown(saved_with_another_release, tmp_path, capsys,
                                                          monkeypatch):
    # train showed its own warnings (EpochsNotReachedWarning, ...) whatever the filters said: `-W error`
    # did not stop the run, `-W ignore` did not silence them.
    from lrnnx_zoo import training
    from lrnnx_zoo.training import EpochsNotReachedWarning
    monkeypatch.setattr(training, "_run", lambda *a, **k: (_ for _ in ()).throw(_Trained()))
    folder, _ = saved_with_another_release
    argv = ["train", "digits-tiny", "--out", str(tmp_path / "run"), "--epochs", "3"]   # 8 steps of 132
    with warnings.catch_warnings():
        warnings.simplefilter("error", EpochsNotReachedWarning)
        with pytest.raises(EpochsNotReachedWarning, match="--epochs 3 asks for 132 optimiser steps"):
            main(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginVersionWarning)
        with pytest.raises(PluginVersionWarning):
            main(["evaluate", str(folder)])
    assert capsys.readouterr().err == ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(_Trained):
            main(argv)
        assert main(["evaluate", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "warning" not in err and err.startswith("lrnnx-zoo evaluate: this checkpoint records no data spec"), err
    with pytest.raises(_Trained):
        main(argv)                                  # the default filters: shown
    assert capsys.readouterr().err.startswith("lrnnx-zoo train: warning: --epochs 3 asks for 132 optimiser steps")


def _warning_command(args) -> int:
    for _ in range(3):
        warnings.warn("said three times from one place")
    warnings.warn("said once", FutureWarning)
    return 0


def _one_command_parser():
    import argparse
    parser = argparse.ArgumentParser(prog="lrnnx-zoo")
    parser.add_subparsers(dest="command", required=True).add_parser("warn")
    return parser


def test_a_warning_repeated_from_one_place_is_shown_once_per_command(capsys):
    # Python's default filter shows it once per place; each command shows it afresh, as its own process would
    for _ in range(2):
        assert run_commands(_one_command_parser, {"warn": _warning_command}, ["warn"]) == 0
        assert capsys.readouterr().err.splitlines() == ["lrnnx-zoo warn: warning: said three times from one place",
                                                        "lrnnx-zoo warn: warning: said once"]
    assert warnings.showwarning is not None and "lrnnx_zoo" not in repr(warnings.showwarning)   # put back


@pytest.mark.parametrize("flags", [[], ["-W", "ignore::UserWarning"]])
def test_the_command_in_its_own_process_shows_one_line_and_keeps_the_json_clean(tmp_path: Path, flags: List[str]):
    env = {**os.environ, "PYTHONPATH": str(_warny(tmp_path / "site"))}
    env.pop(DISABLE_AUTOLOAD_ENV, None)
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run([sys.executable, *flags, "-m", "lrnnx_zoo", "layers", "--json"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ("" if flags else f"lrnnx-zoo layers: warning: {NOTE}\n"), done.stderr
    assert "wema" in [layer["name"] for layer in json.loads(done.stdout)]


def test_a_warning_while_a_progress_bar_is_open_is_a_line_of_its_own(capsys):
    # A warning during a push's upload (or train's epochs) was written onto the open bar's line:
    # "model.safetensors:  30%|###       | 3/10 [...]lrnnx-zoo push: warning: TEXT".
    from tqdm import tqdm
    from lrnnx_zoo.cli import warning_line
    from lrnnx_zoo.thread_warnings import this_threads_display

    bar = tqdm(total=10, desc="model.safetensors", file=sys.stderr, mininterval=0)
    try:
        bar.update(3)
        with warnings.catch_warnings(), this_threads_display(warning_line("push")):
            warnings.simplefilter("always")
            warnings.warn("the Hub is slow today")
    finally:
        bar.close()
    err = capsys.readouterr().err
    said = [line for line in err.split("\n") if "warning:" in line]
    # what a terminal shows of that line: the text after its last carriage return
    assert [line.split("\r")[-1] for line in said] == ["lrnnx-zoo push: warning: the Hub is slow today"], err
