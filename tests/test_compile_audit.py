"""torch.compile of SequenceModel and the built-in layers: graphs compiled and graph breaks, counted.

Every check compiles with a counting backend that runs dynamo's FX graph as it is (no AOT or
inductor work: seconds on a 2-core machine), so the results are the eager ops' own and are compared
with eager at 1e-6 (the same ATen ops in the same order; the margin is for nothing but safety).
"""

from __future__ import annotations

from typing import Any, Callable, List

import pytest
import torch
from torch._dynamo.utils import counters

from lrnnx_zoo import ModelConfig, SequenceModel

FAMILIES = ["fftconv", "lru", "s4", "s4d"]


class GraphCounter:
    """A torch.compile backend that counts the graphs dynamo hands it and runs them unchanged."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: List[Any]) -> Callable:
        self.graphs += 1
        return gm.forward


def model_for(layer: str, pooling: Any = "mean", n_layers: int = 2) -> SequenceModel:
    torch.manual_seed(0)
    return SequenceModel(ModelConfig(layer=layer, d_input=3, d_output=2, d_model=8, n_layers=n_layers,
                                     layer_kwargs={"d_state": 4}, pooling=pooling)).eval()


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("layer", FAMILIES)
@pytest.mark.parametrize("dynamic", [None, False])
def test_compiled_step_compiles_one_graph_for_a_whole_stream(layer, dynamic):
    # The step count was a Python int, which dynamo specialises on: with dynamic=False every step
    # retraced (8 graphs, then the recompile limit and eager for the rest of the stream), by default
    # the second step did. And each layer's stale-weights check (data pointers) broke the graph: the
    # loop over blocks ran eager around 5-6 compiled pieces. Now one graph, no break, eager's numbers.
    model, backend = model_for(layer), GraphCounter()
    step = torch.compile(model.step, backend=backend, dynamic=dynamic)
    x = torch.randn(2, 40, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        compiled, eager = model.allocate_inference_cache(2), model.allocate_inference_cache(2)
        for t in range(x.shape[1]):
            y, _ = step(x[:, t], compiled)
            torch.testing.assert_close(y, model.step(x[:, t], eager)[0], rtol=1e-6, atol=1e-6)
    assert (backend.graphs, graph_breaks()) == (1, 0)
    torch.testing.assert_close(compiled["pool_mean"], eager["pool_mean"], rtol=1e-6, atol=1e-6)
    assert torch.equal(compiled["t"], eager["t"]) and compiled["t"].flatten().tolist() == [40, 40]


def test_compiled_step_goes_on_from_prefills_and_over_a_long_stream_in_one_graph():
    # prefill left the count a Python int (x.shape[1]) without lengths and a (B, 1) tensor with them:
    # a compiled step retraced for each kind, then for each step. All three caches now hold a (B, 1)
    # long count, and 1000 steps at batch 1 (dynamic=False, where an int count hit the recompile
    # limit at step 8) stay in the first graph, the counts exact.
    model, backend = model_for("s4d"), GraphCounter()
    step = torch.compile(model.step, backend=backend, dynamic=False)
    g = torch.Generator().manual_seed(2)
    prompt, x = torch.randn(1, 6, 3, generator=g), torch.randn(1, 1000, 3, generator=g)
    with torch.no_grad():
        compiled = [model.prefill(prompt)[1], model.prefill(prompt, torch.tensor([4]))[1],
                    model.allocate_inference_cache(1)]
        eager = [model.prefill(prompt)[1], model.prefill(prompt, torch.tensor([4]))[1],
                 model.allocate_inference_cache(1)]
        for i, (cache, reference) in enumerate(zip(compiled, eager)):
            for t in range(x.shape[1] if i == 2 else 10):     # the prefills' caches: 10 steps each
                y, _ = step(x[:, t], cache)
                y_eager, _ = model.step(x[:, t], reference)
            torch.testing.assert_close(y, y_eager, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(cache["pool_mean"], reference["pool_mean"], rtol=1e-6, atol=1e-6)
    assert (backend.graphs, graph_breaks()) == (1, 0)
    assert [c["t"].item() for c in compiled] == [16, 14, 1000]


def test_s4_length_change_under_compile_does_not_break_at_the_prefill_memo():
    # A compiled S4 forward on a length its C~ does not cover yet traced the change of C~, which asked
    # for the prefill's per-thread shared work (threading.get_ident): a graph break per block and
    # length. That Python-side memo is now skipped while compiling, as the kernel cache is; the length
    # change itself still breaks (torch.equal for the weights digest), and the outputs are eager's.
    model = model_for("s4")
    compiled = torch.compile(model, backend=GraphCounter())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for L in (16, 24):
            x = torch.randn(2, L, 3, generator=g)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)
    assert not [reason for reason in counters["graph_break"] if "get_ident" in reason]
