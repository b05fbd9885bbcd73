"""Backward compatibility: artefacts written by older lrnnx-zoo commits (tests/fixtures/compat, see its
README for which commit wrote each and how) load with the current code and give the outputs stored
beside them; a step graph whose packed state has another layout than this release's is refused by
state_from_cache / cache_from_state(graph=...) instead of continuing a stream wrongly."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lrnnx_zoo
from lrnnx_zoo.export import ExportError, OnnxStreamer, cache_from_state, state_from_cache, to_onnx

FIXTURES = Path(__file__).parent / "fixtures" / "compat"
CHECKPOINTS = ["d42b8fe/lru", "d42b8fe/s4d", "d42b8fe/s4d-mean", "36dc302/s4", "36dc302/fftconv", "862d7dc/s4-diag"]
OLD_S4 = FIXTURES / "862d7dc" / "s4-diag"
OLD_S4_GRAPH = FIXTURES / "862d7dc" / "s4-diag-onnx" / "model.onnx"


def _outputs(folder: Path):
    ref = np.load(folder / "outputs.npz")
    return ref["x"], ref["y"]


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_old_checkpoints_load_and_give_their_outputs(name):
    # Tolerance 1e-5 (outputs are O(1)): the float32 kernels were rewritten since these were saved
    # (factorised Vandermonde matmul, real-transform FFT convolution); measured up to 1.1e-6 apart.
    model = lrnnx_zoo.from_pretrained(FIXTURES / name).eval()
    x, y = _outputs(FIXTURES / name)
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, y, rtol=1e-5, atol=1e-5)


def test_an_old_step_graph_streams_as_it_did():
    x, y = _outputs(OLD_S4_GRAPH.parent)
    stream = OnnxStreamer(OLD_S4_GRAPH)
    stream.reset(2)
    np.testing.assert_allclose(stream.run(x), y, rtol=1e-6, atol=1e-6)   # the same graph and runtime


def _prompt_cache(model, x):
    with torch.no_grad():
        return model.prefill(torch.from_numpy(x[:, :6]))[1]


def test_state_from_cache_refuses_a_graph_that_keeps_the_state_in_another_layout():
    # The graph was exported by 862d7dc, before bilinear_nplr's one-pass rewrite (2140596) moved A_bar by
    # ~1e-16: the S4 layer's diagonal step form lives in the eigenbasis LAPACK returns, which came out
    # another one, with the same names and sizes in the layout metadata.
    model = lrnnx_zoo.from_pretrained(OLD_S4).eval()
    x, _ = _outputs(OLD_S4)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()[:, 6:]
    stream = OnnxStreamer(OLD_S4_GRAPH)
    stream.reset(2)
    stream.state = state_from_cache(model, _prompt_cache(model, x))     # unchecked: the old behaviour
    assert np.abs(stream.run(x[:, 6:]) - want).max() > 0.05            # the fixture does read it otherwise
    for graph in (OLD_S4_GRAPH, str(OLD_S4_GRAPH), OnnxStreamer(OLD_S4_GRAPH)):
        with pytest.raises(ExportError, match="another layout.*re-export the graph"):
            state_from_cache(model, _prompt_cache(model, x), graph=graph)
    packed = np.zeros((2, stream.state_size), np.float32)
    with pytest.raises(ExportError, match="does not continue this model's streams"):
        cache_from_state(model, packed, graph=OLD_S4_GRAPH)


def test_a_graph_exported_now_passes_the_check_and_continues_the_stream(tmp_path):
    model = lrnnx_zoo.from_pretrained(OLD_S4).eval()
    x, _ = _outputs(OLD_S4)
    path = tmp_path / "s4.onnx"
    to_onnx(model, path)
    stream = OnnxStreamer(path)
    stream.reset(2)
    stream.state = state_from_cache(model, _prompt_cache(model, x), graph=stream)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()[:, 6:]
    # float32 graph vs float32 model from a prefilled state: ~1e-6 apart; tolerance 1e-5
    np.testing.assert_allclose(stream.run(x[:, 6:9]), want[:, :3], rtol=1e-5, atol=1e-5)
    cache = cache_from_state(model, stream.state, graph=path)      # and back to PyTorch for the rest
    ys = []
    with torch.no_grad():
        for t in range(9, x.shape[1]):
            y, cache = model.step(torch.from_numpy(x[:, t]), cache)
            ys.append(y.numpy())
    np.testing.assert_allclose(np.stack(ys, 1), want[:, 3:], rtol=1e-5, atol=1e-5)


def test_a_graph_of_another_state_size_is_named_with_its_sizes(tmp_path):
    # an old mean-pooled graph (41 numbers: no pool carries) given a current model's state: the
    # streamer's own shape error did not say why; the check names both layouts
    old = lrnnx_zoo.from_pretrained(FIXTURES / "d42b8fe" / "s4d-mean").eval()
    path = tmp_path / "plain.onnx"
    to_onnx(lrnnx_zoo.from_pretrained(FIXTURES / "d42b8fe" / "s4d").eval(), path)
    x, _ = _outputs(FIXTURES / "d42b8fe" / "s4d-mean")
    with pytest.raises(ExportError, match=r"holds a state of \d+ numbers, this model's packed state has \d+"):
        state_from_cache(old, _prompt_cache(old, x), graph=path)


def test_an_old_training_snapshot_resumes_to_the_old_runs_weights(tmp_path):
    # 889e64e (the commit that added snapshots) ran digits-tiny with checkpoint_every=3 to step 8; the
    # folder holds its final checkpoint and the step-6 snapshot. Resumed now: measured 7.5e-9 from the
    # old uninterrupted run's weights (float32 rounding of kernels rewritten since); tolerance 1e-6.
    from lrnnx_zoo.training import train
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "889e64e" / "digits-tiny-run", run)
    old = load_file(str(FIXTURES / "889e64e" / "digits-tiny-run" / "model.safetensors"))
    model, metrics = train("digits-tiny", out_dir=str(run), progress=False, checkpoint_every=3, resume=True)
    state = model.state_dict()
    assert set(state) == set(old)
    for key, value in old.items():
        torch.testing.assert_close(state[key].detach(), value, rtol=0, atol=1e-6)
    assert abs(metrics["test_loss"] - 2.3944626519672174) < 1e-6
