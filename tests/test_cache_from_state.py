"""lrnnx_zoo.export.cache_from_state: a step graph's packed state back into a PyTorch stream cache.

A stream could go from PyTorch to ONNX Runtime (state_from_cache) but not back, nor be restored
from a saved state after a restart (a cache is tied to the model object that made it).

Tolerances: a round trip through the packed state gives the same bits (float32 state, float32
model); a stream moved from ONNX Runtime goes on within 1e-5 of max |y| of the PyTorch stream
(two runtimes' float32 rounding over 20 + 5 steps, ~3e-7 measured).
"""

import pytest
import torch

from lrnnx_zoo import ModelConfig, SequenceModel
from lrnnx_zoo.export import OnnxStreamer, cache_from_state, state_from_cache, to_onnx

D_IN, D_OUT, H = 3, 2, 16


def model_of(layer: str, pooling=None) -> SequenceModel:
    torch.manual_seed(0)
    cfg = ModelConfig(layer=layer, d_model=H, d_input=D_IN, d_output=D_OUT, n_layers=2, pooling=pooling)
    return SequenceModel(cfg).eval()


def stepped(model, cache, xs):
    return torch.stack([model.step(xs[:, t], cache)[0] for t in range(xs.shape[1])], 1)


@pytest.mark.parametrize("pooling", [None, "mean"])
@pytest.mark.parametrize("layer", ["lru", "s4d", "s4", "fftconv"])
def test_a_saved_state_resumes_the_stream(layer, pooling, tmp_path):
    model = model_of(layer, pooling)
    torch.manual_seed(1)
    prompt, cont = torch.randn(3, 20, D_IN), torch.randn(3, 5, D_IN)
    with torch.no_grad():
        _, cache = model.prefill(prompt)
        saved = state_from_cache(model, cache)
        restored = cache_from_state(model, saved.numpy())
        assert torch.equal(state_from_cache(model, restored), saved)
        want = stepped(model, cache, cont)
        assert torch.equal(stepped(model, restored, cont), want)
    path = tmp_path / "m.onnx"
    to_onnx(model, str(path))
    streamer = OnnxStreamer(path)
    streamer.reset(3)
    streamer.run(prompt.numpy())
    with torch.no_grad():
        moved = stepped(model, cache_from_state(model, streamer.state), cont)
    assert (moved - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_large_step_count_comes_back_exactly():
    model = model_of("s4d", "mean")
    with torch.no_grad():
        _, cache = model.prefill(torch.randn(2, 4, D_IN))
    cache["t"] = torch.tensor([[2 ** 24 + 3], [7]])     # past float32's integers: kept as count + carry
    restored = cache_from_state(model, state_from_cache(model, cache))
    assert restored["t"].tolist() == [[2 ** 24 + 3], [7]] and restored["t"].dtype == torch.long


def test_a_float64_model_gets_a_float64_cache():
    model = model_of("lru").double()
    with torch.no_grad():
        _, cache = model.prefill(torch.randn(2, 6, D_IN, dtype=torch.float64))
        restored = cache_from_state(model, state_from_cache(model, cache))
    state = restored["layers"][0]["lrnn_state"]
    assert state.dtype == torch.float64
    assert (state - cache["layers"][0]["lrnn_state"]).abs().max() <= 1e-6 * state.abs().max()   # float32 rounding


def test_bad_states_are_refused():
    model = model_of("s4d", "mean")
    size = state_from_cache(model, model.allocate_inference_cache(1)).shape[1]
    for state, error, words in ((torch.zeros(2, size + 1), ValueError, f"state_size={size}"),
                                (torch.zeros(size), ValueError, "shape"),
                                (torch.zeros(0, size), ValueError, "batch >= 1"),
                                (torch.zeros(2, size, dtype=torch.long), ValueError, "real packed state"),
                                (torch.full((1, size), float("nan")), ValueError, "NaN"),
                                ("state", TypeError, "got str")):
        with pytest.raises(error, match=words):
            cache_from_state(model, state)
    bad_count = state_from_cache(model, model.allocate_inference_cache(1))
    bad_count[0, -1] = -5
    with pytest.raises(ValueError, match="negative"):
        cache_from_state(model, bad_count)
    bidirectional = SequenceModel(ModelConfig(layer="fftconv", d_model=H, d_input=D_IN, d_output=D_OUT, n_layers=1,
                                              layer_kwargs={"bidirectional": True}))
    with pytest.raises(ValueError, match="bidirectional"):
        cache_from_state(bidirectional, torch.zeros(1, 1))
