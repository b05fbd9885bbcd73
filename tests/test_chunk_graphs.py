"""Chunk forms and chunk graphs: T steps per call with the step graph's state.

Tolerances: a chunk form and T steps of its step form compute the same float32 system along
different roundings (the chunk's matrices are powers of A formed in float64 and rounded once; the
steps round every product): measured 1e-7 - 6e-7 relative to max|y| over 4 chunks of 32 steps, so
1e-5 relative catches a wrong power, tap or state slot (O(1) errors) with margin. Exported graphs
are held to the exporters' own 1e-4 absolute against the float64 forward.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo.chunk_forms import (ChannelChunkForm, DiagonalChunkForm, LoopChunkForm, SequentialChunkForm,
                                   channel_system, chunk_form, rotation_parts)
from lrnnx_zoo.export import OnnxStreamer, to_onnx, to_torch_export, to_torchscript
from lrnnx_zoo.export.chunk_graph import build_chunk_module
from lrnnx_zoo.export.step_graph import build_step_module
from lrnnx_zoo.step_forms import DiagonalStepForm, StepForm, step_form_dtype

FAMILIES = ["fftconv", "lru", "s4", "s4d"]
REL = 1e-5


def float32_form(layer):
    with step_form_dtype(torch.float32):
        return layer.step_form().float()


def s4_form(mode, measure="legs"):
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("s4", 6, d_state=8, measure=measure)
    with step_form_dtype(torch.float32):
        return layer.kernel.step_form(mode, D=layer.D.unsqueeze(0)).float()


def per_channel_forms():
    torch.manual_seed(0)
    forms = {"s4d": float32_form(lrnnx_zoo.create_layer("s4d", 6, d_state=8)),
             "fftconv-2ch": float32_form(lrnnx_zoo.create_layer("fftconv", 6, d_state=8, channels=2)),
             "fftconv-lru": float32_form(lrnnx_zoo.create_layer("fftconv", 6, d_state=8, kernel_type="lru")),
             "s4-linear": s4_form("linear"), "s4-dense": s4_form("dense"),
             "s4-diagonal": s4_form("diagonal", measure="fourier")}
    lru = lrnnx_zoo.create_layer("lru", 6, d_state=8, r_min=0.9, r_max=0.999)
    forms["lru-fused"] = float32_form(lru)
    with step_form_dtype(torch.float32):         # the form of blocks too large to fuse, as hi + lo poles
        lam = torch.exp(lru.log_lambda(torch.complex128))
        B = torch.complex(lru.B_re, lru.B_im).double() * torch.exp(lru.gamma_log.double()).unsqueeze(-1)
        forms["lru-unfused"] = DiagonalStepForm(lam, B, torch.complex(lru.C_re, lru.C_im).double(), lru.D.double(),
                                                fuse=False).float()
    assert forms["lru-fused"].fused and not forms["lru-unfused"].fused
    return forms


FORMS = per_channel_forms()


def stepped(form, u, s):
    ys = []
    for t in range(u.shape[1]):
        y, s = form(u[:, t], s)
        ys.append(y)
    return torch.stack(ys, 1), s


def chunked(chunk, u, s):
    ys = []
    for t in range(0, u.shape[1], chunk.T):     # chunk forms carry T
        y, s = chunk(u[:, t:t + chunk.T], s)
        ys.append(y)
    return torch.cat(ys, 1), s


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", sorted(FORMS))
@pytest.mark.parametrize("T", [1, 7, 32])
def test_chunk_form_equals_its_steps_over_several_chunks(name, T):
    form = FORMS[name]
    chunk = chunk_form(form, T)
    assert isinstance(chunk, (ChannelChunkForm, DiagonalChunkForm, SequentialChunkForm))
    g = torch.Generator().manual_seed(1)
    u = torch.randn(3, 4 * T, form.d_input, generator=g)
    s0 = 0.3 * torch.randn(3, form.state_size, generator=g)          # a stream already under way
    y_ref, s_ref = stepped(form, u, s0)
    with torch.no_grad():
        y, s = chunked(chunk, u, s0)
    assert y.shape == y_ref.shape and s.shape == s_ref.shape
    assert rel(y, y_ref) < REL and rel(s, s_ref) < REL


def test_diagonal_systems_apply_their_chunk_transition_elementwise_and_others_densely():
    # A^T of a diagonal system is a rotation on [Re x; Im x]: kept as two (hi + lo) rows, not an
    # (n, n) block per channel (half of the chunk's bytes)
    for name in ("s4d", "fftconv-lru", "s4-diagonal"):
        chunk = chunk_form(FORMS[name], 16)
        assert chunk.rotation and chunk.W_state.shape == (6, chunk.n, 16) and chunk.trans_re_lo is not None
    for name in ("s4-linear", "s4-dense"):
        chunk = chunk_form(FORMS[name], 16)
        assert not chunk.rotation and chunk.W_state.shape == (6, chunk.n, 16 + chunk.n)


def test_channel_system_reads_a_diagonal_form_exactly():
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("s4d", 4, d_state=6).double()
    A_bar, B_bar, C, _ = layer.kernel.discretize(dtype=torch.complex128)
    with step_form_dtype(torch.float64):
        form = layer.step_form()
    A, B, CA, K0 = channel_system(form)
    lam = torch.diagonal(A, dim1=1, dim2=2)[:, :3]                # [Re x; Im x]: the diagonal is Re lam twice
    torch.testing.assert_close(lam, A_bar.real, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(B[:, :3], B_bar.real, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(B[:, 3:], B_bar.imag, rtol=1e-13, atol=1e-15)
    K0_expected = (2 * C[0] * B_bar).real.sum(-1) + layer.D
    torch.testing.assert_close(K0[0], K0_expected, rtol=1e-12, atol=1e-14)
    assert rotation_parts(A, A) is not None


class _TanhStep(StepForm):
    """A nonlinear step form (no closed chunk form): s' = tanh(s + u), y = 2 s'."""

    def __init__(self, width):
        super().__init__()
        self.state_size = self.d_input = self.d_output = width

    def forward(self, u, s):
        s = torch.tanh(s + u)
        return 2 * s, s


def test_a_form_without_a_closed_chunk_form_loops_with_the_same_results():
    form = _TanhStep(6)
    chunk = chunk_form(form, 5)
    assert isinstance(chunk, LoopChunkForm)
    u, s0 = torch.randn(2, 10, 6), torch.randn(2, 6)
    y_ref, s_ref = stepped(form, u, s0)
    y, s = chunked(chunk, u, s0)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    form.chunk_form = lambda T: ("its own", T)          # a form may bring its own chunk form
    assert chunk_form(form, 5) == ("its own", 5)
    assert isinstance(chunk_form(FORMS["s4d"], 5, closed=False), LoopChunkForm)


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, None, "8"])
def test_chunk_sizes_must_be_positive_ints(bad):
    with pytest.raises(ValueError, match=r"chunk must be a positive int \(steps per chunk\), got"):
        chunk_form(FORMS["s4d"], bad)


def small_model(layer, pooling=None, seed=0):
    torch.manual_seed(seed)
    cfg = lrnnx_zoo.ModelConfig(layer=layer, d_input=3, d_output=4, d_model=8, n_layers=2, pooling=pooling,
                                layer_kwargs={"d_state": 4})
    return lrnnx_zoo.SequenceModel(cfg).eval()


@pytest.mark.parametrize("layer", FAMILIES)
@pytest.mark.parametrize("pooling", [None, "mean", "last"])
def test_chunk_module_equals_the_step_module(layer, pooling):
    model = small_model(layer, pooling)
    step, chunk = build_step_module(model), build_chunk_module(model, 6)
    assert (chunk.state_size, chunk.state_layout) == (step.state_size, step.state_layout)
    x = torch.randn(2, 18, 3)
    y_ref, s_ref = stepped(step, x, step.zero_state(2))
    s, ys = chunk.zero_state(2), []
    for t in range(0, 18, 6):
        y, s = chunk(x[:, t:t + 6], s)
        ys.append(y)
    y = torch.cat(ys, 1)
    assert rel(y, y_ref) < REL and rel(s, s_ref) < REL


@pytest.mark.parametrize("layer", FAMILIES)
def test_onnx_chunk_graph_streams_like_the_step_graph_and_hands_its_state_over(layer, tmp_path):
    model = small_model(layer, "mean")
    res = to_onnx(model, tmp_path / "chunk.onnx", chunk=8)
    assert res.validation.passed and res.validation.length == 256 and res.metadata["lrnnx_zoo.chunk"] == "8"
    # the step graph from the TorchScript-based exporter (opset 17, ~0.1 s against dynamo's ~2): the state
    # layout is the step module's, whichever exporter wrote the graph
    step_res = to_onnx(model, tmp_path / "step.onnx", opset=17)
    chunks, steps = OnnxStreamer(res.path), OnnxStreamer(step_res.path)
    assert chunks.chunk == 8 and steps.chunk is None and "chunk=8" in repr(chunks)
    x = np.random.default_rng(0).standard_normal((2, 35, 3)).astype(np.float32)
    want = steps.run(x)
    chunks.reset(2)
    got = chunks.run(x[:, :32])                            # 4 chunks
    assert chunks.steps == 32
    steps.reset(2)
    steps.state = chunks.state                              # one layout: the last 3 steps go on as steps
    rest = steps.run(x[:, 32:])
    np.testing.assert_allclose(np.concatenate([got, rest], 1), want, rtol=0, atol=1e-5)


def test_streamer_refuses_what_a_chunk_graph_cannot_take(tmp_path):
    res = to_onnx(small_model("s4d"), tmp_path / "c.onnx", chunk=4)
    stream = OnnxStreamer(res.path)
    with pytest.raises(ValueError, match=r"length must be a multiple of 4, got 6; stream the last 2 steps through a step graph"):
        stream.run(np.zeros((1, 6, 3)))
    with pytest.raises(ValueError, match=r"chunk graph of 4 steps per call: x_t must have shape \(batch=1, 4, d_input=3\), got \(1, 3\)"):
        stream.step(np.zeros((1, 3)))
    assert stream.step(np.ones((1, 4, 3))).shape == (1, 4, 4) and stream.steps == 4
    with pytest.raises(ValueError, match="the validation input's length must be a multiple of 4, got 10"):
        to_onnx(small_model("s4d"), tmp_path / "d.onnx", chunk=4, validation_input=torch.zeros(1, 10, 3))
    assert not (tmp_path / "d.onnx").exists()
    from lrnnx_zoo.export import export_folder
    with pytest.raises(ValueError, match=r"chunk must be a positive int \(steps per call of a chunk graph\), got True"):
        export_folder("forecast-sunspots-s4d", tmp_path / "e", chunk=True)
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("exporter,name", [(to_torchscript, "m.ts"), (to_torch_export, "m.pt2")])
def test_torch_formats_export_chunk_modules(exporter, name, tmp_path):
    res = exporter(small_model("s4d", "last"), tmp_path / name, chunk=5)
    assert res.validation.passed and res.validation.length == 260 and res.metadata["lrnnx_zoo.chunk"] == "5"


@pytest.mark.parametrize("declared", [True, False])
def test_a_third_party_layer_exports_as_a_chunk_graph(tmp_path, monkeypatch, declared):
    from plugin_fixtures import GOOD_PLUGIN, activate, make_distribution
    source = GOOD_PLUGIN.replace("{layer_name}", "tp_chunk")
    if not declared:    # a bare form (README: d_input, d_output optional) failed with an AttributeError
        bare = source.replace("class EmaStep(StepForm):", "class EmaStep(nn.Module):").replace(
            "self.state_size = self.d_input = self.d_output = a.shape[0]", "self.state_size = a.shape[0]")
        assert bare.count("self.state_size = a.shape[0]") == 1 and "EmaStep(nn.Module)" in bare
        source = bare
    root = make_distribution(tmp_path / "site", "tp-chunk", {"tp_chunk": source}, {"tp_chunk": "tp_chunk"})
    activate(root, monkeypatch)
    lrnnx_zoo.reload_plugins()
    try:
        res = to_onnx(small_model("tp_chunk", "mean"), tmp_path / "m.onnx", chunk=4)
        assert res.validation.passed
    finally:
        monkeypatch.undo()
        lrnnx_zoo.reload_plugins()


def test_a_long_stream_of_chunks_stays_within_float32_tolerance(tmp_path):
    # 4096 steps of the shipped forecaster in chunks of 32: the chunk's A^T is kept as hi + lo like
    # the step forms' poles, so the error does not grow with the stream
    res = to_onnx("forecast-sunspots-s4d", tmp_path / "f.onnx", chunk=32,
                  validation_input=torch.randn(1, 4096, 1, generator=torch.Generator().manual_seed(0)))
    assert res.validation.passed and res.validation.max_abs_error < 2e-5


# -- export folders, the CLI, and the card's snippets on a device without lrnnx_zoo ------------------
def test_export_command_writes_a_chunk_folder_and_reports_per_chunk_latency(tmp_path, capsys):
    from lrnnx_zoo.cli import main
    out = tmp_path / "f"
    assert main(["export", "forecast-sunspots-s4d", "--out", str(out), "--chunk", "32", "--latency-steps", "320",
                 "--validation-length", "100"]) == 0
    printed = capsys.readouterr().out
    assert "onnx chunk graph (32 steps per call)" in printed and "per-chunk latency: median" in printed
    assert "for 32 steps" in printed and "over 10 chunks" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["chunk"] == 32 and config["inputs"]["x"] == ["batch", 32, 1] and config["outputs"]["y"] == ["batch", 32, 1]
    assert config["validation"]["length"] == 128                       # 100 steps, lengthened to whole chunks
    assert config["latency"]["chunk"] == 32
    assert config["latency"]["per_step_us"] == pytest.approx(config["latency"]["median_us"] / 32)
    card = (out / "README.md").read_text()
    assert "# s4d chunk graph (onnx)" in card and "(x [batch, 32, 1], state [batch, 3072])" in card
    assert "--chunk 32" in card                                        # the command that remakes it
    with pytest.raises(SystemExit) as exc:
        main(["export", "forecast-sunspots-s4d", "--out", str(tmp_path / "g"), "--chunk", "0"])
    assert exc.value.code == 2 and not (tmp_path / "g").exists()
    assert "argument --chunk: expected a positive integer, got 0" in capsys.readouterr().err


def test_chunk_card_snippet_gives_the_models_forecast_on_the_device(tmp_path):
    from test_edge_deploy import FAST, card_snippet, model_forecast, on_device
    from lrnnx_zoo.export import export_folder
    folder = tmp_path / "sunspots"
    export_folder("forecast-sunspots-s4d", folder, format="onnx", chunk=16, **FAST)
    found = on_device(folder, card_snippet(folder, "onnxruntime as ort"), tmp_path / "out.npz")
    values = found["values"]                                            # (chunks, batch, 16, 1)
    assert values.shape == (3, 1, 16, 1)
    series = values.transpose(0, 2, 1, 3).reshape(48, 1, 1)             # (L, batch, 1) in time order
    std = lrnnx_zoo.from_pretrained("forecast-sunspots-s4d").checkpoint_info["dataset"]["normalisation"]["std"]
    np.testing.assert_allclose(found["forecast"][:, -1], model_forecast(series), atol=1e-4 * std)


def test_diagonal_channel_chunk_build_makes_no_dense_powers():
    """A diagonal per-channel system (S4D) built its chunk from dense (H, n, n) powers A @ A^k, O(H n^3)
    each (a 2-block d_model=256, N=256 S4D's chunk-32 TorchScript export took 89 s against 2 s without
    a chunk); its powers keep their two (H, n) parts now. Counted as matmul flops, not timed: one
    dense product is 2 H n^3; the old build made T of them (545 MFLOP here), the new one 32 kFLOP."""
    from torch.utils.flop_counter import FlopCounterMode
    H, n, T = 4, 128, 32
    form = lrnnx_zoo.create_layer("s4d", H, d_state=n).eval().step_form()
    with FlopCounterMode(display=False) as counter:
        chunk = chunk_form(form, T)
    assert isinstance(chunk, ChannelChunkForm) and chunk.rotation
    assert counter.get_total_flops() < 2 * H * n ** 3


_PROBE_PEAK = """
import torch
import lrnnx_zoo
from lrnnx_zoo.chunk_forms import channel_system
def hwm():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024
form = lrnnx_zoo.create_layer("s4d", 256, d_state=256).eval().step_form()
base = hwm()
A = channel_system(form)[0]
print(hwm() - base, A.numel() * A.element_size() / 2**20)
"""


def test_channel_system_probes_in_groups():
    """channel_system ran all n + 1 probes of the whole state through the form at once, so each of the
    form's passes over the state was (n + 1) x S floats: S4D d_model=256, N=256 peaked 1.16 GB for
    its 128 MiB A under the tuned allocator, 774 MiB (6x) under glibc's default (and rotation_parts
    copied almost all of A again). Now 266-290 MiB (2.1-2.3x A) in a fresh process; bound 4x A."""
    import subprocess
    import sys
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/status")
    done = subprocess.run([sys.executable, "-c", _PROBE_PEAK], check=True, capture_output=True, text=True)
    grew, a_mb = map(float, done.stdout.split())
    assert grew < 4 * a_mb, f"peak resident memory grew by {grew:.0f} MiB for a {a_mb:.0f} MiB A"
