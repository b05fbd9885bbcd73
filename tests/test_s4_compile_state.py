"""torch.compile of S4's streaming paths: state passing (``forward(u, state=...)``), prefill and the
layer's own ``step``, for the S4 layer and FFTConvS4 with the s4 kernel; graphs and breaks counted
(as in test_compile_audit), results against eager.

The counting backend runs dynamo's graphs as they are, so the compiled results are the eager ops'
own; where the compiled graph takes other FFT sizes, blocks or powers (state passing), the stated
tolerances cover float32 rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from lrnnx_zoo import ModelConfig, SequenceModel
from lrnnx_zoo.plugins.fftconv import FFTConvS4
from lrnnx_zoo.plugins.s4 import S4
from test_compile_audit import GraphCounter, fresh_dynamo, graph_breaks  # noqa: F401 (fresh_dynamo: autouse fixture)


def streaming_block(block: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    if block == "S4":
        layer = S4(8, d_state=8, transposed=False)
    else:
        layer = FFTConvS4(8, kernel_type="s4", d_state=8, transposed=False)
    return layer.to(dtype).eval()


#: Chunk lengths of one stream: repeated, then changing within and across power-of-two ranges.
CHUNKS = (16, 16, 40, 24, 30, 20, 50)


@pytest.mark.parametrize("block, dtype, tol", [("S4", torch.float32, 1e-5), ("FFTConvS4", torch.float32, 1e-5),
                                               ("S4", torch.float64, 1e-10)])
def test_compiled_state_passing_streams_in_chunks_as_one_call(block, dtype, tol):
    # A stream in chunks through a compiled forward(u, state) against one eager call over the whole.
    # It broke the graph twice per call (ordinary_tensor's is_inference(), the state passing's
    # data-dependent skip of A^L x for a zero state: 16 breaks, 17 graphs over three chunks), and
    # once those were gone compiled a graph per chunk length (the Horner loop over L's blocks and
    # the bits of A^L pinned L), and again at the second chunk (the next state's strides).
    # Now chunks take the blocks and squares of the next power of two >= L, as the kernel does: one
    # graph per range (2^(k-1), 2^k]: 16 (static), 40 and 50 (32, 64], 24, 30, 20 (16, 32].
    # Tolerances: float32 measured 2.7e-7 of max|y| (the chunks' kernels and FFT sizes differ from
    # the whole's), 1e-5 is the margin; float64 is exact algebra, 1e-10.
    layer, backend = streaming_block(block, dtype), GraphCounter()
    compiled = torch.compile(lambda u, s: layer(u, state=s), backend=backend)
    x = torch.randn(2, sum(CHUNKS), 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
    with torch.no_grad():
        state, ys = layer.default_state(2), []
        for chunk in x.split(CHUNKS, dim=1):
            y, state = compiled(chunk, state)
            ys.append(y)
        assert (backend.graphs, graph_breaks()) == (3, 0)
        want_y, want_state = layer(x, state=layer.default_state(2))
    torch.testing.assert_close(torch.cat(ys, 1), want_y, rtol=0, atol=tol * want_y.abs().max().item())
    torch.testing.assert_close(state, want_state, rtol=0, atol=tol * want_state.abs().max().item())


def test_compiled_state_passing_takes_an_inference_mode_state_under_autograd():
    # A state that an inference-mode forward returned, passed on under autograd: eager copies it
    # (ordinary_tensor), which asked is_inference(), a graph break under dynamo; skipping the copy
    # there failed in the backward ("Inference tensors cannot be saved for backward"). Compiled (AOT
    # autograd's traced backward) it is one graph now, gradients those of eager to 1e-4 relative
    # (the same ops; float32 margin as test_compile_audit's).
    layer = streaming_block("S4").train()
    x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        _, state = layer(x, state=layer.default_state(2))
    compiled = torch.compile(lambda u, s: layer(u, state=s), backend="aot_eager")
    grads = []
    for run in (compiled, lambda u, s: layer(u, state=s)):
        layer.zero_grad()
        y, nxt = run(x, state)
        (y.square().sum() + nxt.abs().square().sum()).backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert (counters["stats"]["unique_graphs"], graph_breaks()) == (1, 0)


@pytest.mark.parametrize("block, mode", [("S4", "dense"), ("S4", "linear"), ("S4", "diagonal"), ("FFTConvS4", None)])
def test_compiled_layer_step_compiles_one_graph_for_a_stream(block, mode):
    # The linear and diagonal forms hand back their state as a transposed view (unpack_modes), and
    # dynamo, guarding on the strides of the fresh default_state, compiled a second graph at the
    # second step. One graph now, eager's numbers (the same ops: 1e-6 is a safety margin).
    layer, backend = streaming_block(block), GraphCounter()
    if mode is None:
        layer.setup_step()
    else:
        layer.setup_step(mode, tol=float("inf") if mode == "diagonal" else None)
    step = torch.compile(layer.step, backend=backend)
    x = torch.randn(2, 20, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        state, eager = layer.default_state(2), layer.default_state(2)
        for t in range(x.shape[1]):
            y, state = step(x[:, t], state)
            y_eager, eager = layer.step(x[:, t], eager)
            torch.testing.assert_close(y, y_eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state, eager, rtol=1e-6, atol=1e-6)
    assert (backend.graphs, graph_breaks()) == (1, 0)


@pytest.mark.parametrize("layer_kwargs", [{}, {"kernel_type": "s4"}], ids=["s4", "fftconv-s4"])
def test_compiled_prefill_builds_the_step_forms_eagerly_and_continues_the_stream(layer_kwargs):
    # prefill traced the step forms' construction (eigendecompositions, the diagonal form's accuracy
    # check, new modules, the dtype context): 36 breaks and 38 graphs for two blocks. That part runs
    # untraced now (lrnnx_zoo.untraced), the convolution and the state passing compile. The output
    # and cache are eager's (1e-6: the same ops), and eager steps from the compiled cache continue
    # forward over the whole sequence (float32: 2.7e-7 of max|y| measured, 1e-5 the margin).
    torch.manual_seed(0)
    layer = "fftconv" if layer_kwargs else "s4"
    model = SequenceModel(ModelConfig(layer=layer, d_input=3, d_output=2, d_model=8, n_layers=2,
                                      layer_kwargs={"d_state": 8, **layer_kwargs}, pooling="mean")).eval()
    backend = GraphCounter()
    prefill = torch.compile(model.prefill, backend=backend)
    x = torch.randn(2, 42, 3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y, cache = prefill(x[:, :32])
        y_eager, cache_eager = model.prefill(x[:, :32])
        torch.testing.assert_close(y, y_eager, rtol=1e-6, atol=1e-6)
        for got, want in zip(cache["layers"], cache_eager["layers"]):
            torch.testing.assert_close(got["lrnn_state"], want["lrnn_state"], rtol=1e-6, atol=1e-6)
        for t in range(32, x.shape[1]):
            y, _ = model.step(x[:, t], cache)
        want = model(x)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-5 * want.abs().max().item())
    # Every break is at the untraced cache: 3 counted for the 2 blocks (dynamo meets the first in the
    # model's frame, then cannot resume within the layer's prefill scope, a generator's `with`, and
    # runs the layer's prefill frame itself eagerly, compiling the forward and state passing it
    # calls as frames of their own): 7 graphs.
    assert all("allocate_inference_cache" in reason for reason in counters["graph_break"])
    assert (backend.graphs, graph_breaks()) == (7, 3)
