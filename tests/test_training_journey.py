"""Training one's own model: optimiser groups, float64, evaluation and resuming as a user meets them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo import ModelConfig, SequenceModel, cli
from lrnnx_zoo.training import TaskData, evaluate, score, train

TINY = "digits-tiny"  # one S4D block of width 8, 8 optimiser steps: about a second


def _classifier(**kw) -> SequenceModel:
    torch.manual_seed(0)
    return SequenceModel(ModelConfig(layer="s4d", d_input=1, d_output=3, d_model=8, n_layers=1,
                                     layer_kwargs={"d_state": 8}, pooling="mean", **kw))


# -- float64 ---------------------------------------------------------------------------------------
def test_a_float64_model_is_evaluated_in_float64(tmp_path, capsys):
    # evaluate() fed the float32 test inputs to a float64 model: "SequenceModel: the model holds
    # torch.float64 parameters, got a torch.float32 input", also as a traceback from `lrnnx-zoo evaluate`.
    model = _classifier().double()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 16, 1, generator=gen), torch.randint(0, 3, (10,), generator=gen)
    data = TaskData("sequence-classification", x, y, x, y, None, card={})
    with torch.no_grad():
        want = score(model.eval()(x.double()), data)
    # float64 both ways, in batches of 4 against one of 10: equal to float64 rounding
    assert evaluate(model, data, batch_size=4) == pytest.approx(want, rel=1e-12, abs=0)

    trained, metrics = train(TINY, progress=False)
    trained.double().save_pretrained(tmp_path / "f64")      # a lossless cast keeps the recorded metrics
    loaded = lrnnx_zoo.from_pretrained(tmp_path / "f64")
    assert loaded.encoder.weight.dtype == torch.float64
    with torch.no_grad():
        assert torch.equal(loaded(x.double()), trained(x.double()))
    assert cli.main(["evaluate", str(tmp_path / "f64"), "--check"]) == 0
    assert "MISMATCH" not in capsys.readouterr().out


# -- optimiser groups ------------------------------------------------------------------------------
def _by_name(model: torch.nn.Module, groups: list) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


@pytest.mark.parametrize("family,kwargs", [("lru", {"d_state": 8}), ("s4", {"d_state": 8, "lr": 5e-4})])
def test_param_groups_of_a_network_around_a_sequence_model_or_of_a_bare_layer(family, kwargs):
    # A token model wraps a SequenceModel behind an embedding; param_groups raised
    # "AttributeError: 'Module' object has no attribute 'blocks'", and for a bare layer too.
    from lrnnx_zoo import create_layer
    from lrnnx_zoo.training import param_groups
    torch.manual_seed(0)
    body = SequenceModel(ModelConfig(layer=family, d_input=4, d_output=3, d_model=8, n_layers=2,
                                     layer_kwargs=kwargs, pooling="mean"))
    net = torch.nn.Module()
    net.embed, net.body = torch.nn.Embedding(10, 4), body
    alone = _by_name(body, param_groups(body, 3e-3, 0.05, 1e-3))
    wrapped = _by_name(net, param_groups(net, 3e-3, 0.05, 1e-3))
    assert wrapped == {"embed.weight": (3e-3, 0.05), **{f"body.{n}": v for n, v in alone.items()}}
    layer = create_layer(family, 8, **kwargs)
    assert _by_name(layer, param_groups(layer, 3e-3, 0.05, 1e-3)) == {
        n[len("blocks.0.layer."):]: v for n, v in alone.items() if n.startswith("blocks.0.layer.")}
    assert all(wd == 0.0 for _, wd in _by_name(layer, param_groups(layer, 3e-3, 0.05, 1e-3)).values())


def test_the_readmes_training_snippet_runs_with_the_groups_it_describes(tmp_path, monkeypatch):
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Training your own model", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(compile(code, "README.md", "exec"), names)
    model, optimizer = names["model"], names["optimizer"]
    by_name = _by_name(model, optimizer.param_groups)
    kernel = "blocks.0.layer.kernel."
    assert all(by_name[kernel + k] == (5e-4, 0.0) for k in ("w", "P", "B", "log_dt"))
    assert by_name[kernel + "C"] == (1e-3, 0.0) and by_name["blocks.0.layer.D"] == (1e-3, 0.0)
    assert by_name["encoder.weight"] == (3e-3, 0.05) and by_name["encoder.bias"] == (3e-3, 0.0)
    loaded = lrnnx_zoo.from_pretrained(tmp_path / "my-model")
    x, lengths = names["x"], names["lengths"]
    with torch.no_grad():
        assert torch.equal(loaded(x, lengths), model.eval()(x, lengths))


# -- saving ----------------------------------------------------------------------------------------
def test_numpy_and_tensor_scalars_in_layer_kwargs_save_and_a_value_json_cannot_hold_is_refused_before_training(
        tmp_path, monkeypatch):
    # A sweep's np.float32(0.99) in layer_kwargs built and trained, then save_pretrained (and
    # train(out_dir=...) after its training) failed: "Object of type float32 is not JSON serializable".
    import numpy as np
    from lrnnx_zoo import training
    from lrnnx_zoo.recipes import get_recipe
    from lrnnx_zoo.training import TrainingSetupError
    config = ModelConfig(layer="lru", d_input=1, d_output=3, d_model=8, n_layers=1, pooling="mean",
                         layer_kwargs={"d_state": 8, "r_max": np.float32(0.99), "r_min": torch.tensor(0.5)})
    assert config.layer_kwargs == {"d_state": 8, "r_max": float(np.float32(0.99)), "r_min": 0.5}
    assert all(type(v) in (int, float) for v in config.layer_kwargs.values())
    torch.manual_seed(0)
    model = SequenceModel(config).eval()
    x = torch.randn(2, 12, 1)
    with torch.no_grad():
        assert torch.equal(lrnnx_zoo.from_pretrained(model.save_pretrained(tmp_path / "np"))(x), model(x))

    model.config.layer_kwargs["r_max"] = float("nan")      # json.dumps: "Out of range float values ..."
    with pytest.raises(ValueError, match=r"ModelConfig\['layer_kwargs'\]\['r_max'\] must be a finite number"):
        model.save_pretrained(tmp_path / "nan")
    assert not (tmp_path / "nan").exists()

    monkeypatch.setattr(training, "_run", lambda *a, **k: pytest.fail("training started"))
    tiny = get_recipe(TINY)
    recipe = dataclasses.replace(tiny, model={**tiny.model, "layer_kwargs": {"d_state": 8, "mode": object()}})
    with pytest.raises(TrainingSetupError, match=r"config\.json could not be written into out_dir after training: "
                                                 r"ModelConfig\['layer_kwargs'\]\['mode'\] must be JSON data"):
        train(recipe, out_dir=tmp_path / "run", progress=False)
