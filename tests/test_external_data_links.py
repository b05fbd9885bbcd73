"""check_external_data (OnnxStreamer's guard against graphs that read files outside their folder) and
links: Hugging Face's cache keeps a snapshot's model.onnx and model.onnx.data as links to
../../blobs/<hash>, which ONNX Runtime loads; the guard refused that layout as external data outside
the graph's folder. A data file linked out of both folders stays refused."""

from __future__ import annotations

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lrnnx_zoo.export.runtime import check_external_data  # noqa: E402


def _graph_with_external_data(folder) -> None:
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)


def _hub_cache_layout(tmp_path, data_target=None):
    """snapshots/abc/model.onnx -> ../../blobs/g, snapshots/abc/model.onnx.data -> data_target
    (default ../../blobs/d), as huggingface_hub's cache lays a download out."""
    made = tmp_path / "made"
    made.mkdir()
    _graph_with_external_data(made)
    (tmp_path / "blobs").mkdir()
    snapshot = tmp_path / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    os.replace(made / "model.onnx", tmp_path / "blobs" / "g")
    os.replace(made / "model.onnx.data", tmp_path / "blobs" / "d")
    os.symlink("../../blobs/g", snapshot / "model.onnx")
    os.symlink(data_target or "../../blobs/d", snapshot / "model.onnx.data")
    return snapshot / "model.onnx"


def test_a_graph_in_a_hub_cache_snapshot_with_its_data_in_the_blobs_is_accepted(tmp_path):
    path = _hub_cache_layout(tmp_path)
    check_external_data(str(path))
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])   # what the guard lets through loads
    assert session.run(None, {"x": np.ones((1, 4), np.float32)})[0].tolist() == [[4.0] * 4]


def test_data_linked_out_of_both_folders_is_still_refused(tmp_path):
    outside = tmp_path / "secret"
    outside.write_bytes(b"\0" * 64)
    path = _hub_cache_layout(tmp_path, data_target=str(outside))
    with pytest.raises(ValueError, match="outside the folder"):
        check_external_data(str(path))
