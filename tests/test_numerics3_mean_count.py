"""Mean pooling's step count far into a stream: exact past 2**24 steps, in the exported state and in
the eager cache, without streaming 2**24 real steps (each test starts from a count near 2**24).

A float32 count stops growing at 2**24 (count + 1 rounds back to it: 17 minutes of 16 kHz audio),
after which the running mean became an exponential average over the last ~1.7e7 steps. The state
now carries the count's rounding carry (``pool.count_carry``), so ``pool.count + pool.count_carry``
is the exact count; the eager cache counts in integers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo.export import OnnxStreamer, state_from_cache, to_onnx
from lrnnx_zoo.export.step_graph import build_step_module

START = 2**24 - 5          # float32 holds it exactly, and steps from it cross 2**24
STEPS = 40


def small_model(layer: str = "s4d") -> lrnnx_zoo.SequenceModel:
    torch.manual_seed(0)
    cfg = lrnnx_zoo.ModelConfig(layer=layer, d_input=3, d_output=4, d_model=8, n_layers=2, pooling="mean",
                                layer_kwargs={"d_state": 4})
    return lrnnx_zoo.SequenceModel(cfg).eval()


def exact_count(state: np.ndarray, layout: dict) -> np.ndarray:
    """The step count a packed state holds, summed in float64 (exact for integers below 2**53)."""
    high, low = state[:, layout["pool.count"][0]], state[:, layout["pool.count_carry"][0]]
    return high.astype(np.float64) + low.astype(np.float64)


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    model = small_model()
    res = to_onnx(model, tmp_path_factory.mktemp("count") / "m.onnx")
    return model, res, {name: (off, size) for name, off, size in res.state_layout}


def test_the_step_graphs_count_grows_past_2_to_the_24(graph):
    model, res, layout = graph
    assert layout["pool.count_carry"][1] == 1 and res.state_size == max(o + s for o, s in layout.values())
    x = torch.randn(2, STEPS, 3, generator=torch.Generator().manual_seed(0))
    state = np.zeros((2, res.state_size), np.float32)
    state[:, layout["pool.count"][0]] = START
    streamer = OnnxStreamer(res.path)
    streamer.reset(2)
    streamer.state = state
    streamer.run(x)
    # float32 alone: stuck at 2**24 = START + 5
    assert (exact_count(streamer.state, layout) == START + STEPS).all()
    step = build_step_module(model)                   # the module the graph is traced from, in torch
    s = torch.from_numpy(state)
    with torch.no_grad():
        for t in range(STEPS):
            _, s = step(x[:, t], s)
    assert (exact_count(s.numpy(), layout) == START + STEPS).all()


def test_the_count_stays_exact_where_float32_spacing_is_large(graph):
    # at 2**30 float32 numbers are 128 apart: the carry absorbs every step until they add up to one
    _, res, layout = graph
    state = np.zeros((1, res.state_size), np.float32)
    state[:, layout["pool.count"][0]] = 2.0**30
    streamer = OnnxStreamer(res.path)
    streamer.state = state
    streamer.run(torch.randn(1, 300, 3, generator=torch.Generator().manual_seed(1)))
    assert exact_count(streamer.state, layout)[0] == 2**30 + 300
    assert streamer.state[0, layout["pool.count"][0]] in (2.0**30 + 256, 2.0**30 + 384)   # rounded, near


def test_the_count_carry_stays_zero_below_2_to_the_24(graph):
    # below 2**24 the state is what it was before the carry: the count itself, carry 0
    _, res, layout = graph
    streamer = OnnxStreamer(res.path)
    streamer.reset(2)
    streamer.run(torch.randn(2, 30, 3, generator=torch.Generator().manual_seed(2)))
    assert (streamer.state[:, layout["pool.count"][0]] == 30).all()
    assert (streamer.state[:, layout["pool.count_carry"][0]] == 0).all()



def test_eager_count_of_a_prefill_with_lengths_grows_past_2_to_the_24():
    # prefill(x, lengths) kept each sequence's count as a float32 tensor, which stopped at 2**24; the
    # packed state (state_from_cache) then said 2**24 for a stream of 2**24 + 3 steps.
    model = small_model()
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, cache = model.prefill(x, lengths=torch.tensor([4, 3]))
        cache["t"] = cache["t"] + (START - 4)       # as after START - 4 more steps: exact in float32 too
        for t in range(STEPS):
            model.step(x[:, t % 4], cache)
        state = state_from_cache(model, cache)
    step = build_step_module(model)
    layout = {name: (off, size) for name, off, size in step.state_layout}
    assert exact_count(state.numpy(), layout).tolist() == [START + STEPS, START - 1 + STEPS]


def test_prefill_and_steps_leave_the_callers_lengths_alone():
    # an integer count kept as a view of the lengths given to prefill was incremented in place by
    # every step (the caller's lengths grew with the stream)
    model = small_model()
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(5))
    lengths = torch.tensor([4, 3])
    with torch.no_grad():
        _, cache = model.prefill(x, lengths=lengths)
        model.step(x[:, 0], cache)
    assert lengths.tolist() == [4, 3]
