"""An export folder deployed on an edge device that has Python, numpy and onnxruntime (or torch)
but neither lrnnx_zoo nor, for ONNX, torch.

The device is simulated by a subprocess whose ``sys.modules`` maps ``torch`` and ``lrnnx_zoo`` to
None (any import of them fails), run inside the export folder. Tolerances: the device's plain
onnxruntime loop and OnnxStreamer run the same graph on the same float32 inputs, so they agree
to float32 rounding of a different thread schedule (1e-6 absolute on outputs of order 1).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict

import numpy as np
import onnx
import pytest

from lrnnx_zoo.export import export_folder, to_onnx

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: What the device lacks: every import of these fails there.
_DEVICE_PRELUDE = 'import sys\nsys.modules["torch"] = None\nsys.modules["lrnnx_zoo"] = None\n'
FAST = dict(latency_steps=0, validation_length=256)   # the folder's contents, not its validation, are tested


def on_device(folder: Path, code: str, out: Path) -> Dict[str, np.ndarray]:
    """Run ``code`` in ``folder`` as the device would (no torch, no lrnnx_zoo); the names it binds
    that hold numpy arrays or numbers come back."""
    script = _DEVICE_PRELUDE + textwrap.dedent(code) + textwrap.dedent(f"""
        import numpy as _np
        _np.savez({str(out)!r}, **{{k: _np.asarray(v) for k, v in dict(globals()).items()
                                   if not k.startswith("_") and isinstance(v, (_np.ndarray, float, int))}})
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
    assert result.graph["bytes"] < 100_000


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
