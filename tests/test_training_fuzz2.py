"""Second training fuzzing round: what a researcher combines while training the layers (mixed
precision, checkpointing, accumulation, frozen parameters, optimiser resumes, determinism, copies,
changing lengths, gradient penalties, custom recipes). Only findings that failed before their fix
live here; the paths that were clean are listed in the round's report. Tiny sizes throughout."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lrnnx_zoo import ModelConfig, SequenceModel
from lrnnx_zoo.recipes import get_recipe
from lrnnx_zoo.training import TrainingSetupError, evaluate, load_data, train

FORECAST = get_recipe("forecast-sunspots-s4d")


def _forecaster(layer_kwargs: dict) -> dict:
    return dict(FORECAST.model, layer="s4", d_model=4, n_layers=1, layer_kwargs=layer_kwargs)


@pytest.mark.parametrize("flag", [True, np.True_], ids=["bool", "numpy"])
def test_a_bidirectional_forecaster_is_refused_before_training(flag, tmp_path):
    # The target of step t is z_{t+1}, the input of step t + 1: a bidirectional layer reads it. A custom
    # forecast recipe with layer_kwargs bidirectional=True trained and saved a card whose test MSE was
    # read, not forecast: s4, d_model 16, 2 blocks, 15 epochs, test MSE 0.012 against the causal
    # model's 0.205 and the last-value forecast's 0.256.
    recipe = dataclasses.replace(FORECAST, name="custom", model=_forecaster({"d_state": 4, "bidirectional": flag}))
    with pytest.raises(TrainingSetupError, match=r"bidirectional=True, but a next-step forecaster may not read "
                                                 r"future inputs"):
        train(recipe, out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


class _ReadsAhead(torch.nn.Module):
    """A plugin layer bidirectional unless told otherwise: y_t = x_t + x_{t+1}."""

    def __init__(self, d_model: int, bidirectional: bool = True) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.scale = torch.nn.Parameter(torch.ones(d_model))

    def forward(self, x, lengths=None):
        ahead = torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], 1) if self.bidirectional else 0
        return self.scale * (x + ahead)


class _AlwaysAhead(_ReadsAhead):
    """Bidirectional with no keyword for it: a class attribute."""

    bidirectional = True

    def __init__(self, d_model: int) -> None:
        super().__init__(d_model, True)


@pytest.mark.parametrize("layer, kwargs, refused", [("ahead", {}, True), ("ahead", {"bidirectional": False}, False),
                                                    ("always_ahead", {}, True)])
def test_a_plugin_layer_bidirectional_by_default_is_refused_as_a_forecaster(layer, kwargs, refused, tmp_path,
                                                                           monkeypatch):
    # the check read only layer_kwargs: a layer whose default is bidirectional trained the whole run, and
    # only evaluate refused it, after training
    import lrnnx_zoo.training as T
    from plugin_fixtures import layers_registered
    class Started(Exception):
        pass

    def run(*args, **kwargs):
        raise Started
    monkeypatch.setattr(T, "_run", run)
    recipe = dataclasses.replace(FORECAST, name="custom", model=dict(_forecaster(kwargs), layer=layer))
    with layers_registered("fuzz_ahead", ahead=_ReadsAhead, always_ahead=_AlwaysAhead):
        expected = (pytest.raises(TrainingSetupError, match=r"bidirectional=True, but a next-step forecaster may not")
                    if refused else pytest.raises(Started))
        with expected:
            train(recipe, progress=False)


def test_evaluate_refuses_a_bidirectional_model_on_forecast_data_and_scores_a_causal_one():
    data = load_data(FORECAST.data)
    torch.manual_seed(0)
    causal = SequenceModel(ModelConfig(**_forecaster({"d_state": 4})))
    assert set(evaluate(causal, data)) >= {"test_mse", "naive_test_mse"}
    torch.manual_seed(0)
    reads_ahead = SequenceModel(ModelConfig(**_forecaster({"d_state": 4, "bidirectional": True})))
    # what it would have scored as a forecast: its output at t moves with the input at t + 1
    x = data.x_test[:1].clone().requires_grad_()
    reads_ahead.eval()
    reads_ahead(x)[0, 10].sum().backward()
    assert x.grad[0, 11].abs().item() > 0
    with pytest.raises(ValueError, match=r"SequenceModel has a layer with bidirectional=True, but a next-step "
                                         r"forecaster may not read future inputs"):
        evaluate(reads_ahead, data)


@pytest.mark.parametrize("batch_size, error", [(-5, ValueError), (0, ValueError), (2.5, TypeError), (True, TypeError)])
def test_evaluate_refuses_a_batch_size_that_is_not_a_positive_int(batch_size, error):
    # -5 returned {'test_accuracy': nan, 'test_loss': nan} (range(0, n, -5) is empty: 0 / 0); 0 failed as
    # "range() arg 3 must not be zero"; True ran as a batch of 1
    data = load_data(get_recipe("digits-tiny").data)
    torch.manual_seed(0)
    model = SequenceModel(ModelConfig(**get_recipe("digits-tiny").model))
    with pytest.raises(error, match=r"evaluate's batch_size must be an int >= 1, got"):
        evaluate(model, data, batch_size=batch_size)


def test_a_command_that_is_not_a_str_is_refused_before_training(tmp_path, monkeypatch):
    # train(..., command=123) trained the whole run, then failed in save_pretrained ("command must be a
    # str"), the weights lost; without out_dir the int went into checkpoint_info unchecked
    import lrnnx_zoo.training as T

    def no_run(*args, **kwargs):
        raise AssertionError("training started")
    monkeypatch.setattr(T, "_run", no_run)
    for out_dir in (tmp_path / "out", None):
        with pytest.raises(TypeError, match=r"command must be a str \(the shell command that made the model\), "
                                            r"got 123 \(int\)"):
            train("digits-tiny", out_dir=out_dir, command=123, progress=False)
    assert not (tmp_path / "out").exists()


def test_loading_s4s_C_without_its_length_warns():
    # C holds C~ for the stored length L. A parameters-only state dict (named_parameters(), as some
    # checkpoint formats keep) of a model that had run at L=40, loaded with strict=False into a fresh
    # one, silently paired that C~ with the receiver's length: outputs 0.066 off (0.18 when the
    # receiver had run at L=17); torch only listed kernel.L among the missing keys.
    from lrnnx_zoo.plugins.s4.kernel import UnpairedLengthWarning

    def s4_model(seed: int) -> SequenceModel:
        torch.manual_seed(seed)
        return SequenceModel(ModelConfig(layer="s4", d_input=3, d_output=2, d_model=4, n_layers=1,
                                         layer_kwargs={"d_state": 4}))
    trained, fresh = s4_model(0), s4_model(1)
    x = torch.randn(2, 40, 3)
    trained(x)                                    # its length: 40
    params_only = {k: v for k, v in trained.state_dict().items() if k in dict(trained.named_parameters())}
    with pytest.warns(UnpairedLengthWarning, match=r"blocks\.0\.layer\.kernel\.C is loaded without "
                                                   r"blocks\.0\.layer\.kernel\.L, but C holds C~ for the stored "
                                                   r"length L \(now 0\)"):
        missing = fresh.load_state_dict(params_only, strict=False).missing_keys
    assert missing == ["blocks.0.layer.kernel.L"]
    with torch.no_grad():     # what it warns of: a function other than the source's (tolerance: 1e-3, far below)
        assert (fresh(x) - trained(x)).norm() > 1e-3 * trained(x).norm()
    import warnings
    with warnings.catch_warnings():            # C and L together: no warning, the source's function
        warnings.simplefilter("error", UnpairedLengthWarning)
        fresh.load_state_dict(trained.state_dict())
        torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)


def test_a_progress_flag_that_is_not_a_bool_is_refused_before_training(monkeypatch):
    # progress="no" was read for its truth and showed the bar; the docstring promises a TypeError
    import lrnnx_zoo.training as T
    monkeypatch.setattr(T, "_run", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(TypeError, match=r"train needs progress to be a bool \(True or False\), got 'no'"):
        train("digits-tiny", progress="no")


def _weights(model) -> list:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_train_called_without_autograd_trains_as_it_does_with_it(mode):
    # an evaluation harness's torch.no_grad() / inference_mode() around train(): the first step failed
    # with "element 0 of tensors does not require grad and does not have a grad_fn"
    expected, metrics = train("digits-tiny", progress=False)
    with getattr(torch, mode)():
        model, got = train("digits-tiny", progress=False)
    assert got == metrics
    for a, b in zip(_weights(model), _weights(expected)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)      # the same run, bit for bit
    assert not model.encoder.weight.is_inference()
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_train_inside_autocast_is_refused_before_training(monkeypatch):
    # under the caller's torch.autocast the recipe trained in bfloat16, silently: digits-tiny's test loss
    # 2.412 against 2.394, weights its card's command does not give
    import lrnnx_zoo.training as T
    monkeypatch.setattr(T, "_run", lambda *a, **k: pytest.fail("training started"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TrainingSetupError, match=r"called inside torch\.autocast \(enabled for cpu\).*call "
                                                     r"train outside the autocast region"):
            train("digits-tiny", progress=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_train_under_a_half_precision_default_dtype_is_refused_before_training(dtype, monkeypatch):
    # the model was built in bfloat16 and the first step failed advising model.float() (a model train
    # builds itself) and torch.autocast (which train refuses)
    import lrnnx_zoo.training as T
    monkeypatch.setattr(T, "_run", lambda *a, **k: pytest.fail("training started"))
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with pytest.raises(TrainingSetupError, match=r"train builds the model in torch's default dtype, "
                                                     r"torch\.(bfloat16|float16), but the layers compute in "
                                                     r"float32 or float64"):
            train("digits-tiny", progress=False)
    finally:
        torch.set_default_dtype(before)
