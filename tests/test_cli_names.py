"""Checkpoint names as users type them: shipped names, folders and Hub repo ids, mistyped; and the
command line's errors about them, in its own words."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from lrnnx_zoo import CheckpointError, from_pretrained
from lrnnx_zoo.cli import main
from lrnnx_zoo.hub import shipped_checkpoints


def one_error_line(argv, capsys) -> str:
    """What `lrnnx-zoo ARGV` prints on stderr, after checking it exits 2 with one line and no stdout."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
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
