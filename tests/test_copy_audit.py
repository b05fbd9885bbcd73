"""Copies, pickles and outside writes of layers and their streams (an audit, session 21): each test
says what went wrong before. Outputs are compared bit for bit where the same ops run on the same
numbers."""

from __future__ import annotations

import copy
import io
import threading

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo import ModelConfig, SequenceModel


def s4(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return lrnnx_zoo.create_layer("s4", 4, d_state=8, **kwargs).eval()


def model_for(layer: str) -> SequenceModel:
    torch.manual_seed(0)
    return SequenceModel(ModelConfig(layer=layer, d_input=2, d_output=3, d_model=4, n_layers=2,
                                     layer_kwargs={"d_state": 4})).eval()


@pytest.mark.parametrize("layer", ["s4d", "lru"])
def test_a_cache_is_refused_by_a_copy_made_without_it_and_kept_by_one_made_with_it(layer):
    # Caches named their layer by id(), which CPython reuses: a new layer accepted a freed layer's
    # cache and stepped with its weights (2.0-3.9 off). And a model copied with its cache refused it.
    model = model_for(layer)
    x = torch.randn(3, 2)
    with torch.no_grad():
        cache = model.allocate_inference_cache(3)
        model.step(torch.randn(3, 2), cache)
        alone = copy.deepcopy(model)
        with pytest.raises(ValueError, match="made by another model, copied apart from this one"):
            alone.step(x, cache)
        with pytest.raises(ValueError, match="made by another layer .*, or copied apart from this one"):
            alone.blocks[0].layer.step(torch.randn(3, 4), cache["layers"][0])
        for twin, twin_cache in (copy.deepcopy((model, cache)), _pickled((model, cache))):
            got, _ = twin.step(x, twin_cache)
            want, _ = model.step(x, _fork(model, cache))
            assert torch.equal(got, want)


def _pickled(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _fork(model: SequenceModel, cache: dict) -> dict:
    """The same stream, its state tensors cloned (the cache's marks and step forms shared)."""
    layers = [{**c, "lrnn_state": c["lrnn_state"].clone()} for c in cache["layers"]]
    return {**cache, "layers": layers, "pool_mean": cache["pool_mean"].clone(), "pool_carry": cache["pool_carry"].clone()}


def test_an_in_place_extension_in_one_process_of_several_warns(monkeypatch):
    # Under DistributedDataParallel, ranks whose batches had other lengths extended C~ to other
    # lengths; DDP's buffer broadcast then gave a rank rank 0's length with its own C~ (0.063 off at
    # lr 0), silently. The first length (from the plain C) is set on every rank alike and is quiet.
    import warnings

    import lrnnx_zoo.plugins.s4.kernel as s4_kernel
    monkeypatch.setattr(s4_kernel, "_distributed", lambda: True)
    layer = s4()
    with warnings.catch_warnings():             # under autograd: inference stores no length
        warnings.simplefilter("error")
        layer(torch.randn(1, 64, 4))
    with pytest.warns(s4_kernel.DistributedLengthWarning, match=r"from length 64 to cover 100 in this process "
                                                               r"only.*l_max=<longest length>"):
        layer(torch.randn(1, 100, 4))


def test_averaged_model_of_an_s4_given_its_length_averages_exactly():
    # With the length given (l_max), C~ never changes: the EMA of a model at lr 0 is the model.
    # (Without it, AveragedModel averages C~ of different lengths: docs/semantics.md, "S4's stored length".)
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    layer = s4(l_max=256)
    for use_buffers in (False, True):
        ema = AveragedModel(layer, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=use_buffers)
        with torch.no_grad():
            for L in (64, 100, 150):
                layer(torch.randn(1, L, 4))
                ema.update_parameters(layer)
            x = torch.randn(2, 150, 4)
            assert torch.equal(ema(x), layer(x))


def test_a_copy_waits_for_a_length_change_in_progress():
    # deepcopy / state_dict read C~ and L without the lock a length change holds: 3 of 556 copies
    # taken while another thread extended C~ paired one length's C~ with the other length (0.65 off).
    layer = s4()
    with torch.no_grad():
        layer(torch.randn(1, 64, 4))
    lock, done = layer.kernel._length_lock, threading.Event()
    lock.__enter__()                             # a length change "in progress" in this thread
    try:
        for snapshot in (lambda: copy.deepcopy(layer), lambda: layer.state_dict()):
            done.clear()
            worker = threading.Thread(target=lambda: (snapshot(), done.set()))
            worker.start()
            assert not done.wait(0.3)            # waits for the change
            lock.__exit__(None, None, None)
            assert done.wait(30)
            worker.join()
            lock.__enter__()
    finally:
        lock.__exit__(None, None, None)


def test_a_copy_keeps_the_optimiser_records_and_drops_other_threads_work():
    # The copy's C is taken under the lock (a fresh tensor); it keeps what C carried. A copy taken
    # during another thread's prefill held that thread's dense work, which a pool worker with the same
    # thread id then took for its own (0.82 off).
    layer = s4(lr=1e-3)
    layer(torch.randn(2, 32, 4)).square().sum().backward()
    layer.kernel.__dict__["_dense_memo"] = {12345: {"stale": torch.zeros(1)}}
    twin = copy.deepcopy(layer)
    assert "_dense_memo" not in twin.kernel.__dict__
    assert torch.equal(twin.kernel.C, layer.kernel.C) and twin.kernel.C.data_ptr() != layer.kernel.C.data_ptr()
    assert getattr(twin.kernel.C, "_optim", None) == getattr(layer.kernel.C, "_optim", None)
    assert twin.kernel.length == layer.kernel.length == 32
    groups = lrnnx_zoo.plugins.s4.optimizer_param_groups(twin, 1e-2)
    assert len(groups) == len(lrnnx_zoo.plugins.s4.optimizer_param_groups(layer, 1e-2))


@pytest.mark.parametrize("how", ["method", "copy", "deepcopy"])
def test_a_streamer_copy_is_an_independent_fork_and_pickling_says_what_to_do(tmp_path, how):
    # copy.copy shared the state buffers (stepping the copy moved the original 0.057 off its stream);
    # deepcopy and pickle failed with "cannot pickle '_thread.RLock' object".
    import pickle

    import numpy as np

    from lrnnx_zoo.export import OnnxStreamer, to_onnx
    model = model_for("s4d")
    to_onnx(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    prompt, a, b = (rng.standard_normal((2, n, 2)).astype(np.float32) for n in (5, 4, 4))
    streamer = OnnxStreamer(tmp_path / "m.onnx")
    streamer.reset(2)
    streamer.run(prompt)
    fork = {"method": streamer.copy, "copy": lambda: copy.copy(streamer), "deepcopy": lambda: copy.deepcopy(streamer)}[how]()
    assert fork.steps == streamer.steps == 5 and np.array_equal(fork.state, streamer.state)
    ya, yb = [], []
    for t in range(4):                       # interleaved: each goes on from the prompt with its own input
        ya.append(streamer.step(a[:, t]))
        yb.append(fork.step(b[:, t]))
    with torch.no_grad():
        want_a = model(torch.from_numpy(np.concatenate([prompt, a], 1)))[:, 5:].numpy()
        want_b = model(torch.from_numpy(np.concatenate([prompt, b], 1)))[:, 5:].numpy()
    assert np.abs(np.stack(ya, 1) - want_a).max() <= 1e-5 and np.abs(np.stack(yb, 1) - want_b).max() <= 1e-5
    with pytest.raises(TypeError, match=r"cannot be pickled; pickle its path .* \(streamer.copy\(\) forks"):
        pickle.dumps(streamer)


def test_a_model_copied_with_its_optimiser_still_shares_its_parameters():
    # (The S4 kernel's copy goes through deepcopy's memo: a snapshot of C taken for the copy would
    # leave the optimiser's copy updating another tensor than the model's.)
    layer = s4(l_max=32)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    twin, twin_opt = copy.deepcopy((layer, opt))
    assert twin_opt.param_groups[0]["params"][1] is twin.kernel.C
    twin(torch.randn(2, 32, 4)).square().sum().backward()
    before = twin.kernel.C.detach().clone()
    twin_opt.step()
    assert not torch.equal(twin.kernel.C, before) and torch.equal(layer.kernel.C, layer.kernel.C)


def test_an_s4_state_dict_shares_the_live_tensors():
    # EMA code (timm's ModelEmaV2) copies into state_dict().values(): clones of C and L, made for a
    # consistent snapshot, left the EMA's C behind (its output 0.15 off the source's).
    layer = s4(l_max=32)
    sd = layer.state_dict()
    assert sd["kernel.C"].data_ptr() == layer.kernel.C.data_ptr()
    assert sd["kernel.L"].data_ptr() == layer.kernel.L.data_ptr()
