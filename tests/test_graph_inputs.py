"""The libtorch step graphs as ``graph=`` of state_from_cache / cache_from_state (a .ts / .pt2 path or a
loaded module, a chunk graph among them), and what an exporter returns (ExportResult.to_dict, summary).

The ONNX side of graph= is in test_compat.py; these are the branches no other test reached (a coverage
run of the suite)."""

from __future__ import annotations

import json

import pytest
import torch

from lrnnx_zoo import ModelConfig, SequenceModel
from lrnnx_zoo.export import (ExportError, ExportResult, cache_from_state, load_torch_export, load_torchscript,
                              state_from_cache, to_torch_export, to_torchscript)

CONFIG = ModelConfig(layer="s4d", d_input=2, d_model=4, n_layers=1, d_output=3, layer_kwargs={"d_state": 4})


def _model(seed: int) -> SequenceModel:
    torch.manual_seed(seed)
    return SequenceModel(CONFIG).eval()


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """A model and its step graphs: .ts, .ts of 4-step chunks, .pt2 (written once for the module)."""
    folder = tmp_path_factory.mktemp("graphs")
    model = _model(0)
    results = {"ts": to_torchscript(model, folder / "m.ts"), "chunk": to_torchscript(model, folder / "c.ts", chunk=4),
               "pt2": to_torch_export(model, folder / "m.pt2", validate=False)}
    return model, results


def _cache(model: SequenceModel):
    with torch.no_grad():
        return model.prefill(torch.randn(2, 5, CONFIG.d_input, generator=torch.Generator().manual_seed(1)))[1]


@pytest.mark.parametrize("kind", ["ts", "chunk", "pt2"])
@pytest.mark.parametrize("loaded", [False, True], ids=["path", "module"])
def test_state_from_cache_takes_a_libtorch_graph_that_continues_the_model(graphs, kind, loaded):
    # check_graph_continues runs the graph from a state of the model's own stream and compares: a .ts or
    # .pt2 read as another kind, or a chunk graph stepped at the wrong stride, is 1e-1 or more away
    # (the bound is 1e-3 relative), so a broken branch raises ExportError here.
    model, results = graphs
    path = results[kind].path
    graph = path if not loaded else (load_torch_export(path) if kind == "pt2" else load_torchscript(path))
    cache = _cache(model)
    want = state_from_cache(model, cache)
    got = state_from_cache(model, cache, graph=graph)
    assert torch.equal(got, want)           # the check adds nothing to the state it returns
    back = cache_from_state(model, got, graph=graph)
    assert torch.equal(state_from_cache(model, back), want)


@pytest.mark.parametrize("kind", ["ts", "chunk", "pt2"])
def test_a_libtorch_graph_of_other_weights_is_refused(graphs, kind):
    model, results = graphs
    other = _model(1)                       # same config and layout, other weights
    with pytest.raises(ExportError, match="does not continue this model's streams"):
        state_from_cache(other, _cache(other), graph=results[kind].path)


def test_graph_arguments_that_are_no_step_graph_say_what_is_taken(graphs, tmp_path):
    model, _ = graphs
    cache = _cache(model)
    with pytest.raises(ValueError, match=r"the path '.*model\.bin'"):
        state_from_cache(model, cache, graph=tmp_path / "model.bin")
    with pytest.raises(TypeError, match="got int"):
        state_from_cache(model, cache, graph=3)


def test_export_result_to_dict_is_json_with_the_validation_report(graphs):
    result = graphs[1]["ts"]
    d = json.loads(json.dumps(result.to_dict()))            # plain JSON values all the way down
    assert d["path"] == result.path and d["format"] == "torchscript"
    assert d["state_size"] == result.state_size == 16 and d["metadata"] == result.metadata
    v = result.validation
    assert d["validation"]["passed"] is v.passed is True
    assert d["validation"]["max_abs_error"] == v.max_abs_error and d["validation"]["errors"] == v.errors
    assert graphs[1]["pt2"].to_dict()["validation"] is None        # validate=False


def test_summary_reports_the_int8_accuracy_change():
    result = ExportResult(path="m.onnx", format="onnx", metadata={}, state_size=4, d_input=1, d_output=2,
                          state_layout=[["blocks.0.layer", 0, 4]],
                          quantization={"max_abs_error": 0.01, "tolerance": 0.05, "metric": "accuracy",
                                        "accuracy_float": 0.9625, "accuracy_int8": 0.95, "accuracy_change": -0.0125})
    lines = result.summary().splitlines()
    assert lines[-1] == "  int8: accuracy float 0.9625 -> int8 0.9500 (change -0.0125)"
    assert "max abs output error 1.000e-02 (tolerance 5.000e-02)" in lines[-2]
