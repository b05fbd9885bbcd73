"""Exported graphs as a consumer other than lrnnx_zoo's own helpers uses them: onnx's checker, strict
shape inference and reference evaluator; ONNX Runtime at every graph optimisation level and from a
saved optimised file; torch.jit.load / torch.export.load in a process where lrnnx_zoo cannot be
imported; torch.jit.freeze; and the artifacts' bytes, exported twice.

Tolerances: onnx.reference.ReferenceEvaluator and ONNX Runtime run the same float32 graph with their
own kernels (numpy's matmul and sums against MLAS), so they agree to float32 rounding: measured
<= 5e-7 on these models over 16 steps (<= 5e-6 on the shipped digits graphs, outputs ~15), held to
1e-5. An int8 graph's activations are quantised at run time, where a rounding tie may land one
level apart: held to 1% of its largest output (measured 0.3% on digits-lru; the int8 graphs
themselves are held to 5% of the model). ONNX Runtime's optimisation levels fuse ops and may round
differently: measured <= 2e-6 on the shipped graphs, held to 1e-5. The .ts / .pt2 graphs against
the PyTorch model: the export's own float32 tolerance would be 1e-4; measured <= 5e-7, held to 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator

import lrnnx_zoo
from lrnnx_zoo.export import to_onnx, to_torch_export, to_torchscript

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FLOAT_ATOL = 1e-5
INT8_RELATIVE = 0.01
#: metadata_props every graph carries (DESIGN.md, "Step graphs").
DESIGN_KEYS = ("state_size", "state_layout", "d_input", "d_output", "family", "version", "source")
#: The ONNX graphs checked: (layer, pooling, to_onnx keywords). Each family once; mean pooling,
#: int8, a chunk graph, a fixed batch and the TorchScript-based exporter's lowest opset among them.
ONNX_VARIANTS = {
    "fftconv": ("fftconv", None, {}),
    "lru-mean-opset11": ("lru", "mean", {"opset": 11}),
    "s4-chunk4": ("s4", None, {"chunk": 4}),
    "s4d-mean": ("s4d", "mean", {}),
    "s4d-int8": ("s4d", None, {"quantize": "int8"}),
    "lru-batch1-opset25": ("lru", None, {"batch": 1, "opset": 25}),
}
STEPS = 16


def small_model(layer: str, pooling=None, **kw) -> lrnnx_zoo.SequenceModel:
    torch.manual_seed(0)
    cfg = lrnnx_zoo.ModelConfig(layer=layer, d_input=3, d_output=4, d_model=8, n_layers=2, pooling=pooling,
                                layer_kwargs={"d_state": 4}, **kw)
    return lrnnx_zoo.SequenceModel(cfg).eval()


@pytest.fixture(scope="module")
def onnx_graphs(tmp_path_factory) -> Dict[str, Path]:
    out = tmp_path_factory.mktemp("conformance-onnx")
    paths = {}
    for name, (layer, pooling, kw) in ONNX_VARIANTS.items():
        paths[name] = Path(to_onnx(small_model(layer, pooling), out / f"{name}.onnx", **kw).path)
    return paths


def metadata(proto: onnx.ModelProto) -> Dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def dims(value: onnx.ValueInfoProto) -> List[object]:
    """A graph input's or output's dimensions: numbers, or None for a symbolic one."""
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def stream_inputs(proto: onnx.ModelProto, batch: int, seed: int = 0) -> Tuple[np.ndarray, int]:
    """STEPS calls' worth of x (STEPS, batch, [chunk,] d_input) and the state width."""
    meta = metadata(proto)
    chunk = int(meta.get("lrnnx_zoo.chunk") or 0)
    shape = (STEPS, batch) + ((chunk,) if chunk else ()) + (int(meta["lrnnx_zoo.d_input"]),)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32), int(meta["lrnnx_zoo.state_size"])


def stream(run, xs: np.ndarray, state_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Feed xs call by call from a zero state through ``run(feeds) -> [y, state_out]``."""
    state = np.zeros((xs.shape[1], state_size), np.float32)
    ys = []
    for x in xs:
        y, state = run({"x": x, "state": state})
        ys.append(y)
    return np.stack(ys), state


def batches(proto: onnx.ModelProto) -> List[int]:
    fixed = dims(proto.graph.input[0])[0]
    return [fixed] if fixed else [1, 3]


def ort_session(path: Path, level: str = "ORT_ENABLE_ALL", save_to: Optional[Path] = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3          # the note that an ALL-level file is machine-specific
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if save_to is not None:
        so.optimized_model_filepath = str(save_to)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


# -- onnx's own tools ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ONNX_VARIANTS)
def test_onnx_graph_passes_the_checker_and_strict_shape_inference_as_declared(onnx_graphs, name):
    proto = onnx.load(str(onnx_graphs[name]))
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    assert [v.name for v in proto.graph.input] == ["x", "state"]
    assert [v.name for v in proto.graph.output] == ["y", "state_out"]
    # what inference derives for the outputs, their declared shapes cleared, is what they declare: the
    # feature widths as numbers, float32 (a symbolic batch may come back under another name)
    bare = onnx.ModelProto()
    bare.CopyFrom(proto)
    for value in bare.graph.output:
        value.type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(bare, strict_mode=True, data_prop=True)
    for declared, found in zip(proto.graph.output, inferred.graph.output):
        assert found.type.tensor_type.elem_type == declared.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert dims(found)[1:] == dims(declared)[1:], (declared.name, dims(found), dims(declared))
        assert dims(found)[0] == dims(declared)[0] or dims(declared)[0] is None, declared.name
    meta = metadata(proto)
    assert all(f"lrnnx_zoo.{k}" in meta for k in DESIGN_KEYS), sorted(meta)
    layout = json.loads(meta["lrnnx_zoo.state_layout"])
    assert sum(size for _, _, size in layout) == int(meta["lrnnx_zoo.state_size"]) == dims(proto.graph.input[1])[1]
    assert [offset for _, offset, _ in layout] == list(np.cumsum([0] + [s for _, _, s in layout])[:-1])
    assert int(meta["lrnnx_zoo.d_input"]) == dims(proto.graph.input[0])[-1]
    assert int(meta["lrnnx_zoo.d_output"]) == dims(proto.graph.output[0])[-1]


@pytest.mark.parametrize("name", ONNX_VARIANTS)
def test_reference_evaluator_streams_what_onnxruntime_streams(onnx_graphs, name):
    proto = onnx.load(str(onnx_graphs[name]))
    reference, session = ReferenceEvaluator(proto), ort_session(onnx_graphs[name])
    for batch in batches(proto):
        xs, width = stream_inputs(proto, batch)
        y_ref, s_ref = stream(lambda feeds: reference.run(None, feeds), xs, width)
        y_ort, s_ort = stream(lambda feeds: session.run(["y", "state_out"], feeds), xs, width)
        assert y_ref.dtype == y_ort.dtype == np.float32 and y_ref.shape == y_ort.shape
        atol = INT8_RELATIVE * np.abs(y_ort).max() if "int8" in name else FLOAT_ATOL
        np.testing.assert_allclose(y_ref, y_ort, rtol=0, atol=atol, err_msg=f"{name}, batch {batch}: y")
        np.testing.assert_allclose(s_ref, s_ort, rtol=0, atol=atol, err_msg=f"{name}, batch {batch}: state")


@pytest.mark.parametrize("name", ["s4d-mean", "lru-mean-opset11", "s4-chunk4"])
def test_every_onnxruntime_optimisation_level_and_a_saved_optimised_graph_stream_alike(onnx_graphs, name, tmp_path):
    proto = onnx.load(str(onnx_graphs[name]))
    xs, width = stream_inputs(proto, batches(proto)[-1])
    results = {}
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"):
        saved = tmp_path / f"{level}.onnx"
        session = ort_session(onnx_graphs[name], level, save_to=saved)
        results[level] = stream(lambda feeds: session.run(["y", "state_out"], feeds), xs, width)
        reloaded = ort_session(saved, "ORT_DISABLE_ALL")
        results[f"{level} saved"] = stream(lambda feeds: reloaded.run(["y", "state_out"], feeds), xs, width)
    base = results["ORT_DISABLE_ALL"]
    for key, (y, state) in results.items():
        np.testing.assert_allclose(y, base[0], rtol=0, atol=FLOAT_ATOL, err_msg=f"{name}: {key}")
        np.testing.assert_allclose(state, base[1], rtol=0, atol=FLOAT_ATOL, err_msg=f"{name}: {key}")


def test_onnx_export_is_byte_identical_when_repeated(onnx_graphs, tmp_path):
    layer, pooling, kw = ONNX_VARIANTS["s4d-mean"]
    again = to_onnx(small_model(layer, pooling), tmp_path / "again.onnx", **kw).path
    assert Path(again).read_bytes() == onnx_graphs["s4d-mean"].read_bytes()


# -- TorchScript and torch.export --------------------------------------------------------------
#: (file name, layer, pooling, exporter keywords) of the torch artifacts checked. "plain" has only ops
#: TorchScript has always had (no LayerNorm, GELU or GLU): its archive is written in format 3, which
#: keeps its version record elsewhere than format 10's.
TORCH_ARTIFACTS = [("lru.ts", "lru", None, {}), ("s4-mean.ts", "s4", "mean", {}),
                   ("s4d-chunk4.ts", "s4d", None, {"chunk": 4}), ("fftconv.pt2", "fftconv", None, {}),
                   ("s4d-mean.pt2", "s4d", "mean", {}), ("s4d-plain.ts", "s4d", None, {"plain": True})]
PLAIN = dict(norm="none", post="none", activation="tanh")


@pytest.fixture(scope="module")
def torch_artifacts(tmp_path_factory) -> Tuple[Path, Dict[str, np.ndarray]]:
    """The artifacts, and each model's forward on one (2, 16, 3) sequence (a pooled model: its logits)."""
    out = tmp_path_factory.mktemp("conformance-torch")
    x = torch.randn(2, 16, 3, generator=torch.Generator().manual_seed(1))
    expected = {}
    for file, layer, pooling, kw in TORCH_ARTIFACTS:
        kw = dict(kw)
        model = small_model(layer, pooling, **(PLAIN if kw.pop("plain", False) else {}))
        (to_torchscript if file.endswith(".ts") else to_torch_export)(model, out / file, **kw)
        with torch.no_grad():
            expected[file] = model(x).numpy()
    np.save(out / "x.npy", x.numpy())
    return out, expected


#: Run in a fresh interpreter: any import of lrnnx_zoo (or its plugins / export packages) fails.
NO_LRNNX_ZOO = """
import sys
class _NoLrnnxZoo:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lrnnx_zoo", "plugins", "export"):
            raise ImportError(f"{name} is not installed on this device")
sys.meta_path.insert(0, _NoLrnnxZoo())
"""


def test_torch_graphs_load_and_stream_in_a_process_without_lrnnx_zoo(torch_artifacts):
    folder, expected = torch_artifacts
    script = NO_LRNNX_ZOO + textwrap.dedent("""
        import json, warnings
        import numpy as np, torch
        warnings.simplefilter("ignore")          # TorchScript's deprecation
        try:
            import lrnnx_zoo
            raise SystemExit("lrnnx_zoo is importable in the device process")
        except ImportError:
            pass
        torch.set_num_threads(1)
        x = torch.from_numpy(np.load("x.npy"))
        found = {}
        for file in FILES:
            extra = {"lrnnx_zoo.json": ""}
            if file.endswith(".ts"):
                step = torch.jit.load(file, _extra_files=extra)
            else:
                step = torch.export.load(file, extra_files=extra).module()
            meta = json.loads(extra["lrnnx_zoo.json"])
            width, chunk = int(meta["lrnnx_zoo.state_size"]), int(meta.get("lrnnx_zoo.chunk") or 0)
            # a step graph takes x[:, t], a chunk graph x[:, t:t + chunk]
            calls = [x[:, t:t + chunk] for t in range(0, x.shape[1], chunk)] if chunk else list(x.unbind(1))
            state, ys = torch.zeros(x.shape[0], width), []
            for x_t in calls:
                y, state = step(x_t, state)
                ys.append(y if chunk else y[:, None])
            found[file] = torch.cat(ys, 1).numpy()
            if file.endswith(".ts"):
                try:                    # the script's own input check, in libtorch's terms
                    step(calls[0], torch.zeros(2, width + 1))
                    found[file + " refusal"] = np.array("nothing refused")
                except torch.jit.Error as exc:
                    found[file + " refusal"] = np.array(str(exc).strip().splitlines()[-1])
        np.savez("found.npz", **found)
        """)
    done = subprocess.run([sys.executable, "-c", f"FILES = {[f for f, *_ in TORCH_ARTIFACTS]!r}\n{script}"],
                          cwd=folder, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(folder / "found.npz") as found:
        for file, layer, pooling, _ in TORCH_ARTIFACTS:
            y = found[file]
            got = y[:, -1] if pooling == "mean" else y      # a pooled stream's last step: the sequence's logits
            np.testing.assert_allclose(got, expected[file], rtol=0, atol=FLOAT_ATOL, err_msg=file)
            if file.endswith(".ts"):
                assert "state must have shape (batch=2, state_size=" in str(found[file + " refusal"]), file


def test_torchscript_graph_is_saved_in_eval_mode_and_freezes_as_loaded(torch_artifacts):
    # The scripted wrapper that checks the inputs was saved in training mode (its traced step was in
    # eval mode): torch.jit.freeze(torch.jit.load("model.ts")) failed with "Freezing is currently only
    # implemented for modules in eval mode", in libtorch (torch::jit::freeze) too.
    folder, _ = torch_artifacts
    step = torch.jit.load(str(folder / "s4-mean.ts"))
    assert not step.training and not any(m.training for m in step.modules())
    x, width = torch.randn(2, 3), step.state_size
    state = torch.randn(2, width)
    frozen = torch.jit.freeze(torch.jit.load(str(folder / "s4-mean.ts")))
    optimised = torch.jit.optimize_for_inference(torch.jit.load(str(folder / "s4-mean.ts")))
    with torch.no_grad():
        want = step(x, state)
        for other in (frozen, optimised):
            for a, b in zip(other(x, state), want):
                torch.testing.assert_close(a, b, rtol=0, atol=FLOAT_ATOL)
    with pytest.raises(torch.jit.Error, match=r"state must have shape \(batch=2, state_size="):
        frozen(x, torch.zeros(2, width + 1))         # freezing keeps the checks


@pytest.mark.parametrize("fmt", ["torchscript", "torch-export"])
def test_torch_archives_name_no_temporary_file_and_repeat_byte_for_byte(tmp_path, fmt):
    # torch.jit.save / torch.export.save were given the hidden temporary file's path, and name the
    # zip's root folder after it (".m.1f3a9c2e.tmp/data.pkl", a new name every time): two exports of
    # one model were never byte-identical, and an unzipped graph showed a hidden folder.
    export, ext = (to_torchscript, "ts") if fmt == "torchscript" else (to_torch_export, "pt2")
    paths = [tmp_path / f"first.{ext}", tmp_path / f"second.{ext}"]
    for path in paths:
        export(small_model("s4d"), path, validate=False)
    for path in paths:
        roots = {name.split("/")[0] for name in zipfile.ZipFile(path).namelist()}
        assert roots == {"archive"}, roots
    if fmt == "torch-export":
        # (a .ts repeats in a fresh process; within one, torch.jit numbers the classes it compiled before)
        assert paths[0].read_bytes() == paths[1].read_bytes()


def test_torch_archives_hold_no_source_paths_of_the_exporting_machine(torch_artifacts):
    # torch.jit.save kept a .debug_pkl of source ranges beside each class's code, and torch.export.save
    # every node's stack trace in model.json: the exporter's and torch's file paths on this machine
    # (/home/<user>/..., site-packages) went to every device, as the ONNX graphs' did before
    # onnx_export.strip_debug_records (digits-s4d's .ts: 19 distinct paths, .pt2: 7).
    folder, _ = torch_artifacts
    here = [str(Path(lrnnx_zoo.__file__).resolve().parent.parent), str(Path(torch.__file__).resolve().parent)]
    for file, *_ in TORCH_ARTIFACTS:
        with zipfile.ZipFile(folder / file) as archive:
            found = sorted({name.split("/", 1)[1] for name in archive.namelist()
                            if any(h.encode() in archive.read(name) for h in here)})
        assert not found, f"{file} names {here} in {found}"
