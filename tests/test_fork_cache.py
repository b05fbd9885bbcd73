"""Forking a stream: ``fork_cache`` of the layers and of SequenceModel, ``OnnxStreamer.copy(index)``.

Before, a PyTorch stream could not be forked: ``copy.deepcopy(cache)`` of a prefilled cache raised
torch's "Only Tensors created explicitly by the user (graph leaves) support the deepcopy protocol"
(a prefill under autograd kept the state's graph), and a copy made under no_grad was refused by
the model it came from (a copy's owner mark is a copy too). Beam search, several continuations of
one prompt and returning to a saved point of a stream all need one.

Tolerances: a stream against ``forward`` over the prompt and its continuation, float32: 1e-5 of
max |y| (a recurrence against an FFT convolution rounds differently, ~4e-7 measured at 25 steps).
A fork against a stream that ran its rows alone: the same bits where the batch is the same, else
1e-6 (batched matmuls may sum in another order).
"""

import copy

import numpy as np
import pytest
import torch

from lrnnx_zoo import ModelConfig, SequenceModel, create_layer
from lrnnx_zoo.step_forms import same_form, split_poles

from plugin_fixtures import LoopRecurrence, layers_registered

FAMILIES = ["lru", "s4d", "s4", "fftconv"]
D_IN, D_OUT, H = 3, 2, 16


def model_of(layer: str, pooling=None, seed: int = 0) -> SequenceModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(layer=layer, d_model=H, d_input=D_IN, d_output=D_OUT, n_layers=2, pooling=pooling)
    return SequenceModel(cfg).eval()


def stepped(model, cache, xs):
    """The outputs of stepping ``cache`` through xs: (B, T, d_input) -> (B, T, d_output)."""
    return torch.stack([model.step(xs[:, t], cache)[0] for t in range(xs.shape[1])], 1)


@pytest.mark.parametrize("pooling", [None, "mean"])
@pytest.mark.parametrize("layer", FAMILIES)
def test_a_fork_and_its_original_continue_apart(layer, pooling):
    model = model_of(layer, pooling)
    torch.manual_seed(1)
    prompt, a, b = torch.randn(3, 20, D_IN), torch.randn(3, 6, D_IN), torch.randn(3, 6, D_IN)
    with torch.no_grad():
        _, cache = model.prefill(prompt)
        _, unforked = model.prefill(prompt)
        fork = model.fork_cache(cache)
        ya, yb = stepped(model, cache, a), stepped(model, fork, b)
        # the original went on as if there had been no fork (same batch, same ops: same bits)
        assert torch.equal(stepped(model, unforked, a), ya)
        for got, cont in ((ya, a), (yb, b)):
            full = model(torch.cat([prompt, cont], 1))
            want = full[:, 20:] if pooling is None else None
            if pooling == "mean":      # the last step's output is the pooled output over everything
                got, want = got[:, -1], full
            assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("layer", FAMILIES)
def test_a_fork_selects_repeats_and_drops_rows(layer):
    model = model_of(layer)
    torch.manual_seed(2)
    prompt, cont = torch.randn(3, 12, D_IN), torch.randn(3, 5, D_IN)
    with torch.no_grad():
        _, cache = model.prefill(prompt)
        alone = stepped(model, model.prefill(prompt)[1], cont)        # every row, no fork
        for index, rows in (([2, 0, 0, 1], [2, 0, 0, 1]), (torch.tensor([True, False, True]), [0, 2]),
                            (np.array([-1]), [2]), (torch.tensor([1, 1], dtype=torch.int32), [1, 1])):
            fork = model.fork_cache(cache, index)
            assert fork["pool_mean"].shape[0] == len(rows) and fork["t"].shape == (len(rows), 1)
            got = stepped(model, fork, cont[rows])
            assert (got - alone[rows]).abs().max() <= 1e-6 * alone.abs().max()
        assert cache["layers"][0]["lrnn_state"].shape[0] == 3          # the original keeps its rows


def test_layer_fork_cache_shares_the_step_form_and_copies_the_state():
    layer = create_layer("s4d", d_model=H, d_state=8).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        cache = layer.allocate_inference_cache(2)
        for t in range(4):
            layer.step(torch.randn(2, H), cache)
        fork = layer.fork_cache(cache, [1])
        assert fork["step_form"] is cache["step_form"]
        assert fork["lrnn_state"].data_ptr() != cache["lrnn_state"].data_ptr()
        x = torch.randn(2, H)
        want = layer.step(x, layer.fork_cache(cache))[0][1]
        before = cache["lrnn_state"].clone()
        got = layer.step(x[1:], fork)[0][0]
        assert torch.equal(cache["lrnn_state"], before)
        assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def test_a_fork_sees_weights_changed_after_it():
    model = model_of("lru")
    with torch.no_grad():
        _, cache = model.prefill(torch.randn(2, 8, D_IN))
        fork = model.fork_cache(cache)
        next(model.blocks[0].layer.parameters()).add_(0.1)        # an optimiser step, say
        for c in (cache, fork):
            with pytest.raises(RuntimeError, match="weights changed since this cache was made"):
                model.step(torch.randn(2, D_IN), c)


def test_a_prefill_under_autograd_forks():
    # (the prefill's cache held the prompt's autograd graph, and copy.deepcopy failed on it: "Only
    # Tensors created explicitly by the user (graph leaves) support the deepcopy protocol")
    model = model_of("s4d")
    y, cache = model.prefill(torch.randn(2, 8, D_IN))
    assert y.requires_grad and cache["layers"][0]["lrnn_state"].grad_fn is None
    fork = model.fork_cache(cache)
    step, _ = model.step(torch.randn(2, D_IN), fork)
    assert step.shape == (2, D_OUT)


def test_fork_cache_refuses_what_it_cannot_fork():
    model, other = model_of("s4d"), model_of("s4d")
    with torch.no_grad():
        _, cache = model.prefill(torch.randn(3, 8, D_IN))
    with pytest.raises(ValueError, match="made by another model"):
        other.fork_cache(cache)
    with pytest.raises(ValueError, match="made by another layer"):
        other.blocks[0].layer.fork_cache(cache["layers"][0])
    with pytest.raises(ValueError, match="keys 'step_form', 'lrnn_state'"):
        model.blocks[0].layer.fork_cache({"state": 1})
    for index, error, words in (([], ValueError, "selects no row"), ([[0, 1]], ValueError, "must be 1-D"),
                                ([3], IndexError, r"rows in \[-3, 3\)"), ([-4], IndexError, "rows in"),
                                ([0.5], TypeError, "integers"), ("rows", TypeError, "got str"),
                                (torch.tensor([True, False]), ValueError, "bool mask of the batch's 3 rows"),
                                (torch.zeros(3, dtype=torch.bool), ValueError, "selects no row")):
        with pytest.raises(error, match=words):
            model.fork_cache(cache, index)
    assert cache["layers"][0]["lrnn_state"].shape[0] == 3


class _OwnCache(LoopRecurrence):
    """A third-party layer with its own cache (a list holding a tensor) and no fork_cache."""

    def allocate_inference_cache(self, batch_size, max_seqlen=1, dtype=None):
        return [torch.zeros(batch_size, self.d_model)]

    def step(self, x, cache, **kw):
        cache[0] = self.a * cache[0] + x
        return cache[0], cache

    fork_cache = None       # as a layer written before fork_cache existed


def test_a_third_party_cache_is_cloned_and_an_index_names_the_layer():
    with layers_registered("own_cache_plugin", own_cache=_OwnCache):
        model = model_of("own_cache")
        with torch.no_grad():
            cache = model.allocate_inference_cache(2)
            model.step(torch.randn(2, D_IN), cache)
            fork = model.fork_cache(cache)
            assert fork["layers"][0][0] is not cache["layers"][0][0]
            assert torch.equal(fork["layers"][0][0], cache["layers"][0][0])
            x = torch.randn(2, D_IN)
            y_fork = model.step(x, fork)[0]
            assert torch.equal(model.step(x, cache)[0], y_fork)       # the same point, stepped apart
            with pytest.raises(TypeError, match="_OwnCache has no fork_cache"):
                model.fork_cache(cache, [0])


def test_onnx_streamer_copy_selects_rows(tmp_path):
    from lrnnx_zoo.export import OnnxStreamer, to_onnx
    model = model_of("s4d")
    path = tmp_path / "m.onnx"
    to_onnx(model, str(path))
    rng = np.random.default_rng(0)
    prompt, cont = rng.standard_normal((3, 10, D_IN), np.float32), rng.standard_normal((4, 5, D_IN), np.float32)
    streamer = OnnxStreamer(path)
    streamer.reset(3)
    streamer.run(prompt)
    rows = [2, 0, 0, 1]
    fork = streamer.copy(rows)
    alone = OnnxStreamer(path)
    alone.reset(4)
    alone.run(prompt[rows])
    assert fork.batch == 4 and streamer.batch == 3
    assert np.array_equal(fork.run(cont), alone.run(cont))
    assert copy.copy(streamer).batch == 3
    with pytest.raises(IndexError, match="OnnxStreamer.copy"):
        streamer.copy([3])
    to_onnx(model, str(tmp_path / "fixed.onnx"), batch=2)
    fixed = OnnxStreamer(tmp_path / "fixed.onnx")
    with pytest.raises(ValueError, match="exported for batch=2"):
        fixed.copy([0])
    assert fixed.copy([1, 0]).batch == 2


@pytest.mark.parametrize("layer", FAMILIES)
def test_streams_of_one_set_of_weights_share_their_step_forms(layer):
    # Every cache built its own step forms: 50 streams of a 4-block LRU (d_model 128) held 52 MB of forms
    # for 0.1 MB of state, S4's 76 MB (a soak audit). Caches made while the weights are unchanged share
    # them (a form is never changed in place); a change of weights makes new ones; pickles leave them out.
    import io
    model = model_of(layer)
    with torch.no_grad():
        model(torch.randn(1, 5, D_IN))        # S4's first call sets its length (its C holds C~ from then on)
        first, second = model.allocate_inference_cache(2), model.allocate_inference_cache(3)
        _, third = model.prefill(torch.randn(1, 5, D_IN))
        for a, b, c in zip(first["layers"], second["layers"], third["layers"]):
            assert a["step_form"] is b["step_form"] is c["step_form"]
        next(model.blocks[1].layer.parameters()).add_(0.01)
        fresh = model.allocate_inference_cache(2)
    assert fresh["layers"][0]["step_form"] is first["layers"][0]["step_form"]        # block 0 unchanged
    assert fresh["layers"][1]["step_form"] is not first["layers"][1]["step_form"]    # block 1 changed
    if layer == "s4d":                 # a setting no tensor version sees makes a new form too
        model.blocks[0].layer.kernel.discretization = "bilinear"
        with torch.no_grad():
            bilinear = model.allocate_inference_cache(2)
        assert bilinear["layers"][0]["step_form"] is not fresh["layers"][0]["step_form"]
    # split_poles too (a code review): a form made inside split_poles(False) was handed to the later
    # default caches, whose streams then ran with each pole rounded once (16384 S4D steps 2.9e-5 off
    # float64 instead of 2.3e-6), and inside it a default form was used, which state_from_cache refused
    with torch.no_grad(), split_poles(False):
        rounded = model.allocate_inference_cache(2)
    with torch.no_grad():
        again = model.allocate_inference_cache(2)
    for a, b, c in zip(rounded["layers"], again["layers"], fresh["layers"]):
        assert a["step_form"] is not b["step_form"] and same_form(b["step_form"], c["step_form"])
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert "_form_memo" not in loaded.blocks[0].layer.__dict__
    with torch.no_grad():
        x = torch.randn(2, D_IN)
        assert torch.equal(loaded.step(x, loaded.allocate_inference_cache(2))[0], model.step(x, fresh)[0])
