"""Long streams and long-running processes: what a stream far longer than the other tests' leaves
behind (autograd history, a poisoned state) and how the ONNX streamer behaves under threads.

Small models only (d_model 8, two blocks): the whole file runs in well under a minute.
"""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo.export import OnnxStreamer, to_onnx


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_model(layer: str = "s4d", pooling=None, seed: int = 0) -> lrnnx_zoo.SequenceModel:
    torch.manual_seed(seed)
    cfg = lrnnx_zoo.ModelConfig(layer=layer, d_input=3, d_output=4, d_model=8, n_layers=2, pooling=pooling,
                                layer_kwargs={"d_state": 4})
    return lrnnx_zoo.SequenceModel(cfg).eval()


# -- eager streaming under autograd --------------------------------------------------------------
@pytest.mark.parametrize("layer", lrnnx_zoo.list_layers())
def test_eager_steps_keep_no_autograd_history(layer):
    """Stepping without torch.no_grad() (as the README's usage does) chained every step's graph
    to the next through the cached state: memory grew without bound (forecast-sunspots-s4d: 46 KB
    per step, 918 MB after 20,000 steps). The cache now carries values only."""
    model = small_model(layer, pooling="mean")
    cache = model.allocate_inference_cache(2)
    x = torch.randn(2, 3, requires_grad=True)
    for _ in range(3):
        y, cache = model.step(x, cache)
    states = [c["lrnn_state"] for c in cache["layers"]] + [cache["pool_mean"]]
    assert all(s.grad_fn is None and not s.requires_grad for s in states)
    # a step's own output still has its graph: its gradient reaches this step's input
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_eager_layer_steps_keep_no_autograd_history():
    layer = lrnnx_zoo.create_layer("lru", 8, d_state=4)
    cache = layer.allocate_inference_cache(2)
    for _ in range(3):
        y, cache = layer.step(torch.randn(2, 8, requires_grad=True), cache)
    assert y.requires_grad and cache["lrnn_state"].grad_fn is None


# -- the ONNX streamer ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """A small seq2seq S4D model and its step graph."""
    model = small_model("s4d")
    path = tmp_path_factory.mktemp("long-streams") / "m.onnx"
    to_onnx(model, path)
    return model, str(path)


def test_a_non_finite_sample_is_refused_before_it_reaches_the_state(graph):
    """One NaN sample used to turn every later output NaN, silently, until reset(): the state
    carried it on. Now the sample is refused and the state stays as it was."""
    s, clean = OnnxStreamer(graph[1]), OnnxStreamer(graph[1])
    x = np.random.default_rng(0).standard_normal((1, 30, 3)).astype(np.float32)
    s.run(x[:, :10])
    clean.run(x[:, :10])
    before = s.state
    bad = x[:, 10].copy()
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match=r"x_t holds 1 NaN or infinite value\(s\) as float32, the first at "
                                         r"index \(0, 1\); not stepped, the state is as it was"):
        s.step(bad)
    with pytest.raises(ValueError, match=r"x_t holds 3 NaN or infinite"):
        s.step(torch.full((1, 3), float("-inf")))
    with warnings.catch_warnings():     # refused with the error alone (numpy warned of its cast's overflow first)
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"x_t holds 1 NaN or infinite"):     # float64, inf as float32
            s.step(np.array([[0.0, 1e39, 0.0]]))
    chunk = x[:, 10:].copy()
    chunk[0, 5, 2] = np.inf
    with pytest.raises(ValueError, match=r"x holds 1 NaN or infinite value\(s\) as float32, the first at index "
                                         r"\(0, 5, 2\) \(sequence, step, feature\); nothing was streamed"):
        s.run(chunk)
    assert s.steps == 10 and np.array_equal(s.state, before)
    assert np.array_equal(s.run(x[:, 10:]), clean.run(x[:, 10:]))     # as if it had never seen them
    poisoned = s.state
    poisoned[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"state holds 1 NaN or infinite value\(s\) as float32.*; not set"):
        s.state = poisoned
    assert np.isfinite(s.state).all()


def test_a_step_whose_magnitudes_overflow_is_refused_by_step_and_run(graph):
    # run() checked each value alone and streamed a step of three 3e38 values (state infinite, every
    # later output NaN), and step() summed signed values, so 3e38 - 3e38 + 3e38 passed (an audit).
    s = OnnxStreamer(graph[1])
    s.run(np.zeros((1, 3, 3), np.float32))
    before = s.state
    for sample in ([3e38, 3e38, 3e38], [3e38, -3e38, 3e38], [-3e38, 3e38, 3e38]):
        x = np.array([[sample]], np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")        # the error alone (numpy warned of the overflow too)
            with pytest.raises(ValueError, match="values too large for float32 arithmetic"):
                s.step(x[:, 0])
            with pytest.raises(ValueError, match="values too large for float32 arithmetic.*nothing was streamed"):
                s.run(np.concatenate([np.zeros((1, 2, 3), np.float32), x], 1))
    assert s.steps == 3 and np.array_equal(s.state, before)
    assert np.isfinite(s.run(np.full((1, 2, 3), 1e30, np.float32))).all()     # large, not too large
    # The rule is per sequence: step() summed the whole batch, so two sequences of 2e38 each were
    # refused together that run() streamed, and each alone too (a code review)
    wide, alone = OnnxStreamer(graph[1]), OnnxStreamer(graph[1])
    wide.reset(2)
    x = np.zeros((2, 3), np.float32)
    x[:, 0] = 2e38
    y = wide.step(x)
    assert np.isfinite(y).all() and np.array_equal(y[1:], alone.step(x[1:]))


def test_an_infinite_float16_sample_or_state_is_refused_too(graph):
    # In float16 the float32 bound itself rounds to inf, so run() and the state setter took inf <= inf
    # as in range: the stream's state went non-finite and every later output NaN.
    s = OnnxStreamer(graph[1])
    s.run(np.zeros((1, 3, 3), np.float32))
    before = s.state
    x = np.zeros((1, 4, 3), np.float16)
    x[0, 1, 0] = np.inf
    with pytest.raises(ValueError, match=r"x holds 1 NaN or infinite value\(s\) as float32"):
        s.run(x)
    state = np.zeros((1, s.state_size), np.float16)
    state[0, 0] = -np.inf
    with pytest.raises(ValueError, match=r"state holds 1 NaN or infinite value\(s\) as float32.*; not set"):
        s.state = state
    assert s.steps == 3 and np.array_equal(s.state, before)
    assert np.isfinite(s.run(np.ones((1, 2, 3), np.float16))).all()      # finite float16 streams as before


def test_the_streamer_expands_a_home_path_as_to_onnx_does(graph, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    to_onnx(graph[0], "~/m.onnx")
    assert (tmp_path / "m.onnx").is_file()
    assert OnnxStreamer("~/m.onnx").run(np.zeros((1, 2, 3), np.float32)).shape == (1, 2, 4)


def test_setting_the_state_while_another_thread_resets_names_the_batch(graph):
    """The setter checked the shape against the batch before taking the lock. A reset(batch) from
    another thread in between made the copy fail with numpy's "could not broadcast input array
    from shape (3, 3072) into shape (2, 3072)" (seen with three threads stepping, resetting and
    setting), or, for a state of one sequence, copied it into every sequence silently (numpy
    broadcasts). The check now runs under the lock, against the batch the copy goes into."""
    s = OnnxStreamer(graph[1])
    errors = []

    def set_state():
        try:
            s.state = np.zeros((1, s.state_size), np.float32)      # right for batch 1
        except ValueError as exc:
            errors.append(str(exc))

    with s._lock:                               # hold the streamer as a long run() would
        setter = threading.Thread(target=set_state)
        setter.start()
        time.sleep(0.3)                         # the setter converts, checks and waits for the lock
        s.reset(2)
    setter.join()
    assert len(errors) == 1 and "state must have shape (batch, state_size)=(2, " in errors[0], errors


# -- mean pooling far into a stream ----------------------------------------------------------------
@pytest.fixture(scope="module")
def mean_graph(tmp_path_factory):
    model = small_model("s4d", pooling="mean")
    path = tmp_path_factory.mktemp("long-mean") / "m.onnx"
    return model, to_onnx(model, path)


# 2**24 - 5: the stream crosses 2**24, where a float32 count alone stops growing
@pytest.mark.parametrize("count", [1e6, 1e7, 2**24 - 5])
def test_the_running_mean_keeps_its_digits_far_into_a_stream(mean_graph, count):
    """A mean-pooled graph's running mean, continued from step ``count`` (set through the state,
    as after hours of streaming), against the float64 mean of the same features. The update
    (h - mean) / count falls below the mean's last bit as the count grows: plain float32 rounding
    was 1.4e-4 off after 3e6 streamed steps and 1.2e-3 after 1e7 (simulated); continued for 2000
    steps here it ended 6.5e-6 (from 1e6) and 8.3e-6 (from 1e7) off, now 8.5e-8 and 6.9e-8.
    Tolerance 1e-6: the mean is O(1), so a few float32 roundings of it (6e-8 each) and the
    features' own error (~1e-6, weighted by 2000 / count) stay far below it."""
    model, res = mean_graph
    layout = {name: (off, size) for name, off, size in res.state_layout}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2000, 3, generator=g)
    mean0 = torch.randn(1, model.config.d_model, generator=g, dtype=torch.float64)
    state = np.zeros((1, res.state_size), np.float32)
    off, size = layout["pool.mean"]
    state[:, off:off + size] = mean0.float().numpy()
    state[:, layout["pool.count"][0]] = count
    s = OnnxStreamer(res.path)
    s.state = state
    s.run(x)
    with torch.no_grad():          # the float64 features of the same steps (layers from a zero state)
        h = model.double()._features(x.double(), None)[0]
        model.float()
    mean0 = mean0.float().double()   # the mean the state started from, as float32 holds it
    want = (count * mean0[0] + h.sum(0)) / (count + x.shape[1])
    got = s.state[0, off:off + size]
    assert np.abs(got - want.numpy()).max() < 1e-6


@pytest.mark.parametrize("count", [1e6, 1e7])
def test_eager_steps_keep_the_running_means_digits_as_the_graph_does(mean_graph, count):
    # SequenceModel.step kept the plain float32 update after the graph got its carry, so a stream
    # in torch lost the digits the graph kept (6.5e-6 / 8.3e-6 off here, as the graph was); both
    # now run models.running_mean_step. Same start, features and tolerance as the graph's test.
    model, _ = mean_graph
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2000, 3, generator=g)
    mean0 = torch.randn(1, model.config.d_model, generator=g, dtype=torch.float64)
    with torch.no_grad():
        cache = model.allocate_inference_cache(1)
        cache["pool_mean"], cache["t"] = mean0.float(), int(count)
        for t in range(x.shape[1]):
            model.step(x[:, t], cache)
        h = model.double()._features(x.double(), None)[0]
        model.float()
    want = (count * mean0.float().double()[0] + h.sum(0)) / (count + x.shape[1])
    assert (cache["pool_mean"][0].double() - want).abs().max() < 1e-6
