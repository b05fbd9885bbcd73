"""Export artefacts from strangers (a Hub repo, a shared folder): what loading them may read or run.

ONNX graphs are data that ONNX Runtime interprets, so OnnxStreamer is the loader for graphs from
anywhere, and it must not let a graph read files outside its folder. .ts and .pt2 archives hold
code (TorchScript) and pickles that torch.export.load unpickles: they are documented as such.
"""

from __future__ import annotations

import os

import numpy as np
import pytest


def _graph(path, location):
    """A minimal step graph (y = x @ W, state passed through) whose W lives in the file ``location``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((4, 2), np.float32), "W")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("length", "32")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", k]) for n, k in (("x", 4), ("state", 3))]
    out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", k]) for n, k in (("y", 2), ("state_out", 3))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Identity", ["state"], ["state_out"])]
    model = helper.make_model(helper.make_graph(nodes, "g", io, out, [w]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in {"state_size": "3", "d_input": "4", "d_output": "2", "state_layout": "[]"}.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = "lrnnx_zoo." + key, value
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("how", ["parent", "absolute", "link"])
def test_onnx_external_data_outside_the_graphs_folder_is_refused_before_onnx_runtime_reads_it(tmp_path, monkeypatch,
                                                                                             how):
    # A graph may name a file for a tensor's bytes. ONNX Runtime before 1.24 (pyproject admits 1.18) read
    # '../secret' or '/abs/secret' into the initializer, so the graph's outputs carried the file; 1.32
    # refuses it itself, which OnnxStreamer reported as "a newer onnxruntime ... may load it".
    import onnxruntime

    from lrnnx_zoo.export import OnnxStreamer
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"SECRET" * 8)
    folder = tmp_path / "download"
    folder.mkdir()
    location = {"parent": "../secret.bin", "absolute": str(secret), "link": "weights.bin"}[how]
    if how == "link":
        (folder / "weights.bin").symlink_to(secret)
    graph = _graph(folder / "model.onnx", location)
    monkeypatch.setattr(onnxruntime, "InferenceSession",
                        lambda *a, **k: pytest.fail("ONNX Runtime was given a graph reading outside its folder"))
    with pytest.raises(ValueError, match=r"tensor 'W' keeps its data in the external file .*outside the folder "
                                         r".*refused before ONNX Runtime reads it") as err:
        OnnxStreamer(graph)
    assert str(secret) in str(err.value)


def test_onnx_external_data_that_is_no_regular_file_is_refused(tmp_path):
    from lrnnx_zoo.export import OnnxStreamer
    os.mkfifo(tmp_path / "w.bin")
    with pytest.raises(ValueError, match=r"keeps its data in 'w.bin', which is not a regular file"):
        OnnxStreamer(_graph(tmp_path / "model.onnx", "w.bin"))


def test_onnx_external_data_beside_the_graph_still_streams(tmp_path):
    from lrnnx_zoo.export import OnnxStreamer
    (tmp_path / "w.bin").write_bytes(np.arange(8, dtype=np.float32).tobytes())
    streamer = OnnxStreamer(_graph(tmp_path / "model.onnx", "w.bin"))
    np.testing.assert_allclose(streamer.step(np.ones((1, 4), np.float32)), [[12.0, 16.0]])


def test_a_metadata_entry_that_inflates_without_bound_is_not_read_whole(tmp_path):
    # read_metadata is the way to look at a .ts/.pt2 from anywhere without loading it; it read the
    # entry whole: a 2 MB archive whose extra/lrnnx_zoo.json inflates to 2 GiB grew the process by
    # 4.3 GB over 23 s, then failed with a bare JSONDecodeError (an audit). Here 64 MiB from 64 kB.
    import tracemalloc
    import zipfile

    from lrnnx_zoo.export.torchscript_export import MAX_METADATA_BYTES, read_metadata
    path = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("archive/extra/lrnnx_zoo.json", "w") as entry:
            for _ in range(64):
                entry.write(b" " * (1 << 20))
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"extra/lrnnx_zoo.json holds over 1024 KiB .*not read further"):
            read_metadata(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_METADATA_BYTES, peak


@pytest.mark.parametrize("body, said", [(b"[1, 2]", "holds a JSON list"), (b"\xff{", "is not JSON")])
def test_metadata_that_is_no_json_object_is_named(tmp_path, body, said):
    import zipfile

    from lrnnx_zoo.export.torchscript_export import read_metadata
    path = tmp_path / "odd.ts"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/extra/lrnnx_zoo.json", body)
    with pytest.raises(ValueError, match=rf"odd.ts: its extra/lrnnx_zoo.json {said}"):
        read_metadata(path)


@pytest.mark.parametrize("fmt, loader", [("torch-export", "torch.export.load unpickles"),
                                         ("torchscript", "torch.jit.load compiles and runs")])
def test_a_torch_export_card_says_loading_the_file_runs_its_code(fmt, loader):
    # The card's snippet told readers to call torch.export.load / torch.jit.load on the folder's file
    # with no word that either runs code from it (an audit made a .pt2 whose load wrote a file).
    from lrnnx_zoo.export.card import _run_section
    text = "\n".join(_run_section({"format": fmt, "d_input": 3, "d_output": 2, "state_size": 8,
                                   "torch_version": "2.13.0"}))
    assert "Loading this file runs code it carries" in text and loader in text
    assert text.index("runs code it carries") < text.index("```python")      # said before the snippet
    assert "ONNX export (`--format onnx`)" in text


def test_load_torch_export_runs_code_from_the_archive_as_documented(tmp_path):
    # Why the cards and docstrings warn: torch.export.load (which load_torch_export calls) unpickles
    # the sample inputs with weights_only=False once weights_only fails, so a crafted entry runs code
    # (here it only creates a file). If a torch release stops that, this fails: revisit the warnings.
    import pickle
    import zipfile

    import torch

    from lrnnx_zoo import ModelConfig, SequenceModel
    from lrnnx_zoo.export import load_torch_export, to_torch_export
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.manual_seed(0)
    model = SequenceModel(ModelConfig("lru", 3, 2, d_model=4, n_layers=1, layer_kwargs={"d_state": 2}))
    made = to_torch_export(model, tmp_path / "m.pt2", validate=False).path
    with zipfile.ZipFile(made) as src, zipfile.ZipFile(tmp_path / "crafted.pt2", "w") as dst:
        for info in src.infolist():
            dst.writestr(info, pickle.dumps(Payload()) if info.filename.endswith("sample_inputs/model.pt")
                         else src.read(info))
    try:
        load_torch_export(tmp_path / "crafted.pt2")
    except Exception:
        pass
    assert marker.exists(), f"torch {torch.__version__} no longer unpickles a .pt2's sample inputs this way"


def test_a_snapshot_state_nested_too_deeply_is_a_snapshot_error(tmp_path):
    # resume reads JSON and safetensors only (no pickle); a state.json of 100 000 nested lists escaped
    # as a bare RecursionError from json (an audit) instead of naming the damaged snapshot
    from lrnnx_zoo.training_state import STATE_NAME, TENSORS_NAME, SnapshotError, read_snapshot
    folder = tmp_path / "step-00000001"
    folder.mkdir()
    (folder / STATE_NAME).write_text("[" * 100_000 + "]" * 100_000)
    (folder / TENSORS_NAME).write_bytes(b"")
    with pytest.raises(SnapshotError, match=rf"step-00000001 is damaged: {STATE_NAME} is not readable JSON"):
        read_snapshot(folder)
