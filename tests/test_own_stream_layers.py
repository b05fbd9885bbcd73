"""Third-party layers that stream with their own allocate_inference_cache / step / prefill, or
break SequenceModel's layer contract, found by an audit that wrote a plugin from the README.

Before: a layer whose cache is a tensor and whose step returns the next one, ``(y, cache)``, as
the README's ``y_t, cache = layer.step(x_t, cache)`` reads, streamed 0.54 off forward inside a
SequenceModel (the returned cache was dropped), silently; a forward returning ``(y, state)``
failed in the block's GELU; a layer without streaming methods raised a bare AttributeError.
Tolerance: exact, the layer's recurrence is the same float32 ops in forward and step.
"""

import pytest
import torch

from lrnnx_zoo import ModelConfig, SequenceModel

from plugin_fixtures import LoopRecurrence, layers_registered

H = 4


_Recurrence = LoopRecurrence


class _TensorCache(_Recurrence):
    """Its cache is the state tensor; step returns the next one (nothing changed in place)."""

    def allocate_inference_cache(self, batch_size, max_seqlen=1, dtype=None):
        return torch.zeros(batch_size, self.d_model)

    def step(self, x, cache, **kw):
        h = self.a * cache + x
        return h, h


class _TensorCacheWithPrefill(_TensorCache):
    def prefill(self, x, lengths=None):
        y = self.forward(x)
        return y, y[:, -1]


class _TupleOut(_Recurrence):
    def forward(self, x, integration_timesteps=None, lengths=None):
        return super().forward(x), None          # the seed S4's (y, state)


def model_of(name: str) -> SequenceModel:
    torch.manual_seed(0)
    return SequenceModel(ModelConfig(layer=name, d_input=1, d_output=1, d_model=H, n_layers=2)).eval()


@pytest.mark.parametrize("cls", [_TensorCache, _TensorCacheWithPrefill], ids=["stepped-prefill", "own-prefill"])
def test_a_layer_returning_its_next_cache_streams_like_forward(cls):
    with layers_registered("tensor_cache_plugin", tensor_cache=cls):
        model = model_of("tensor_cache")
        x = torch.randn(2, 10, 1)
        with torch.no_grad():
            want = model(x)
            cache = model.allocate_inference_cache(2)
            got = torch.stack([model.step(x[:, t], cache)[0] for t in range(10)], 1)
            assert torch.equal(got, want)
            _, cache = model.prefill(x[:, :6])
            fork = model.fork_cache(cache)
            tail = torch.stack([model.step(x[:, t], cache)[0] for t in range(6, 10)], 1)
            assert torch.equal(tail, want[:, 6:])
            assert torch.equal(model.step(x[:, 6], fork)[0], want[:, 6])       # the fork was not advanced


def test_a_layer_breaking_the_output_contract_is_named():
    with layers_registered("tuple_plugin", tuple_out=_TupleOut):
        model = model_of("tuple_out")
        with pytest.raises(TypeError, match=r"_TupleOut.forward must give a tensor of its input's shape "
                                            r"\(batch, length, d_model\) = \(2, 5, 4\) to SequenceModel, got a tuple"):
            model(torch.randn(2, 5, 1))


def test_a_layer_without_streaming_methods_is_named():
    with layers_registered("plain_plugin", plain=_Recurrence):
        model = model_of("plain")
        assert model(torch.randn(2, 5, 1)).shape == (2, 5, 1)          # forward needs none of them
        for call in (lambda: model.allocate_inference_cache(2), lambda: model.prefill(torch.randn(2, 5, 1))):
            with pytest.raises(TypeError, match=r"LoopRecurrence\) has no allocate_inference_cache\(\), so the model "
                                                r"cannot stream"):
                call()
