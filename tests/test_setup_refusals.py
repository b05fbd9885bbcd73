"""Refusals a coverage run of the suite found unexercised: a checkpoint whose config.json lacks its model
section (a hand-edited or truncated config), and a forecasting recipe whose model has pooling or another
output width (it trained on a broadcast MSE and failed only at evaluation, after the whole run)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

import lrnnx_zoo
from lrnnx_zoo import CheckpointError
from lrnnx_zoo.hub import shipped_checkpoints
from lrnnx_zoo.recipes import RECIPES
from lrnnx_zoo.training import TrainingSetupError, train


@pytest.mark.parametrize("model", [None, [1, 2], "lru"], ids=["absent", "list", "str"])
def test_a_config_without_its_model_section_is_refused_by_name(tmp_path, model):
    folder = tmp_path / "ckpt"
    shutil.copytree(shipped_checkpoints()["digits-lru"], folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if model is None:
        del config["model"]
    else:
        config["model"] = model
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"config\.json has no 'model' section \(the ModelConfig\); re-save"):
        lrnnx_zoo.from_pretrained(folder)


def test_a_forecaster_with_pooling_or_another_width_is_refused_before_any_step(tmp_path):
    recipe = RECIPES["forecast-sunspots-s4d"]
    bad = dataclasses.replace(recipe, model={**recipe.model, "pooling": "mean", "d_output": 2})
    with pytest.raises(TrainingSetupError) as err:
        train(bad, out_dir=tmp_path / "run")
    text = str(err.value)
    assert "time-series-forecasting data" in text
    assert "pooling='mean', but forecasting needs one output per step (pooling=None)" in text
    assert "d_output=2, but the forecast targets have 1 value(s) per step" in text
    assert not (tmp_path / "run").exists()          # nothing trained, nothing written
