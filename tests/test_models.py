"""SequenceModel: forward vs step over every registered layer, pooling, lengths, config checks.
Tolerance 1e-4 relative (float32, modes round differently; see test_layer_contract)."""

from __future__ import annotations

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo import ModelConfig, SequenceModel


def model_for(layer, **kw):
    torch.manual_seed(0)
    cfg = dict(layer=layer, d_input=3, d_output=5, d_model=16, n_layers=2, layer_kwargs={"d_state": 8})
    cfg.update(kw)
    return SequenceModel(ModelConfig(**cfg)).eval()


def stream(model, x):
    cache = model.allocate_inference_cache(x.shape[0])
    return torch.stack([model.step(x[:, t], cache)[0] for t in range(x.shape[1])], 1)


@pytest.mark.parametrize("layer", lrnnx_zoo.list_layers())
@pytest.mark.parametrize("norm,post", [("layer", "glu"), ("batch", "linear"), ("none", "none")])
def test_step_reproduces_forward(layer, norm, post):
    model = model_for(layer, norm=norm, post=post)
    x = torch.randn(2, 200, 3)
    with torch.no_grad():
        y, ys = model(x), stream(model, x)
    assert float((ys - y).abs().max() / y.abs().max()) < 1e-4


@pytest.mark.parametrize("layer", lrnnx_zoo.list_layers())
def test_mean_pooling_step_gives_prefix_logits(layer):
    model = model_for(layer, pooling="mean")
    x = torch.randn(2, 40, 3)
    with torch.no_grad():
        ys = stream(model, x)
        for t in (0, 17, 39):
            torch.testing.assert_close(ys[:, t], model(x[:, : t + 1]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pooling", [None, "mean", "last"])
def test_lengths_match_unpadded_runs(pooling):
    model = model_for("s4d", pooling=pooling)
    x = torch.randn(3, 30, 3)
    lengths = torch.tensor([30, 11, 1])
    with torch.no_grad():
        y = model(x, lengths=lengths)
        for b, n in enumerate(lengths.tolist()):
            alone = model(x[b:b + 1, :n])[0]
            got = y[b] if pooling else y[b, :n]
            torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


def test_config_round_trip_and_validation():
    cfg = ModelConfig(layer="lru", d_input=1, d_output=2, pooling="mean", layer_kwargs={"d_state": 4})
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="pooling must be one of"):
        ModelConfig(layer="lru", d_input=1, d_output=2, pooling="max")
    with pytest.raises(ValueError, match=r"unknown ModelConfig keys \['depth'\]"):
        ModelConfig.from_dict({**cfg.to_dict(), "depth": 3})
    with pytest.raises(ValueError, match="d_model must be a positive int"):
        ModelConfig(layer="lru", d_input=1, d_output=2, d_model=0)


def test_wrong_shapes_are_explained():
    model = model_for("lru")
    with pytest.raises(ValueError, match=r"\(batch, length, d_input=3\), got \(2, 10, 4\)"):
        model(torch.randn(2, 10, 4))
    cache = model.allocate_inference_cache(2)
    with pytest.raises(ValueError, match=r"\(batch, d_input=3\)"):
        model.step(torch.randn(2, 10, 3), cache)
    with pytest.raises(TypeError, match="floating-point input.*torch.int64"):
        model(torch.ones(2, 10, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="floating-point input.*torch.int64"):
        model.step(torch.ones(2, 3, dtype=torch.long), cache)


def test_model_trains():
    model = model_for("s4d", pooling="mean").train()
    x, y = torch.randn(32, 20, 3), torch.randint(0, 5, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
