"""Seed contracts and autograd corners an audit found broken (session 21): each test says what was
wrong. Float64 where gradients are compared, to 1e-12 relative (the same sums in another order)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import functional_call

import lrnnx_zoo
from lrnnx_zoo import LRNN, LTI_LRNN, ModelConfig, SequenceModel
from lrnnx_zoo.base import StepWeightsGradientWarning
from lrnnx_zoo.plugins.s4 import S4


@pytest.mark.parametrize("cls", [LRNN, LTI_LRNN])
def test_the_abstract_base_classes_cannot_be_instantiated(cls):
    # The seed says LRNN cannot be instantiated directly; LRNN("zoh") built and failed at its first call.
    with pytest.raises(TypeError, match=rf"{cls.__name__} is abstract: subclass it and implement forward"):
        cls("zoh")


@pytest.mark.parametrize("build", [lambda: lrnnx_zoo.create_layer("s4", 4, d_state=8, measure="legt"),
                                   lambda: S4(4, d_state=8, measure="legt", transposed=False),
                                   lambda: lrnnx_zoo.create_layer("fftconv", 4, d_state=8, kernel_type="s4",
                                                                  measure="legt")])
def test_legt_builds_with_the_default_rank(build):
    # legt needs a rank-2 correction, and the default rank=1 refused it ("needs rank >= 2").
    layer = build()
    kernel = getattr(layer, "kernel", None) or layer.conv.kernel
    assert kernel.rank == 2
    y = layer(torch.randn(2, 16, 4))
    assert torch.isfinite(y[0] if isinstance(y, tuple) else y).all()


def test_other_measures_keep_rank_one():
    assert lrnnx_zoo.create_layer("s4", 4, d_state=8).kernel.rank == 1
    assert lrnnx_zoo.create_layer("s4", 4, d_state=8, measure="legt", rank=3).kernel.rank == 3


def test_seed_s4_default_state_takes_a_device():
    # FFTConvS4.default_state took device=, S4's raised TypeError.
    state = S4(4, d_state=8).default_state(2, device="cpu")
    assert state.shape == (2, 4, 4) and state.is_complex() and not state.any()


def test_a_buffer_swapped_for_one_requiring_grad_is_differentiated():
    # A frozen S4 kernel keeps log_dt as a buffer; functional_call with a log_dt requiring grad took
    # the inference path and raised "blocked_channel_conv has no backward".
    torch.manual_seed(0)
    frozen = lrnnx_zoo.create_layer("s4", 2, d_state=4, l_max=8, trainable=False).double()
    trained = lrnnx_zoo.create_layer("s4", 2, d_state=4, l_max=8).double()
    trained.load_state_dict(frozen.state_dict())
    x = torch.randn(2, 8, 2, dtype=torch.float64)
    buffers = {n: b.clone() for n, b in frozen.named_buffers()}
    log_dt = buffers["kernel.log_dt"].requires_grad_(True)
    params = dict(frozen.named_parameters())
    (grad,) = torch.autograd.grad(functional_call(frozen, (params, buffers), (x,)).square().sum(), log_dt)
    trained(x).square().sum().backward()
    want = trained.kernel.log_dt.grad
    assert (grad - want).abs().max() <= 1e-12 * want.abs().max()


def test_a_backward_through_a_step_warns_that_the_weights_get_nothing():
    # A loss on streamed outputs trained the encoder and decoder and left every layer weight with
    # grad None, silently.
    torch.manual_seed(0)
    model = SequenceModel(ModelConfig(layer="s4d", d_input=1, d_output=1, d_model=4, n_layers=1,
                                      layer_kwargs={"d_state": 4})).eval()
    cache = model.allocate_inference_cache(2)
    y, cache = model.step(torch.randn(2, 1), cache)
    with pytest.warns(StepWeightsGradientWarning, match=r"S4D.step: a backward through a step's output gives no "
                                                        r"gradient to the layer's weights"):
        y.sum().backward()
    assert model.encoder.weight.grad is not None and model.blocks[0].layer.D.grad is None
    with warnings.catch_warnings():             # streaming itself, and under no_grad, stays silent
        warnings.simplefilter("error")
        model.step(torch.randn(2, 1), cache)
        with torch.no_grad():
            model.step(torch.randn(2, 1), cache)


def test_a_layer_norm_over_one_feature_is_refused():
    # LayerNorm(1) outputs its bias whatever its input: a d_model=1 model gave bitwise equal outputs
    # for unrelated inputs and zero gradients in its sequence layers, silently.
    with pytest.raises(ValueError, match=r"norm='layer' with d_model=1 .* use d_model >= 2, or norm='batch' or 'none'"):
        ModelConfig(layer="s4d", d_input=1, d_output=1, d_model=1, n_layers=1)
    model = SequenceModel(ModelConfig(layer="s4d", d_input=1, d_output=1, d_model=1, n_layers=1, norm="none"))
    with torch.no_grad():
        assert not torch.equal(model(torch.randn(1, 8, 1)), model(torch.randn(1, 8, 1)))


def test_an_installed_plugin_left_unloaded_is_not_called_missing(monkeypatch):
    # With LRNNX_ZOO_DISABLE_PLUGIN_AUTOLOAD=1 a checkpoint of an installed plugin's layer said
    # "which is not installed: pip install ...".
    from lrnnx_zoo import registry
    monkeypatch.setattr(registry, "_autoload", lambda: False)
    said = registry.unloaded_plugin_remedy(None, "lrnnx-zoo")      # an installed distribution
    assert said.startswith("which is installed (lrnnx-zoo) but not loaded, since LRNNX_ZOO_DISABLE_PLUGIN_AUTOLOAD")
    assert registry.unloaded_plugin_remedy(None, "no-such-dist-xyz").startswith("which is not installed: pip install")
