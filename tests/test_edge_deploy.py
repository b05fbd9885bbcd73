"""An export folder deployed on an edge device that has Python, numpy and onnxruntime (or torch)
but neither lrnnx_zoo nor, for ONNX, torch.

The device is simulated by a subprocess whose ``sys.modules`` maps ``torch`` and ``lrnnx_zoo`` to
None (any import of them fails), run inside the export folder. Tolerances: the device's plain
onnxruntime loop and OnnxStreamer run the same graph on the same float32 inputs, so they agree
to float32 rounding of a different thread schedule (1e-6 absolute on outputs of order 1).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict

import numpy as np
import onnx
import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo.export import OnnxStreamer, export_folder, to_onnx

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: What the device lacks: every import of these fails there.
_DEVICE_PRELUDE = 'import sys\nsys.modules["torch"] = None\nsys.modules["lrnnx_zoo"] = None\n'
FAST = dict(latency_steps=0, validation_length=256)   # the folder's contents, not its validation, are tested


def on_device(folder: Path, code: str, out: Path, torch: bool = False) -> Dict[str, np.ndarray]:
    """Run ``code`` in ``folder`` as the device would (no lrnnx_zoo; no torch unless ``torch``); the
    names it binds that hold numbers, strings, numpy arrays or torch tensors come back as numpy arrays."""
    prelude = _DEVICE_PRELUDE.replace('sys.modules["torch"] = None\n', "") if torch else _DEVICE_PRELUDE
    script = prelude + textwrap.dedent(code) + textwrap.dedent(f"""
        import numpy as _np
        _np.savez({str(out)!r}, **{{k: _np.asarray(v) for k, v in dict(globals()).items() if not k.startswith("_")
                                   and (isinstance(v, (_np.ndarray, float, int, str)) or type(v).__name__ == "Tensor")}})
        """)
    done = subprocess.run([sys.executable, "-c", script], cwd=folder, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"the device run failed:\n{done.stderr[-3000:]}"
    with np.load(out) as found:
        return dict(found)


@pytest.fixture(scope="module")
def sunspots_onnx(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("edge") / "sunspots"
    export_folder("forecast-sunspots-s4d", out, format="onnx", **FAST)
    return out


def card_snippet(folder: Path, imports: str) -> str:
    """The card's Python block that imports ``imports`` and not lrnnx_zoo: the device's snippet."""
    blocks = re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S)
    found = [b for b in blocks if imports in b and "from lrnnx_zoo" not in b and "import lrnnx_zoo" not in b]
    assert len(found) == 1, f"expected one snippet importing {imports!r} without lrnnx_zoo, found {len(found)}"
    return found[0]


def model_forecast(values: np.ndarray) -> np.ndarray:
    """forecast-sunspots-s4d's next-value forecast after raw ``values`` (L, batch, 1), in the series'
    units, from the PyTorch model: z-scored inputs, a z_{t+1} - z_t output (its checkpoint record)."""
    model = lrnnx_zoo.from_pretrained("forecast-sunspots-s4d")
    norm = model.checkpoint_info["dataset"]["normalisation"]
    z = torch.from_numpy((values - norm["mean"]) / norm["std"]).float().transpose(0, 1)   # (batch, L, 1)
    with torch.no_grad():
        y = model(z)
    return ((z[:, -1] + y[:, -1]) * norm["std"] + norm["mean"]).numpy()


# -- what the graph file holds ----------------------------------------------------------------
@pytest.mark.parametrize("opset", [None, 17])      # the dynamo exporter, the TorchScript-based one
def test_graph_holds_no_exporter_debug_records(tmp_path, opset):
    # The dynamo exporter annotated every node with its stack trace, FX node and module path:
    # the exporting machine's source paths ("/home/.../export/step_graph.py", line ...) went to
    # every device and Hub repo, and made up 41% of the shipped forecaster's graph (147,734 bytes,
    # 86,949 without them).
    path = tmp_path / "m.onnx"
    result = to_onnx("forecast-sunspots-s4d", path, opset=opset)
    raw = path.read_bytes()
    assert b"step_graph.py" not in raw and b"stack_trace" not in raw
    proto = onnx.load(str(path))
    assert not any(n.metadata_props for n in proto.graph.node)
    assert not proto.graph.metadata_props
    # what is not weights: ~13 kB of nodes and names (the debug records added ~60 kB)
    weights = sum(onnx.numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)
    assert result.graph["bytes"] - weights < 20_000


@pytest.mark.parametrize("opset, ir", [(None, 9), (18, 8)])
def test_graph_ir_version_is_the_lowest_its_opset_needs(tmp_path, opset, ir):
    # The dynamo exporter stamped IR version 10 on every graph, and onnxruntime refuses an IR it
    # does not know: 1.17.3 (which implements opset 20) failed on the default export with
    # "Unsupported model IR version: 10, max supported IR version: 9", and 1.15-1.17 on an
    # `--opset 18` export made for older runtimes. Opset 20 needs IR 9, opset 18 IR 8.
    path = tmp_path / "m.onnx"
    for quantize in (None, "int8"):
        result = to_onnx("forecast-sunspots-s4d", path, opset=opset, quantize=quantize)
        assert onnx.load(str(path)).ir_version == ir == result.graph["ir_version"]


def test_card_says_which_onnxruntime_it_needs(sunspots_onnx):
    card = (sunspots_onnx / "README.md").read_text()
    assert "Needs onnxruntime >= 1.17 (opset 20, IR version 9)" in card


# -- the card's snippets, run where lrnnx_zoo is not ---------------------------------------------
def test_card_snippet_turns_raw_values_into_the_models_forecast_on_the_device(sunspots_onnx, tmp_path):
    # The forecaster was trained on z = (value - mean) / std and outputs z_{t+1} - z_t, but neither
    # the card nor the graph said so: a device user following the card fed raw sunspot numbers
    # (mean 47) and read y as the forecast. Now the graph's metadata holds the data set's record,
    # and the card's numpy + onnxruntime snippet z-scores raw values and undoes it on the output.
    found = on_device(sunspots_onnx, card_snippet(sunspots_onnx, "onnxruntime as ort"), tmp_path / "out.npz")
    assert "forecast" in found, "the card's snippet computes no forecast in the series' units"
    values = found["values"]
    assert values.shape == (50, 1, 1) and 10 < np.abs(values).mean()     # raw sunspot numbers, not z-scores
    # the same graph through OnnxStreamer on the same z-scores: same outputs and state (module docstring)
    norm = lrnnx_zoo.from_pretrained("forecast-sunspots-s4d").checkpoint_info["dataset"]["normalisation"]
    streamer = OnnxStreamer(sunspots_onnx / "model.onnx")
    z = ((values - norm["mean"]) / norm["std"]).astype(np.float32).transpose(1, 0, 2)
    y = streamer.run(z)
    np.testing.assert_allclose(found["y_t"], y[:, -1], atol=1e-6)
    np.testing.assert_allclose(found["state"], streamer.state, atol=1e-6)
    # and the PyTorch model's forecast: the float32 graph is within 1e-4 of it in z units (its
    # validation tolerance), std times that in the series' units
    np.testing.assert_allclose(found["forecast"], model_forecast(values), atol=1e-4 * norm["std"])


def test_card_snippet_of_a_classifier_gives_the_class_on_the_device(tmp_path):
    folder = tmp_path / "digits"
    export_folder("digits-lru", folder, format="onnx", **FAST)
    meta = OnnxStreamer(folder / "model.onnx").metadata
    assert json.loads(meta["lrnnx_zoo.dataset"])["format"].endswith("pixels / 16")
    assert meta["lrnnx_zoo.task"] == "sequence-classification"
    found = on_device(folder, card_snippet(folder, "onnxruntime as ort"), tmp_path / "out.npz")
    assert "label" in found, "the card's snippet does not say how to read the class"
    streamer = OnnxStreamer(folder / "model.onnx")
    logits = streamer.run(found["xs"].transpose(1, 0, 2))[:, -1]
    np.testing.assert_allclose(found["y_t"], logits, atol=1e-6)
    assert found["label"].tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("fmt", ["torchscript", "torch-export"])
def test_torch_card_snippet_runs_without_lrnnx_zoo(tmp_path, fmt):
    # torch but no lrnnx_zoo: the card's snippet loads the graph and its metadata (the .ts/.pt2
    # extra file) and gives the PyTorch model's forecast from raw values (tolerance as above).
    folder = tmp_path / fmt
    export_folder("forecast-sunspots-s4d", folder, format=fmt, **FAST)
    found = on_device(folder, card_snippet(folder, "import json, torch"), tmp_path / "out.npz", torch=True)
    assert "forecast" in found, "the card's snippet computes no forecast in the series' units"
    std = lrnnx_zoo.from_pretrained("forecast-sunspots-s4d").checkpoint_info["dataset"]["normalisation"]["std"]
    np.testing.assert_allclose(found["forecast"], model_forecast(found["values"]), atol=1e-4 * std)


@pytest.mark.parametrize("fmt", ["torchscript", "torch-export"])
def test_torch_graph_streams_without_building_an_autograd_graph(tmp_path, fmt):
    # The .ts / .pt2 weights were saved with requires_grad, so a loop that fed the state back
    # outside torch.no_grad() (the card's, a libtorch one without a NoGradGuard) chained every step
    # into one autograd graph: the forecaster's process grew from 239 MB to 1.1 GB in 20,000 steps.
    from lrnnx_zoo.export import to_torch_export, to_torchscript
    from lrnnx_zoo.export.torchscript_export import read_metadata
    path = tmp_path / ("m.ts" if fmt == "torchscript" else "m.pt2")
    (to_torchscript if fmt == "torchscript" else to_torch_export)("forecast-sunspots-s4d", path)
    step = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
    state = torch.zeros(2, int(read_metadata(path)["lrnnx_zoo.state_size"]))
    for x_t in torch.randn(3, 2, 1):
        y_t, state = step(x_t, state)
    assert state.grad_fn is None and not state.requires_grad and not y_t.requires_grad


def test_int8_graph_on_the_device_scores_what_its_card_reports(tmp_path):
    # numpy + onnxruntime only, one test sequence at a time from a zero state as the card's
    # snippet streams them: the int8 graph's accuracy is the one config.json and the card report
    # (dynamic quantisation is deterministic for a given input, so exactly equal).
    from lrnnx_zoo.training import checkpoint_data
    folder = tmp_path / "int8"
    done = export_folder("digits-s4d", folder, format="onnx", quantize="int8", **FAST)
    data = checkpoint_data(dict(lrnnx_zoo.from_pretrained("digits-s4d").checkpoint_info))
    np.savez(tmp_path / "test.npz", x=data.x_test.numpy(), y=data.y_test.numpy())
    found = on_device(folder, f"""
        import numpy as np, onnxruntime as ort
        test = np.load({str(tmp_path / "test.npz")!r})
        sess = ort.InferenceSession("model.onnx")
        size = int(sess.get_modelmeta().custom_metadata_map["lrnnx_zoo.state_size"])
        correct = 0
        for x, label in zip(test["x"], test["y"]):
            state = np.zeros((1, size), np.float32)
            for x_t in x[:, None]:
                y_t, state = sess.run(["y", "state_out"], {{"x": x_t, "state": state}})
            correct += int(y_t.argmax() == label)
        accuracy = correct / len(test["y"])
        """, tmp_path / "out.npz")
    reported = done.config["quantization"]["accuracy_int8"]
    assert float(found["accuracy"]) == reported
    assert f"int8 {reported:.4f}" in (folder / "README.md").read_text()


def test_folder_documents_the_graphs_real_inputs_and_outputs(sunspots_onnx, tmp_path):
    # What config.json and the card say the graph takes is what onnxruntime reports on the device.
    config = json.loads((sunspots_onnx / "config.json").read_text())
    found = on_device(sunspots_onnx, """
        import json, onnxruntime as ort
        sess = ort.InferenceSession("model.onnx")
        real = json.dumps({v.name: [v.shape, v.type] for v in sess.get_inputs() + sess.get_outputs()})
        """, tmp_path / "out.npz")
    real = json.loads(str(found["real"]))
    documented = {**config["inputs"], **config["outputs"]}
    assert {k: v[0] for k, v in real.items()} == documented
    assert {v[1] for v in real.values()} == {"tensor(float)"}
    card = (sunspots_onnx / "README.md").read_text()
    assert "(x [batch, 1], state [batch, 3072]) -> (y [batch, 1], state_out [batch, 3072])" in card


def test_card_data_section_takes_a_dataset_recorded_as_a_name_only():
    # A checkpoint may record its dataset as a bare name ("my-data"); the card's data section
    # called .get on it (AttributeError) and would have headed a dict without a name "data set `None`".
    from lrnnx_zoo.export.card import _data_section
    lines = _data_section({"dataset": "my-data", "task": "sequence-classification", "d_output": 3})
    assert "As in training (data set `my-data`):" in lines and any("3 class logits" in x for x in lines)
    lines = _data_section({"dataset": {"format": "pixels / 16"}, "task": None, "d_output": 3})
    assert "As in training:" in lines


def test_streamer_refuses_a_graph_taking_float16(sunspots_onnx, tmp_path):
    # A float16 copy of a graph (onnxconverter_common's default makes its inputs float16) was opened,
    # then failed at the first step inside ONNX Runtime ("Unexpected input data type"; an audit).
    # Here the inputs are retyped by hand, each cast back to float32 in front of the graph.
    graph = onnx.load(sunspots_onnx / "model.onnx")
    for inp in graph.graph.input:
        inp.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
        for node in graph.graph.node:
            node.input[:] = [f"{inp.name}_f32" if i == inp.name else i for i in node.input]
        graph.graph.node.insert(0, onnx.helper.make_node("Cast", [inp.name], [f"{inp.name}_f32"],
                                                         to=onnx.TensorProto.FLOAT))
    onnx.save(graph, tmp_path / "half_inputs.onnx")
    with pytest.raises(ValueError, match=r"input .x. is tensor\(float16\), but lrnnx-zoo.s graphs take float32 x and "
                                         r"state .*a float16 copy drifts"):
        OnnxStreamer(tmp_path / "half_inputs.onnx")
