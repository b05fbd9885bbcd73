"""An export folder builds its model's step module once: export_folder built it for its checks and
weights file, then the exporter it called built it again (a second 0.9-4.6 s for digits-s4, whose forms
each diagonalise and check their system). Reuse is scoped to that one call, thread and model object."""

from __future__ import annotations

import threading

import torch

import lrnnx_zoo
from lrnnx_zoo.export import build_step_module, export_folder, step_graph


def _model() -> lrnnx_zoo.SequenceModel:
    torch.manual_seed(0)
    return lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer="s4d", d_input=1, d_output=2, d_model=4,
                                                         n_layers=2, layer_kwargs={"d_state": 4})).eval()


def _counting(monkeypatch) -> list:
    built: list = []
    original = step_graph._layer_step_form

    def counted(*args, **kwargs):
        built.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(step_graph, "_layer_step_form", counted)
    return built


def test_an_export_folder_builds_each_layers_step_form_once(tmp_path, monkeypatch):
    built = _counting(monkeypatch)
    model = _model()
    for fmt in ("onnx", "torchscript"):
        built.clear()
        export_folder(model, tmp_path / fmt, format=fmt, validation_length=16, latency_steps=0)
        assert len(built) == len(model.blocks), fmt          # 2 x the blocks before


def test_reuse_is_for_that_model_object_and_thread_only(monkeypatch):
    built = _counting(monkeypatch)
    model, other = _model(), _model()
    step = build_step_module(model)
    with step_graph.reusing_step_module(model, step):
        assert build_step_module(model) is step
        assert build_step_module(other) is not step                      # another model: built
        seen = []
        thread = threading.Thread(target=lambda: seen.append(build_step_module(model)))
        thread.start()
        thread.join(60)
        assert seen and seen[0] is not step                              # another thread: built
    assert build_step_module(model) is not step                          # after the call: built
    assert len(built) == 4 * len(model.blocks)
