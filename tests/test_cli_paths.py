"""Command-line paths a coverage run of the suite found unexercised: `recipes --json`, `models` with a
pattern nothing matches, empty --revision / --branch, and a Terminated that crosses a process boundary
(pickled, as multiprocessing and torchrun's workers hand exceptions back)."""

from __future__ import annotations

import json
import pickle
import signal

import pytest

from lrnnx_zoo.cli import main
from lrnnx_zoo.recipes import RECIPES, list_recipes
from lrnnx_zoo.training_cli import Terminated


def test_recipes_json_lists_every_recipe_with_its_settings(capsys):
    assert main(["recipes", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in listed] == list_recipes()
    for r in listed:
        recipe = RECIPES[r["name"]]
        assert r == {"name": recipe.name, "description": recipe.description, "model": recipe.model,
                     "data": recipe.data.name, "epochs": recipe.optim.epochs,
                     "batch_size": recipe.optim.batch_size, "lr": recipe.optim.lr}


def test_models_with_a_pattern_that_matches_nothing(capsys):
    assert main(["models", "no-such-model*"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and out.err == "no shipped checkpoints match 'no-such-model*'\n"
    assert main(["models", "--json", "no-such-model*"]) == 0
    assert json.loads(capsys.readouterr().out) == []


@pytest.mark.parametrize("argv, said", [
    (["info", "digits-lru", "--revision", " "], "info: --revision is empty"),
    (["push", "me/some-model", "me/x", "--revision", ""], "push: --revision is empty"),
    (["push", "digits-lru", "me/x", "--branch", " "], "push: --branch is empty; pass a branch name"),
])
def test_an_empty_revision_or_branch_is_refused_before_anything_loads(argv, said, capsys):
    assert main(argv) == 2
    assert said in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)])
def test_terminated_keeps_its_signal_and_message_through_pickle(signum):
    stop = Terminated(signum)
    stop.args = ("nothing was committed",)
    back = pickle.loads(pickle.dumps(stop))
    assert type(back) is Terminated and back.signum == int(signum) and back.name == signal.Signals(signum).name
    assert back.args == ("nothing was committed",) and str(back) == "nothing was committed"
