"""prefill: read a prompt in convolution mode, then stream on from its state.

The reference is always the slow path it replaces: each sequence stepped alone through its own
valid steps. Tolerance 1e-5 (absolute, outputs of order 1): the FFT convolution and the recurrence
round differently, ~1e-7..1e-6 at these sizes in float32; a wrong state (off by a step, another
layout, the padding read) is off by O(0.1). Float64 layers are held to 1e-10.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import lrnnx_zoo
from lrnnx_zoo.base import LTI_LRNN, right_aligned
from lrnnx_zoo.export import ExportError, OnnxStreamer, state_from_cache, to_onnx
from lrnnx_zoo.step_forms import StepForm
from plugin_fixtures import layers_registered

H, N = 8, 8
TOL = 1e-5
VARIANTS = [("lru", {}), ("s4d", {}), ("s4d", {"discretization": "bilinear"}), ("s4", {}),
            ("s4", {"discretization": "zoh"}), ("s4", {"measure": "fourier", "rank": 2}), ("fftconv", {}),
            ("fftconv", {"channels": 2}), ("fftconv", {"kernel_type": "s4"}), ("fftconv", {"kernel_type": "lru"})]
IDS = [name + "".join(f"-{k}={v}" for k, v in kw.items()) for name, kw in VARIANTS]


def layer_of(name: str, dtype: torch.dtype = torch.float32, **kw) -> nn.Module:
    torch.manual_seed(0)
    return lrnnx_zoo.create_layer(name, H, d_state=N, **kw).to(dtype).eval()


def stepped_alone(layer: nn.Module, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each sequence's state after stepping through its own lengths[b] samples, (B, state_size)."""
    states = []
    for b in range(x.shape[0]):
        cache = layer.allocate_inference_cache(1)
        for t in range(int(lengths[b])):
            layer.step(x[b:b + 1, t], cache)
        states.append(cache["lrnn_state"])
    return torch.cat(states)


def test_right_aligned_moves_each_sequence_to_the_end():
    x = torch.arange(1.0, 13.0).reshape(3, 4, 1)
    got = right_aligned(x, torch.tensor([4, 2, 0]))[..., 0]
    assert got.tolist() == [[1, 2, 3, 4], [0, 0, 5, 6], [0, 0, 0, 0]]
    assert right_aligned(x, None) is x


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
@torch.no_grad()
def test_layer_prefill_is_the_state_of_stepping_through(name, kw):
    layer = layer_of(name, **kw)
    x = torch.randn(3, 40, H)
    lengths = torch.tensor([25, 9, 1])
    y, cache = layer.prefill(x[:, :25], lengths)
    assert torch.equal(y, layer(x[:, :25], lengths=lengths))
    want = stepped_alone(layer, x, lengths)
    assert (cache["lrnn_state"] - want).abs().max() < TOL
    # the families' closed form and the generic default (stepping the form) are one state
    generic = LTI_LRNN.final_step_state(layer, x[:, :25], lengths, cache["step_form"])
    assert (generic - cache["lrnn_state"]).abs().max() < TOL
    # and the stream goes on: steps after a whole-length prefill continue forward's outputs
    full = layer(x)
    _, cache = layer.prefill(x[:, :25])
    ys = torch.stack([layer.step(x[:, t], cache)[0] for t in range(25, 40)], 1)
    assert (ys - full[:, 25:]).abs().max() < TOL


@pytest.mark.parametrize("name,kw", [VARIANTS[1], VARIANTS[3], VARIANTS[0]], ids=["s4d", "s4", "lru"])
@torch.no_grad()
def test_float64_prefill_is_exact(name, kw):
    layer = layer_of(name, torch.float64, **kw)
    x = torch.randn(2, 30, H, dtype=torch.float64)
    lengths = torch.tensor([30, 17])
    _, cache = layer.prefill(x, lengths)
    assert cache["lrnn_state"].dtype == torch.float64
    assert (cache["lrnn_state"] - stepped_alone(layer, x, lengths)).abs().max() < 1e-10


@torch.no_grad()
def test_empty_prompt_gives_the_zero_state():
    layer = layer_of("s4d")
    y, cache = layer.prefill(torch.randn(2, 0, H))
    assert y.shape == (2, 0, H) and not cache["lrnn_state"].any()


@pytest.mark.parametrize("name,kw", [("s4", {}), ("s4", {"discretization": "zoh"}), ("s4", {"l_max": 64}),
                                     ("s4", {"measure": "legt", "rank": 2}), ("fftconv", {"kernel_type": "s4"})],
                         ids=["legs", "zoh", "l_max=64", "legt-rank2", "fftconv-s4"])
@torch.no_grad()
def test_s4_prefill_builds_its_dense_system_once_and_squares_once(name, kw, monkeypatch):
    # The step form's A_bar^L (for the plain C) and the state passing's Krylov block come from one
    # chain of squares, and A_bar from one discretisation: a prefill used to build A_bar three times
    # and square it in two chains (hippo.power, then the state's own), ~1.6x the dense work.
    from lrnnx_zoo import hippo
    from lrnnx_zoo.plugins.s4 import dense
    # (an fftconv layer around the s4 kernel built A_bar three times and squared twice too)
    layer = layer_of(name, **kw)
    kernel = layer.conv.kernel if name == "fftconv" else layer.kernel
    x = torch.randn(3, 25, H)
    lengths = torch.tensor([25, 9, 1])
    layer(x)                                                 # the kernel's length is set before counting
    calls = {"system": 0, "power": 0}
    for module, name, key in [(dense, "bilinear_nplr", "system"), (dense, "discretize", "system"),
                              (hippo, "power", "power")]:
        def counted(*a, _f=getattr(module, name), _k=key, **k):
            calls[_k] += 1
            return _f(*a, **k)
        monkeypatch.setattr(module, name, counted)
    _, cache = layer.prefill(x, lengths)
    # (a zoh forward's kernel already discretised A_bar, which the kernel cache keeps)
    assert calls == {"system": 0 if kw.get("discretization") == "zoh" else 1, "power": 0}
    assert (cache["lrnn_state"] - stepped_alone(layer, x, lengths)).abs().max() < TOL
    assert not kernel.__dict__.get("_dense_memo")          # nothing kept past the prefill


@pytest.mark.parametrize("discretization", ["bilinear", "zoh"])
@torch.no_grad()
def test_s4_prefills_reuse_the_dense_work_until_the_weights_change(discretization, monkeypatch):
    # Every prefill discretised A_bar again (a zoh one: H matrix exponentials, 180 ms for a 2-block
    # d_model=128 model at batch 1, against 5.5 ms now) and squared it for its Krylov block. Both are
    # cached like the kernel: the same bits as computed afresh, a forward's spectrum not evicted by
    # them, and computed again once a weight changes.
    from lrnnx_zoo.plugins.s4 import dense
    monkeypatch.setattr(dense, "dplr_state_cheaper", lambda *a: False)      # the dense path at any size
    layer = layer_of("s4", discretization=discretization)
    kernel = layer.kernel
    x = torch.randn(3, 25, H)
    layer(x)                                # the kernel's length is set (C~ changes), then its spectrum cached
    layer(x)
    calls = {"system": 0, "krylov": 0, "kernel": 0}
    for owner, name, key in [(dense, "bilinear_nplr", "system"), (dense, "discretize", "system"),
                             (dense, "krylov_doubling", "krylov"), (type(kernel), "_kernel", "kernel")]:
        def counted(*a, _f=getattr(owner, name), _k=key, **k):
            calls[_k] += 1
            return _f(*a, **k)
        monkeypatch.setattr(owner, name, counted)
    _, first = layer.prefill(x)
    _, second = layer.prefill(x)
    _, third = layer.prefill(x)
    layer(x)
    # (one Krylov block for the step forms' diagonal-accuracy check at the first prefill, one for the state)
    assert calls == {"system": int(discretization == "bilinear"), "krylov": 2, "kernel": 0}
    assert torch.equal(first["lrnn_state"], second["lrnn_state"]) and torch.equal(first["lrnn_state"], third["lrnn_state"])
    kernel.log_dt.add_(0.3)
    _, changed = layer.prefill(x)
    fresh = copy.deepcopy(layer)                       # (a copy starts without a cache)
    assert calls["system"] == 1 + int(discretization == "bilinear")
    assert torch.equal(changed["lrnn_state"], fresh.prefill(x)[1]["lrnn_state"])
    assert (changed["lrnn_state"] - first["lrnn_state"]).abs().max() > 1e-3
    kinds = {key[0] for key, _, _ in kernel.__dict__["_kernel_cache"][1]}
    assert {"dense_system", "spectrum"} <= kinds     # (the block came from C~'s squares this time)
    # above the size limit nothing dense is kept (H=256, N=256: 134 MB a layer), the results the same
    monkeypatch.setattr(s4_plugin_kernel(), "DENSE_CACHE_BYTES", 0)
    kernel.log_dt.add_(0.3)
    _, uncached = layer.prefill(x)
    layer.prefill(x)                                   # (the second takes its block from no squares)
    kinds = {key[0] for key, _, _ in kernel.__dict__["_kernel_cache"][1]}
    assert not kinds & {"dense_system", "krylov"}
    assert torch.equal(uncached["lrnn_state"], copy.deepcopy(layer).prefill(x)[1]["lrnn_state"])


@pytest.mark.parametrize("name", ["s4d", "fftconv"])
@torch.no_grad()
def test_modal_prefills_reuse_the_modes_until_the_weights_change(name, monkeypatch):
    # Each prefill (and step form) discretised the modes again: exponentials over H x N/2 complex128
    # entries, a fifth of an S4D prefill (d_model=256, d_state=256: 22.5 -> 17.8 ms). Kept like the
    # kernel: the same bits as computed afresh, and computed again once a weight changes.
    from lrnnx_zoo.modal import ChannelModalKernel
    layer = layer_of(name)
    kernel = layer.conv.kernel if name == "fftconv" else layer.kernel
    x = torch.randn(3, 25, H)
    calls = []
    modes = type(kernel).modes
    monkeypatch.setattr(type(kernel), "modes", lambda self, rate=1.0: calls.append(rate) or modes(self, rate))
    layer(x)
    _, first = layer.prefill(x)
    count = len(calls)
    _, again = layer.prefill(x)
    assert len(calls) == count and torch.equal(first["lrnn_state"], again["lrnn_state"])
    monkeypatch.setattr(ChannelModalKernel, "kept_modes", lambda self, rate=1.0: self.modes(rate))
    assert torch.equal(layer.prefill(x)[1]["lrnn_state"], first["lrnn_state"])      # uncached: same bits
    monkeypatch.undo()
    for p in kernel.parameters():
        p.mul_(1.01)
    _, changed = layer.prefill(x)
    assert (changed["lrnn_state"] - first["lrnn_state"]).abs().max() > 1e-4
    assert torch.equal(changed["lrnn_state"], copy.deepcopy(layer).prefill(x)[1]["lrnn_state"])


def s4_plugin_kernel():
    from lrnnx_zoo.plugins.s4 import kernel
    return kernel


@pytest.mark.parametrize("name,kw", [("s4", {}), ("s4", {"discretization": "zoh"}), ("fftconv", {"kernel_type": "s4"})],
                         ids=["bilinear", "zoh", "fftconv-s4"])
def test_s4_prefill_under_autograd_keeps_values_of_the_unshared_computation(name, kw, monkeypatch):
    # The shared dense work was reused whatever the grad mode (A_bar and the Krylov block built under
    # no_grad by the step form fed the state passing). The cache keeps values, as step's does: the
    # prefill's state held the prompt's whole autograd graph while the cache lived (~50 MB a cache
    # for 8192 steps at d_model 64, found by a soak audit). Under autograd the values are those of
    # the unshared computation, and nothing of the graph is kept.
    import contextlib
    layer = layer_of(name, **kw)
    kernel = layer.conv.kernel if name == "fftconv" else layer.kernel
    x = torch.randn(3, 25, H, requires_grad=True)
    lengths = torch.tensor([25, 9, 1])
    layer(x)                                           # under autograd: sets the length, caches nothing

    def state() -> torch.Tensor:
        y, cache = layer.prefill(x, lengths)
        assert y.requires_grad and cache["lrnn_state"].grad_fn is None and not cache["lrnn_state"].requires_grad
        return cache["lrnn_state"]

    shared = state()
    monkeypatch.setattr(kernel, "sharing_dense_work", lambda L: contextlib.nullcontext())
    unshared = state()
    assert (shared - unshared).abs().max() <= 1e-6 * unshared.abs().max()


@torch.no_grad()
def test_s4_prefills_in_two_threads_share_nothing(monkeypatch):
    # The shared work lived on the kernel for every thread: a prefill beside another thread's (here
    # a one-sample prompt's, still running) took that one's Krylov block, T = 1 instead of its own
    # T = 8 at L = 64, and ran its state passing as 64 Horner steps instead of 8 (at H=64, N=64,
    # L=2048: 2048 instead of 32 products, 4x the prefill's time). Each thread now shares its own.
    import threading
    from lrnnx_zoo.plugins.s4 import dense
    layer = layer_of("s4")
    x = torch.randn(2, 64, H)
    layer(x)
    blocks = {}
    advance = dense.advance_state

    def recorded(A, b, u, x0, block=None):
        blocks[threading.current_thread().name] = None if block is None else block[0].shape[-2]
        return advance(A, b, u, x0, block)

    monkeypatch.setattr(dense, "advance_state", recorded)
    entered, release = threading.Event(), threading.Event()

    def other_prefill():                           # inside another prefill's scope, as far as its step form
        with torch.no_grad(), layer.kernel.sharing_dense_work(1):
            layer.kernel.__dict__.pop("_kernel_cache", None)    # so that its output matrix squares A_bar
            layer.kernel.output_matrix()
            entered.set()
            release.wait(10)

    other = threading.Thread(target=other_prefill)
    other.start()
    try:
        assert entered.wait(10)
        _, cache = layer.prefill(x)
    finally:
        release.set()
        other.join()
    assert blocks[threading.current_thread().name] in (None, dense.block_sizes(64)[0])
    _, alone = layer.prefill(x)
    assert (cache["lrnn_state"] - alone["lrnn_state"]).abs().max() < TOL
    assert not layer.kernel.__dict__.get("_dense_memo")   # nothing kept past the prefills


def model_of(layer: str, pooling, **kw) -> lrnnx_zoo.SequenceModel:
    torch.manual_seed(1)
    cfg = lrnnx_zoo.ModelConfig(layer=layer, d_input=3, d_output=2, d_model=H, n_layers=2,
                                layer_kwargs={"d_state": N, **kw}, pooling=pooling)
    return lrnnx_zoo.SequenceModel(cfg).eval()


@pytest.mark.parametrize("pooling", [None, "mean", "last"])
@pytest.mark.parametrize("layer", ["lru", "s4d", "s4", "fftconv"])
@torch.no_grad()
def test_model_prefill_then_step_continues_each_sequence(layer, pooling):
    model = model_of(layer, pooling)
    x = torch.randn(3, 45, 3)
    lengths = torch.tensor([30, 12, 1])
    y, cache = model.prefill(x[:, :30], lengths)
    assert torch.equal(y, model(x[:, :30], lengths))
    cont = torch.stack([model.step(x[:, t], cache)[0] for t in range(30, 45)], 1)
    for b in range(3):
        # the sequence it continues: its own valid prompt, then the steps fed after the prefill
        whole = model(torch.cat([x[b:b + 1, :lengths[b]], x[b:b + 1, 30:]], 1))[0]
        got, want = (cont[b], whole[lengths[b]:]) if pooling is None else (cont[b, -1], whole)
        assert (got - want).abs().max() < TOL, b


@pytest.mark.parametrize("layer,pooling", [("s4", "mean"), ("lru", None)])
@torch.no_grad()
def test_prefill_in_torch_then_stream_in_onnx_runtime(layer, pooling, tmp_path):
    model = model_of(layer, pooling)
    x = torch.randn(2, 40, 3)
    to_onnx(model, tmp_path / "m.onnx", validate=False, exporter="legacy")   # this test is its validation
    _, cache = model.prefill(x[:, :25])
    streamer = OnnxStreamer(tmp_path / "m.onnx")
    streamer.reset(2)
    streamer.state = state_from_cache(model, cache).numpy()
    out = streamer.run(x[:, 25:].numpy())
    want = model(x)
    if pooling is None:
        assert np.abs(out - want[:, 25:].numpy()).max() < TOL
    else:
        assert np.abs(out[:, -1] - want.numpy()).max() < TOL


@torch.no_grad()
def test_state_from_cache_refuses_a_cache_it_cannot_place():
    model = model_of("s4d", "mean")
    _, cache = model.prefill(torch.randn(2, 10, 3))
    with pytest.raises(ExportError, match="made by another model"):
        state_from_cache(model_of("s4d", "mean"), cache)
    with pytest.raises(ExportError, match="got list"):
        state_from_cache(model, [])
    model.blocks[1].layer.kernel.log_dt.add_(0.5)        # weights changed: the cache's form is stale
    with pytest.raises(ExportError, match=r"blocks\.1\.layer \(S4D\): the cache's step form is not the one"):
        state_from_cache(model, cache)


class _Gain(nn.Module):
    """A third-party layer that is not an LTI_LRNN and has no prefill: y = w * x, with a step cache."""

    def __init__(self, d_model, d_state=1):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d_model))

    def forward(self, x, integration_timesteps=None, lengths=None):
        return x * self.w

    def allocate_inference_cache(self, batch_size, **kw):
        return {"steps": 0}

    def step(self, x, cache):
        cache["steps"] += 1
        return x * self.w, cache


class _Ema(LTI_LRNN):
    """An LTI layer with a step form and no final_step_state of its own: the default steps it."""

    def __init__(self, d_model, d_state=1):
        super().__init__("no_discretization")
        self.d_model = d_model
        self.a = nn.Parameter(torch.linspace(0.5, 0.95, d_model))

    def discretize(self):
        return self.a, 1 - self.a, torch.ones_like(self.a)

    def compute_kernel(self, L):
        return (1 - self.a) * self.a ** torch.arange(L, dtype=self.a.dtype)[:, None]   # (L, H)

    def forward(self, x, integration_timesteps=None, lengths=None):
        x = self.prepare_input(x, lengths)
        K = self.compute_kernel(x.shape[1])
        y = torch.stack([(K[:t + 1].flip(0) * x[:, :t + 1]).sum(1) for t in range(x.shape[1])], 1)
        return y

    def step_form(self):
        return _EmaStep(self.a.detach())


class _EmaStep(StepForm):
    def __init__(self, a):
        super().__init__()
        self.register_buffer("a", a.clone())
        self.state_size = self.d_input = self.d_output = a.shape[0]

    def forward(self, u, s):
        s = self.a * s + (1 - self.a) * u
        return s, s


@pytest.fixture
def third_party():
    with layers_registered("prefill_third_party", prefill_gain=_Gain, prefill_ema=_Ema):
        yield


@torch.no_grad()
def test_third_party_layers_prefill_without_code_of_their_own(third_party):
    x = torch.randn(2, 20, 3)
    ema = model_of("prefill_ema", None)
    _, cache = ema.prefill(x[:, :12], torch.tensor([12, 5]))
    cont = torch.stack([ema.step(x[:, t], cache)[0] for t in range(12, 20)], 1)
    assert (cont[1] - ema(torch.cat([x[1:, :5], x[1:, 12:]], 1))[0, 5:]).abs().max() < TOL
    gain = model_of("prefill_gain", "mean")
    _, cache = gain.prefill(x[:, :12])                  # no prefill: stepped through
    assert [c["steps"] for c in cache["layers"]] == [12, 12]
    with pytest.raises(ValueError, match=r"_Gain has no prefill\(x, lengths\).*lengths \[12, 5\]"):
        gain.prefill(x[:, :12], torch.tensor([12, 5]))
