"""Checkpoint names as users type them: shipped names, folders and Hub repo ids, mistyped; and the
command line's errors about them, in its own words."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from lrnnx_zoo import CheckpointError, from_pretrained
from lrnnx_zoo.cli import main
from lrnnx_zoo.hub import shipped_checkpoints


def one_error_line(argv, capsys) -> str:
    """What `lrnnx-zoo ARGV` prints on stderr, after checking it exits 2 with one line, no stdout and no
    None standing for something a file does not record."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    assert not re.search(r"\bNone\b", captured.err), captured.err
    return captured.err


@pytest.mark.parametrize("typed, meant", [("digit-lru", "'digits-lru'"), ("digits-s4dd", "'digits-s4d'"),
                                          ("Digits-S4D", "'digits-s4d'"), ("sunspots", "'forecast-sunspots-s4d'")])
def test_a_mistyped_shipped_name_is_answered_at_once_with_the_close_names(local_hub, typed, meant):
    # from_pretrained("digit-lru") asked the Hub for a repo "digit-lru" (offline: up to the 10 s request
    # timeout), then said the Hub could not be reached and listed every shipped name. A Hub repo id
    # without a namespace holds no lrnnx-zoo checkpoint (repos are created as "user/name").
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=rf"no checkpoint '{typed}': .*did you mean {meant}\?.*"
                                              r"not a Hub repo id \(those are 'namespace/name'\)"):
        from_pretrained(typed)
    assert local_hub.requests == [], "asked the Hub about a name that cannot be a Hub checkpoint"
    assert time.monotonic() - start < 5


def test_several_close_names_are_all_offered_and_none_when_nothing_is_close(local_hub):
    with pytest.raises(CheckpointError, match=r"did you mean one of 'digits-fftconv', 'digits-lru', 'digits-s4', "
                                              r"'digits-s4d'\?"):
        from_pretrained("digits")
    with pytest.raises(CheckpointError, match=r"no checkpoint 'digits-s4d/'.*did you mean 'digits-s4d'\?"):
        from_pretrained("digits-s4d/")               # as a shell completes a folder name
    with pytest.raises(CheckpointError) as err:
        from_pretrained("zzz-unrelated")
    assert "did you mean" not in str(err.value) and ", ".join(shipped_checkpoints()) in str(err.value)
    assert local_hub.requests == []


def test_cli_typo_of_a_shipped_name_suggests_it(capsys, local_hub):
    for command in (["evaluate", "digits-s4dd"], ["info", "digits-s4dd"], ["export", "digits-s4dd", "--out", "x"]):
        err = one_error_line(command, capsys)
        assert err.startswith(f"lrnnx-zoo {command[0]}: no checkpoint 'digits-s4dd'") and \
            "did you mean 'digits-s4d'?" in err, err
    assert local_hub.requests == [] and not os.path.exists("x")


def test_a_mistyped_folder_suggests_the_checkpoint_folder_beside_it(tmp_path, monkeypatch, capsys, local_hub):
    # `lrnnx-zoo info runs/digts` (for runs/digits) asked the Hub for repo "runs/digts" and said only
    # that it was neither a local folder nor a shipped model nor on the Hub.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(shipped_checkpoints()["digits-lru"], tmp_path / "runs" / "digits")
    (tmp_path / "runs" / "notes").mkdir()                     # not a checkpoint: never suggested
    err = one_error_line(["info", "runs/digts"], capsys)
    assert f"did you mean {os.path.join('runs', 'digits')!r}?" in err and "has no such repo" in err, err
    with pytest.raises(CheckpointError, match=r"did you mean '.*digits'\?.* not in the Hub cache"):
        from_pretrained("runs/digitz", local_files_only=True)
    with pytest.raises(CheckpointError, match=r"did you mean '.*digits'\?.* not a valid Hub repo id"):
        from_pretrained(str(tmp_path / "runs" / "digitz"))


def test_a_hub_id_is_not_taken_for_a_typo_of_a_shipped_name(local_hub):
    with pytest.raises(CheckpointError, match=r"no checkpoint 'org/digits-s4dd'.*has no such repo") as err:
        from_pretrained("org/digits-s4dd")
    assert "did you mean" not in str(err.value)


# -- errors raised deep inside train / from_pretrained name the flags typed -------------------------
# Python names those messages use outside the command line.
PYTHON_NAMES = re.compile(r"\b(init_from|resume=|out_dir|checkpoint_every|local_files_only|cache_dir|token=|revision=)")


def train_error(argv, capsys) -> str:
    err = one_error_line(["train", "digits-tiny", "--no-progress", *argv], capsys)
    assert err.startswith("lrnnx-zoo train: ") and not PYTHON_NAMES.search(err), err
    return err


@pytest.fixture(scope="module")
def snapshotted(tmp_path_factory) -> Path:
    """A finished 2-step digits-tiny run that kept a training snapshot after each step."""
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["train", "digits-tiny", "--out", str(out), "--max-steps", "2", "--checkpoint-every", "1",
                 "--no-progress"]) == 0
    return out


def test_train_errors_about_init_from_and_resume_name_the_flags(snapshotted, tmp_path, capsys, monkeypatch):
    # They said "init_from='digits-s4dd': ...", "(resume='/x')", "written by a run with checkpoint_every
    # (--checkpoint-every)", "out_dir X holds training snapshots ...: pass resume=True (--resume)".
    import lrnnx_zoo.training as training
    import lrnnx_zoo.training_state as TS
    capsys.readouterr()
    run = copy_run(snapshotted, tmp_path / "run")
    monkeypatch.setattr(training, "_run", lambda *a, **k: pytest.fail("training started"))
    err = train_error(["--out", str(tmp_path / "o"), "--init-from", "digits-s4dd"], capsys)
    assert "--init-from digits-s4dd: no checkpoint 'digits-s4dd'" in err and "did you mean 'digits-s4d'?" in err
    nowhere = tmp_path / "nowhere"
    err = train_error(["--out", str(tmp_path / "o"), "--resume", str(nowhere)], capsys)
    assert f"({'--resume'} {nowhere}): expected folders step-NNNNNNNN written by a run with --checkpoint-every; " \
           "start the run without --resume" in err, err
    err = train_error(["--out", str(run)], capsys)
    assert f"--out {run} holds training snapshots of an earlier run" in err and "pass --resume to continue" in err
    err = train_error(["--out", str(run), "--max-steps", "2", "--resume", "--init-from", str(snapshotted)], capsys)
    assert f"started from random weights, but --init-from {snapshotted} was given: drop --init-from" in err, err
    root = TS.snapshot_root(run)
    newest, older = TS.snapshot_folder(root, 2), TS.snapshot_folder(root, 1)
    (newest / TS.TENSORS_NAME).write_bytes(b"damaged")
    err = train_error(["--out", str(run), "--max-steps", "2", "--resume"], capsys)
    assert err.endswith(f"resume from it with --resume {older}\n"), err


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def test_hub_errors_in_the_cli_name_flags_and_environment_variables(local_hub, tmp_path, capsys):
    # They told the CLI user to "pass cache_dir=" or "pass token=", which the CLI has no flags for.
    from test_hub import _files, tiny
    local_hub.commit("acme/tiny", _files(tiny("s4d").save_pretrained(tmp_path / "a")))
    local_hub.create_repo("acme/secret", private=True)
    def one_error_line(argv, capsys) -> str:
        err = globals()["one_error_line"](argv, capsys)
        assert not PYTHON_NAMES.search(err), err
        return err
    err = one_error_line(["info", "acme/never-downloaded", "--local-files-only"], capsys)
    assert "which --local-files-only forbids downloading; download it once online, or set HF_HUB_CACHE" in err, err
    err = one_error_line(["info", "acme/secret"], capsys)
    assert "if it is private or gated, log in with `hf auth login` (or set HF_TOKEN)" in err, err
    err = one_error_line(["evaluate", "acme/tiny", "--revision", "nope"], capsys)
    assert "has no revision 'nope'; pass a branch, tag or commit id that exists (leave --revision out " \
           "for main)" in err, err
    # from Python, the same refusals name the arguments
    with pytest.raises(CheckpointError, match=r"local_files_only=True forbids .* pass cache_dir="):
        from_pretrained("acme/never-downloaded", local_files_only=True)


# -- a field a config does not record is not printed as None -----------------------------------------
def edited_copy(src: Path, to: Path, edit) -> Path:
    """A copy of the checkpoint folder ``src`` whose config.json ``edit`` (a function of the dict) changed."""
    shutil.copytree(src, to)
    config = json.loads((to / "config.json").read_text())
    edit(config)
    (to / "config.json").write_text(json.dumps(config))
    return to


def test_missing_config_fields_are_said_to_be_missing_not_none(snapshotted, tmp_path, capsys):
    # `lrnnx-zoo push` said "is not an lrnnx-zoo config (library=None, ...)" and "needs the layer family
    # 'x' from plugin None"; `train --out` into a foreign model's folder "(library None, not ...)";
    # evaluate "360 test sequences of 64 steps (None)".
    digits = shipped_checkpoints()["digits-lru"]
    no_library = edited_copy(digits, tmp_path / "no-library", lambda c: c.pop("library"))
    err = one_error_line(["push", str(no_library), "org/x"], capsys)
    assert "is not an lrnnx-zoo config (no 'library' field, expected 'lrnnx-zoo')" in err, err
    no_plugin = edited_copy(digits, tmp_path / "no-plugin",
                            lambda c: (c.pop("plugin"), c.update(family="gone"), c["model"].update(layer="gone")))
    err = one_error_line(["push", str(no_plugin), "org/x"], capsys)
    assert "needs the layer family 'gone' from a plugin it does not record, but" in err, err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "gpt2"}')
    err = one_error_line(["train", "digits-tiny", "--out", str(foreign)], capsys)
    assert "holds another model's config.json (no 'library' field, not 'lrnnx-zoo')" in err, err
    unnamed = edited_copy(snapshotted, tmp_path / "unnamed", lambda c: c["dataset"].pop("name"))
    assert main(["evaluate", str(unnamed)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"{unnamed}: 360 test sequences of 64 steps, ") and "None" not in first, first


def test_a_subcommand_flag_map_adds_to_the_cli_one_instead_of_replacing_it():
    # export's own flags (--format, --batch) were set over the CLI's shared ones, so a message
    # raised inside it about --revision or --init-from fell back to Python keywords.
    from lrnnx_zoo.cli import FLAGS
    from lrnnx_zoo.export.folder import CLI_FLAGS
    from lrnnx_zoo.wording import command_line, given, name
    with command_line(FLAGS):
        with command_line(CLI_FLAGS):
            assert name("revision") == "--revision" and given("batch", 4) == "--batch 4"
        assert name("batch") == "batch"
    assert name("revision") == "revision"


def test_export_cli_names_its_out_flag_for_a_folder_it_would_overwrite(tmp_path, capsys):
    from lrnnx_zoo import cli
    folder = tmp_path / "ckpt"
    shutil.copytree(shipped_checkpoints()["digits-lru"], folder)
    assert cli.main(["export", "digits-lru", "--out", str(folder), "--latency-steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lrnnx-zoo export: --out {folder} holds an lrnnx-zoo checkpoint"), err
