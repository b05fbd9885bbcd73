"""Training a plugin's layer on a shipped task: ``override(recipe, layer=..., layer_kwargs=...)`` and
``lrnnx-zoo train RECIPE --layer NAME --layer-kwargs JSON``.

Before, the plugin guide's recipe swap (``dataclasses.replace(recipe, model={**recipe.model, "layer":
"ema"})``) handed the recipe's family keywords to the new layer (digits-s4d's ``init="legs"``,
digits-lru's ``r_min``: a RegistryError or TypeError after the data had loaded; only digits-tiny
worked), its card still called the model "a one-block S4D", and the CLI could not train a plugin's
layer at all. The layer here is the guide's own example plugin (examples/ema_plugin), registered in
code with third-party autoloading off, as in test_example_plugin.
"""

from __future__ import annotations

import json
import shlex

import pytest

import lrnnx_zoo
from lrnnx_zoo.recipes import get_recipe, override
from plugin_fixtures import example_ema_plugin


@pytest.fixture(scope="module")
def ema():
    with example_ema_plugin("lrnnx_ema_swap_test") as module:
        yield module


def test_override_swaps_the_layer_keeping_only_the_shared_keywords():
    base = get_recipe("digits-s4d")
    assert base.model["layer_kwargs"] == {"d_state": 64, "init": "legs"}
    swapped = override(base, layer="ema")
    assert swapped.model["layer"] == "ema"
    assert swapped.model["layer_kwargs"] == {"d_state": 64}            # init="legs" is S4D's
    assert "'ema' in place of 's4d'" in swapped.description
    assert {k: v for k, v in swapped.model.items() if k not in ("layer", "layer_kwargs")} == \
        {k: v for k, v in base.model.items() if k not in ("layer", "layer_kwargs")}
    assert base.model["layer"] == "s4d" and base.model["layer_kwargs"]["init"] == "legs"   # a copy

    given = override(base, layer="ema", layer_kwargs={"d_state": 2, "init": "flat"})
    assert given.model["layer_kwargs"] == {"d_state": 2, "init": "flat"}
    # the recipe's own layer: keywords are added to its own
    own = override(base, layer="s4d", layer_kwargs={"dt_max": 0.2})
    assert own.model["layer_kwargs"] == {"d_state": 64, "init": "legs", "dt_max": 0.2}
    assert own.description == base.description
    assert override(base) == base


@pytest.mark.parametrize("kw, match", [({"layer": 3}, "layer's name"), ({"layer_kwargs": [1]}, "dict")])
def test_override_refuses_wrong_types(kw, match):
    with pytest.raises(TypeError, match=match):
        override(get_recipe("digits-tiny"), **kw)


@pytest.mark.parametrize("kw", [{"layer": "ema"}, {"layer": "ema", "layer_kwargs": {"init": "flat"}},
                                {"layer_kwargs": {"d_state": 4}}])
def test_reproduce_command_is_a_cli_line_that_rebuilds_the_swapped_recipe(kw):
    from lrnnx_zoo.cli import build_parser
    from lrnnx_zoo.training import reproduce_command
    recipe = override(get_recipe("digits-tiny"), seed=5, **kw)
    command = reproduce_command(recipe, "out dir")
    assert command.startswith("lrnnx-zoo train digits-tiny ")
    args = build_parser().parse_args(shlex.split(command)[1:])
    rebuilt = override(get_recipe(args.recipe), seed=args.seed, epochs=args.epochs, batch_size=args.batch_size,
                       max_steps=args.max_steps, layer=args.layer, layer_kwargs=args.layer_kwargs)
    assert rebuilt == recipe and args.out == "out dir"


def test_reproduce_command_falls_back_to_python_for_kwargs_json_cannot_carry():
    from lrnnx_zoo.training import reproduce_command
    recipe = override(get_recipe("digits-tiny"), layer_kwargs={"d_state": 4, "sizes": (1, 2)})  # a tuple
    assert reproduce_command(recipe, "out").startswith("python - <<'EOF'")


def test_cli_trains_a_plugin_layer_on_a_shipped_recipe(ema, tmp_path, capsys):
    pytest.importorskip("sklearn")                     # the digits data
    from lrnnx_zoo.cli import main
    out = tmp_path / "run"
    rc = main(["train", "digits-tiny", "--out", str(out), "--layer", "ema", "--layer-kwargs", '{"init": "flat"}',
               "--max-steps", "2", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["layer"] == "ema" and config["model"]["layer_kwargs"] == {"d_state": 8, "init": "flat"}
    assert config["plugin"]["name"] == "ema"
    assert "--layer ema" in config["command"] and "in place of 's4d'" in config["notes"]
    model = lrnnx_zoo.from_pretrained(out)
    assert isinstance(model.blocks[0].layer, ema.EMA)


def test_cli_refuses_keywords_the_layer_does_not_take_before_loading_data(ema, tmp_path, capsys, monkeypatch):
    from lrnnx_zoo import training
    from lrnnx_zoo.cli import main

    def no_data(recipe):
        raise AssertionError("the data loaded before the layer's keywords were checked")
    monkeypatch.setattr(training, "_load_training_data", no_data)
    rc = main(["train", "digits-tiny", "--out", str(tmp_path / "run"), "--layer", "ema",
               "--layer-kwargs", '{"r_min": 0.5}', "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "unexpected keyword argument 'r_min'" in err and "EMA takes" in err, err


@pytest.mark.parametrize("text", ["[1]", "{d_state: 3}"])
def test_cli_layer_kwargs_must_be_a_json_object(text, capsys):
    from lrnnx_zoo.cli import main
    with pytest.raises(SystemExit) as stop:
        main(["train", "digits-tiny", "--out", "x", "--layer-kwargs", text])
    assert stop.value.code == 2 and "JSON object" in capsys.readouterr().err
