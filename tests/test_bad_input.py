"""Bad input gets a clear error that says what was expected and what was given, and loses nothing.

Each test here was a defect found by feeding the public API adversarial input: the exception type,
the message, and the files left on disk (nothing valid overwritten, nothing partial left behind).
"""

from __future__ import annotations

import os
import re

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo.export import export_folder, to_onnx, to_torchscript


def small_model(layer: str = "s4d", pooling=None) -> lrnnx_zoo.SequenceModel:
    torch.manual_seed(0)
    cfg = lrnnx_zoo.ModelConfig(layer=layer, d_input=3, d_output=2, d_model=8, n_layers=1,
                                layer_kwargs={"d_state": 4}, pooling=pooling)
    return lrnnx_zoo.SequenceModel(cfg).eval()


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# -- export output locations ---------------------------------------------------------------------
def test_export_folder_refuses_to_overwrite_a_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    small_model().save_pretrained(ckpt)
    before = snapshot(ckpt)
    with pytest.raises(FileExistsError, match=r"holds an lrnnx-zoo checkpoint.*config\.json, README\.md"):
        export_folder(ckpt, ckpt, format="torchscript", latency_steps=0)
    assert snapshot(ckpt) == before
    lrnnx_zoo.from_pretrained(ckpt)          # still a loadable checkpoint


def test_export_folder_overwrites_an_earlier_export(tmp_path):
    out = tmp_path / "out"
    export_folder(small_model(), out, format="torchscript", latency_steps=0)
    export_folder(small_model(), out, format="torchscript", latency_steps=0)   # re-export is fine


def test_export_folder_refuses_foreign_files(tmp_path):
    (tmp_path / "README.md").write_text("my project\n")
    with pytest.raises(FileExistsError, match="did not write; exporting there would overwrite README.md"):
        export_folder(small_model(), tmp_path, format="torchscript", latency_steps=0)
    assert (tmp_path / "README.md").read_text() == "my project\n"


def test_export_paths_that_are_files_or_folders_are_named(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(NotADirectoryError, match=r"out_dir .*afile is a file; expected a folder"):
        export_folder(small_model(), afile, latency_steps=0)
    with pytest.raises(NotADirectoryError, match=r"afile is a file, expected a folder"):
        export_folder(small_model(), afile / "sub", latency_steps=0)
    with pytest.raises(NotADirectoryError, match=r"afile is a file, expected a folder"):
        to_torchscript(small_model(), afile / "m.ts")
    with pytest.raises(IsADirectoryError, match=r"is a folder; expected a file path"):
        to_torchscript(small_model(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_failed_export_leaves_no_folders_behind(tmp_path):
    bidirectional = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(
        layer="s4", d_input=3, d_output=2, d_model=8, n_layers=1,
        layer_kwargs={"d_state": 4, "bidirectional": True}))
    with pytest.raises(lrnnx_zoo.export.ExportError):
        export_folder(bidirectional, tmp_path / "a" / "b", latency_steps=0)
    with pytest.raises(ValueError, match="batch must be None"):
        to_onnx(small_model(), tmp_path / "c" / "m.onnx", batch=-1)
    with pytest.raises(lrnnx_zoo.export.ExportError):
        to_torchscript(bidirectional, tmp_path / "d" / "m.ts")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("steps", [-5, "5", 2.5, True])
def test_export_folder_latency_steps_is_checked(tmp_path, steps):
    with pytest.raises(ValueError, match=r"latency_steps must be an int >= 0"):
        export_folder(small_model(), tmp_path / "out", latency_steps=steps)
    assert not (tmp_path / "out").exists()


def test_cli_export_into_a_file_is_an_error_not_a_traceback(tmp_path, capsys):
    from lrnnx_zoo.cli import main
    ckpt = tmp_path / "ckpt"
    small_model().save_pretrained(ckpt)
    (tmp_path / "afile").write_text("x")
    assert main(["export", str(ckpt), "--out", str(tmp_path / "afile"), "--latency-steps", "0"]) == 2
    assert "afile is a file" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--out", str(ckpt), "--latency-steps", "0"]) == 2
    assert "holds an lrnnx-zoo checkpoint" in capsys.readouterr().err


# -- layers: step, allocate_inference_cache, forward ------------------------------------------------
@pytest.fixture(params=lrnnx_zoo.list_layers())
def layer(request):
    torch.manual_seed(0)
    kw = {"d_state": 4} if request.param != "fftconv" else {}
    return lrnnx_zoo.create_layer(request.param, 8, **kw).eval()


def test_step_needs_the_layers_cache(layer):
    name = type(layer).__name__
    for cache in ({}, None, {"lrnn_state": torch.zeros(2, 4)}):
        with pytest.raises(ValueError, match=rf"{name}.step needs the cache that {name}.allocate_inference_cache"):
            layer.step(torch.randn(2, 8), cache)


def test_step_checks_the_input_type_and_dtype(layer):
    name = type(layer).__name__
    cache = layer.allocate_inference_cache(2)
    with pytest.raises(TypeError, match=rf"{name}.step expects a torch.Tensor of shape \(batch=2, d_model=8\), got list"):
        layer.step([[0.0] * 8] * 2, cache)
    with pytest.raises(TypeError, match=r"expects a floating-point input .* got torch.int64"):
        layer.step(torch.ones(2, 8, dtype=torch.long), cache)       # was cast silently by some step forms
    with pytest.raises(TypeError, match=r"cache holds torch.float32 state on cpu, got x of torch.float64"):
        layer.step(torch.randn(2, 8, dtype=torch.float64), cache)   # LRU: matmul error; others: promoted
    cache64 = layer.allocate_inference_cache(2, dtype=torch.float64)
    assert layer.step(torch.randn(2, 8, dtype=torch.float64), cache64)[0].dtype == torch.float64


def test_step_checks_the_caches_state_shape(layer):
    # A cache whose state was replaced by one of the wrong size failed inside the step form
    # ("mat1 and mat2 shapes cannot be multiplied", "shape '[-1, 2, 4, 8]' is invalid").
    name = type(layer).__name__
    cache = layer.allocate_inference_cache(2)
    size = cache["lrnn_state"].shape[1]
    for bad in (torch.zeros(2, size + 1), torch.zeros(2 * size), torch.zeros(2, 1, size)):
        cache["lrnn_state"] = bad
        with pytest.raises(ValueError, match=rf"{name}.step: the cache's 'lrnn_state' must have shape "
                                             rf"\(batch, state_size={size}\).*got {re.escape(str(tuple(bad.shape)))}"):
            layer.step(torch.randn(2, 8), cache)


@pytest.mark.parametrize("batch_size", [0, -1, "2", 2.0, True])
def test_allocate_inference_cache_checks_batch_size(layer, batch_size):
    with pytest.raises(ValueError, match=rf"allocate_inference_cache needs batch_size to be an integer >= 1, "
                                         rf"got {batch_size!r}"):
        layer.allocate_inference_cache(batch_size)


def test_allocate_inference_cache_checks_dtype(layer):
    with pytest.raises(TypeError, match=r"needs dtype to be a floating torch.dtype .* got torch.int64"):
        layer.allocate_inference_cache(2, dtype=torch.long)


def test_layer_forward_names_a_non_tensor_input(layer):
    with pytest.raises(TypeError, match=r"expects a torch.Tensor of shape \(B, L, 8\), got list"):
        layer(torch.randn(2, 5, 8).tolist())                        # was AttributeError: no attribute 'dtype'


# -- SequenceModel ---------------------------------------------------------------------------------
def test_sequence_model_names_a_non_tensor_input():
    model = small_model()
    with pytest.raises(TypeError, match=r"SequenceModel expects a torch.Tensor .* got ndarray"):
        model(torch.randn(2, 5, 3).numpy())
    with pytest.raises(TypeError, match=r"SequenceModel.step expects a torch.Tensor .* got list"):
        model.step([[0.0] * 3] * 2, model.allocate_inference_cache(2))


def test_sequence_model_step_names_its_own_batch_and_width():
    # A batch other than the cache's was refused by the first layer, naming its (batch, d_model=..)
    # and a tensor the caller never passed: "S4D.step expects x of shape (batch=2, d_model=8), got (3, 8)".
    model = small_model()
    cache = model.allocate_inference_cache(2)
    with pytest.raises(ValueError, match=r"SequenceModel.step expects x of shape \(batch=2, d_input=3\), the batch "
                                         r"size of its cache, got \(3, 3\); call allocate_inference_cache\(3\)"):
        model.step(torch.randn(3, 3), cache)
    assert model.step(torch.randn(2, 3), cache)[0].shape[0] == 2


def test_sequence_model_checks_lengths_before_using_them():
    with pytest.raises(ValueError, match=r"lengths must have shape \(batch,\)=\(2,\), got \(3,\)"):
        small_model()(torch.randn(2, 5, 3), lengths=torch.tensor([1, 2, 3]))   # was a broadcast RuntimeError


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_pooled_model_refuses_empty_sequences(pooling):
    model = small_model(pooling=pooling)
    with pytest.raises(ValueError, match=rf"pooling='{pooling}' needs at least one valid step per sequence, "
                                         r"got x of length 0"):
        model(torch.randn(2, 0, 3))               # last: IndexError; mean: NaN logits
    with pytest.raises(ValueError, match=r"got x of length 5 and lengths \[0, 2\]"):
        model(torch.randn(2, 5, 3), lengths=torch.tensor([0, 2]))    # the decoder's bias, or step 0's output
    assert model(torch.randn(0, 5, 3)).shape == (0, 2)               # an empty batch is fine
    assert small_model()(torch.randn(2, 0, 3)).shape == (2, 0, 2)    # and so is L=0 without pooling


# -- export validation and the ONNX streamer ---------------------------------------------------------
@pytest.mark.parametrize("tolerance", [-1.0, float("nan"), float("inf"), "1e-4"])
def test_validation_tolerance_is_checked(tmp_path, tolerance):
    with pytest.raises(ValueError, match=r"tolerance must be a finite number >= 0"):
        to_torchscript(small_model(), tmp_path / "m.ts", tolerance=tolerance)   # was "graph disagrees"
    assert list(tmp_path.iterdir()) == []


def test_non_finite_validation_input_is_named(tmp_path):
    x = torch.randn(2, 5, 3)
    x[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"validation input holds 1 NaN or infinite values"):
        to_torchscript(small_model(), tmp_path / "m.ts", validation_input=x)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def onnx_graph(tmp_path_factory):
    path = tmp_path_factory.mktemp("graph") / "m.onnx"
    to_onnx(small_model(), path, exporter="legacy")
    return path


def with_metadata(src, dst, key, value):
    import onnx
    proto = onnx.load(str(src))
    for prop in proto.metadata_props:
        if prop.key == f"lrnnx_zoo.{key}":
            prop.value = value
    onnx.save(proto, str(dst))
    return dst


@pytest.mark.parametrize("key,value,message", [
    ("state_size", "abc", r"metadata lrnnx_zoo.state_size must be an int >= 0, got 'abc'"),
    ("state_size", "7", r"metadata lrnnx_zoo.state_size=7 disagrees with the graph's input 'state' of width \d+"),
    ("d_input", "5", r"metadata lrnnx_zoo.d_input=5 disagrees with the graph's input 'x' of width 3"),
    ("state_layout", "{oops", r"metadata lrnnx_zoo.state_layout must be JSON \[\[name, offset, size\], \.\.\.\]"),
])
def test_streamer_names_broken_metadata(onnx_graph, tmp_path, key, value, message):
    from lrnnx_zoo.export import OnnxStreamer
    with pytest.raises(ValueError, match=message):
        OnnxStreamer(with_metadata(onnx_graph, tmp_path / "bad.onnx", key, value))


@pytest.mark.parametrize("batch", [True, 0, 2.0, None])
def test_streamer_reset_refuses_a_bad_batch_and_stays_usable(onnx_graph, batch):
    import numpy as np
    from lrnnx_zoo.export import OnnxStreamer
    streamer = OnnxStreamer(onnx_graph)
    with pytest.raises(ValueError, match=rf"batch must be a positive int, got {batch!r}"):
        streamer.reset(batch)           # reset(True) left the streamer half-rebound: every later call failed
    assert streamer.batch == 1 and streamer.run(np.zeros((1, 4, 3), np.float32)).shape == (1, 4, 2)
    streamer.reset(np.int64(2))
    assert streamer.batch == 2


def test_streamer_takes_bfloat16_tensors(onnx_graph):
    from lrnnx_zoo.export import OnnxStreamer
    streamer = OnnxStreamer(onnx_graph)
    x = torch.randn(1, 3)
    y = streamer.step(x.bfloat16())     # was TypeError: Got unsupported ScalarType BFloat16
    streamer.reset(1)
    assert y.shape == (1, 2) and abs(y - streamer.step(x.bfloat16().float())).max() == 0


# -- checkpoints -------------------------------------------------------------------------------------
def test_weights_path_that_is_a_folder_is_named(tmp_path):
    small_model().save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    (tmp_path / "ckpt" / "model.safetensors").mkdir()
    with pytest.raises(lrnnx_zoo.CheckpointError, match=r"model.safetensors is a folder, expected a safetensors file"):
        lrnnx_zoo.from_pretrained(tmp_path / "ckpt")


def test_nan_and_infinite_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    small_model().save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    # copies: safetensors 0.4's tensors map the file, which save_file below rewrites in place
    good = {k: v.clone() for k, v in load_file(str(path)).items()}
    bad = dict(good, **{"encoder.weight": good["encoder.weight"].clone().fill_(float("nan"))})
    save_file(bad, str(path))
    with pytest.raises(lrnnx_zoo.CheckpointError, match=r"holds NaN or infinite weights in encoder.weight"):
        lrnnx_zoo.from_pretrained(tmp_path / "ckpt")
    # An infinite parameter loaded, and the model answered NaN to everything (an audit); buffers may
    # still hold infinities (a plugin's -inf mask), and a negative running variance is refused too
    save_file(dict(good, **{"encoder.bias": torch.full_like(good["encoder.bias"], -float("inf"))}), str(path))
    with pytest.raises(lrnnx_zoo.CheckpointError, match=r"holds NaN or infinite weights in encoder.bias"):
        lrnnx_zoo.from_pretrained(tmp_path / "ckpt")
    torch.manual_seed(0)
    lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer="s4d", d_input=3, d_output=2, d_model=8, n_layers=1, norm="batch",
                                                  layer_kwargs={"d_state": 4})).save_pretrained(tmp_path / "bn")
    path = tmp_path / "bn" / "model.safetensors"
    good = {k: v.clone() for k, v in load_file(str(path)).items()}
    save_file(dict(good, **{"norm.running_var": -good["norm.running_var"]}), str(path))
    with pytest.raises(lrnnx_zoo.CheckpointError, match=r"holds negative running variances in norm.running_var"):
        lrnnx_zoo.from_pretrained(tmp_path / "bn")


def test_config_family_that_contradicts_the_layer_is_refused(tmp_path):
    import json
    small_model("s4d").save_pretrained(tmp_path / "ckpt")
    cfg_path = tmp_path / "ckpt" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["family"] == "s4d"
    cfg["family"] = "lru"                       # loaded as an S4D before, without a word
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(lrnnx_zoo.CheckpointError, match=r"'family' is 'lru' but model.layer is 's4d'"):
        lrnnx_zoo.from_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize("fmt", ["torchscript", "torch-export"])
def test_a_failed_save_leaves_no_temporary_file(tmp_path, monkeypatch, fmt):
    # The hidden temporary was removed only after validation: a save that failed half-way left it.
    from lrnnx_zoo.export import to_torch_export

    def half_written(obj, f, *args, **kwargs):
        if hasattr(f, "write"):                   # saved through an open file (an archive's root name)
            f.write(b"partial")
        else:
            with open(f, "wb") as fh:
                fh.write(b"partial")
        raise OSError("disk full")
    target = "torch.jit.save" if fmt == "torchscript" else "torch.export.save"
    monkeypatch.setattr(target, half_written)
    export = to_torchscript if fmt == "torchscript" else to_torch_export
    with pytest.raises(OSError, match="disk full"):
        export(small_model(), tmp_path / "step.graph")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("what", ["model", "layer", "FFTConvS4", "S4"])
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torch_jit_of_the_convolution_mode_says_what_to_use_instead(what, how):
    # torch.jit.script failed on the source ("Unknown type annotation: 'str'"), torch.jit.trace deep
    # inside a kernel ("L must be a non-negative int, got tensor(16)"): neither said that TorchScript
    # takes the step graph (to_torchscript) and torch.export the whole-sequence forward.
    from lrnnx_zoo.convolution import FFTConvS4
    from lrnnx_zoo.plugins.s4 import S4
    torch.manual_seed(0)
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer="s4d", d_input=2, d_output=3, d_model=8,
                                                          n_layers=1, layer_kwargs={"d_state": 4})).eval()
    module, x = {"model": (model, torch.randn(1, 16, 2)), "layer": (model.blocks[0].layer, torch.randn(1, 16, 8)),
                 "FFTConvS4": (FFTConvS4(8, d_state=4), torch.randn(1, 8, 16)),
                 "S4": (S4(8, d_state=4), torch.randn(1, 8, 16))}[what]
    with pytest.raises(TypeError, match=r"torch.jit cannot compile \w+'s convolution mode.*"
                                        r"lrnnx_zoo.export.to_torchscript.*torch.export.export"):
        torch.jit.script(module) if how == "script" else torch.jit.trace(module, x)


@pytest.mark.parametrize("what", ["model", "layer"])
def test_torch_onnx_export_of_the_convolution_mode_points_to_the_step_graph(what, tmp_path):
    # torch.onnx.export(model, dynamo=False) (the TorchScript-based exporter, opsets <= 17) was told that
    # "torch.jit cannot compile" the model and to use to_torchscript: not what an ONNX user needs.
    # (The dynamo exporter retries in strict mode, where the check cannot see the export, and fails
    # converting the FFTs: torch's own ConversionError.)
    import warnings
    torch.manual_seed(0)
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer="s4d", d_input=2, d_output=3, d_model=8,
                                                          n_layers=1, layer_kwargs={"d_state": 4})).eval()
    module, x = (model, torch.randn(1, 16, 2)) if what == "model" else (model.blocks[0].layer, torch.randn(1, 16, 8))
    with warnings.catch_warnings(), pytest.raises(TypeError, match=r"torch.onnx.export cannot convert \w+'s "
                                                                   r"convolution mode.*lrnnx_zoo.export.to_onnx"):
        warnings.simplefilter("ignore")             # the legacy exporter's deprecation warning
        torch.onnx.export(module, (x,), str(tmp_path / "m.onnx"), dynamo=False, opset_version=17)


@pytest.mark.parametrize("kind", ["nested", "sparse", "masked"])
@pytest.mark.parametrize("where", ["model", "layer"])
def test_non_dense_inputs_are_refused_with_the_padded_alternative(kind, where):
    # A nested tensor (the natural try for sequences of several lengths), a sparse or a masked one
    # failed deep inside ("NestedTensorImpl doesn't support sizes", "reshape is not implemented for
    # sparse tensors", "unsupported operand type(s) for @"; global-modes audit).
    import warnings
    torch.manual_seed(0)
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer="s4d", d_input=4, d_output=3, d_model=4,
                                                          n_layers=1, layer_kwargs={"d_state": 4}))
    module = model if where == "model" else model.blocks[0].layer
    dense = torch.randn(2, 6, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # torch's prototype warnings for nested and masked tensors
        x = {"nested": lambda: torch.nested.nested_tensor([dense[0], dense[1, :3]]),
             "sparse": lambda: dense.to_sparse(),
             "masked": lambda: torch.masked.masked_tensor(dense, torch.ones_like(dense, dtype=torch.bool))}[kind]()
        with pytest.raises(TypeError, match=r"expects a dense tensor \(torch.strided\), got a .* pass lengths="):
            module(x)


def test_a_default_device_other_than_the_datas_leaves_cpu_data_on_the_cpu():
    # With torch.set_default_device(...) (here "meta", standing in for "cuda"), LRU's scan built an
    # index on that device and the lengths check moved a CPU lengths tensor there: "Cannot copy out of
    # meta tensor" (global-modes audit).
    torch.manual_seed(0)
    layers = [lrnnx_zoo.create_layer(name, 4, d_state=4) for name in ("lru", "s4d")]
    x, lengths = torch.randn(2, 80, 4), torch.tensor([80, 50])
    expected = [layer(x, lengths=lengths) for layer in layers]
    torch.set_default_device("meta")
    try:
        got = [layer(x, lengths=lengths) for layer in layers]
    finally:
        torch.set_default_device(None)
    for g, e in zip(got, expected):
        assert g.device.type == "cpu" and torch.equal(g, e)


@pytest.mark.parametrize("name, kw", [("lru", {}), ("s4d", {}), ("s4", {}), ("fftconv", {"channels": 2}),
                                      ("fftconv", {"kernel_type": "lru"})])
@pytest.mark.parametrize("default", [torch.float16, torch.bfloat16])
def test_layers_built_under_a_half_default_dtype_hold_float32_parameters(name, kw, default):
    # parameter_dtype() says layers make their parameters in float32 when the default dtype is half;
    # LRU's B, C and D, every D, S4D's C and fftconv's mix followed the default, so an LRU trained in
    # float16 unnoticed (its first parameter, checked, was float32) or failed in torch.complex
    # (global-modes audit).
    before = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        torch.manual_seed(0)
        layer = lrnnx_zoo.create_layer(name, 8, d_state=4, **kw)
    finally:
        torch.set_default_dtype(before)
    assert {p.dtype for p in layer.parameters()} == {torch.float32}
    assert torch.isfinite(layer(torch.randn(1, 16, 8))).all()


def test_paths_that_cannot_be_looked_up_are_one_line_errors(tmp_path, monkeypatch, capsys):
    # Session 28 (a file-handling fuzzer): a name over 255 bytes raised "OSError: File name too long"
    # from Path.is_file() (info, evaluate, train --out), and a symlink loop a RuntimeError from
    # Path.resolve() (train --out, export --out, save_pretrained) or FileExistsError (to_onnx).
    from lrnnx_zoo.cli import main as cli_main
    from lrnnx_zoo.export import to_onnx
    from lrnnx_zoo.hub import CheckpointError
    monkeypatch.chdir(tmp_path)
    os.symlink("loop1", "loop2")
    os.symlink("loop2", "loop1")
    long = "a" * 256
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer="s4d", d_input=1, d_output=1, d_model=4, n_layers=1,
                                                          layer_kwargs={"d_state": 2}))
    too_long = r"the path cannot be looked up, a name in it is longer than the file system allows"
    looping = r"the path cannot be looked up, it goes round a loop of symbolic links"
    with pytest.raises(CheckpointError, match=rf"no checkpoint 'a{{60}}\.\.\.\(256 characters\)': {too_long}"):
        lrnnx_zoo.from_pretrained(long)
    with pytest.raises(CheckpointError, match=rf"no checkpoint 'loop1': {looping}"):
        lrnnx_zoo.from_pretrained("loop1")
    for target, reason in ((long, too_long), ("loop1", looping)):
        with pytest.raises(CheckpointError, match=rf"cannot save into save_directory .*: {reason}"):
            model.save_pretrained(target)
    with pytest.raises(ValueError, match=rf"cannot write path loop1/m.onnx: {looping}"):
        to_onnx(model, "loop1/m.onnx")
    for argv in (["info", long], ["evaluate", long], ["train", "digits-tiny", "--out", "loop1"],
                 ["train", "digits-tiny", "--out", long], ["export", "digits-s4d", "--out", "loop1"]):
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "the path cannot be looked up" in err, err
    assert sorted(os.listdir(tmp_path)) == ["loop1", "loop2"]


def test_a_save_its_loader_would_refuse_is_refused_and_the_old_folder_kept(tmp_path):
    # save_pretrained(task="x" * 17 MB) replaced a good checkpoint with one whose config.json
    # from_pretrained refuses (over its 16 MB bound).
    folder = tmp_path / "ckpt"
    model = small_model()
    model.save_pretrained(folder, task="forecasting")
    before = snapshot(folder)
    with pytest.raises(ValueError, match=r"this checkpoint's config.json would be 17\.\d MB, more than the 17 MB "
                                         r"from_pretrained reads; its largest fields: task \(17\.\d MB\)"):
        model.save_pretrained(folder, task="x" * (17 << 20))
    assert snapshot(folder) == before and lrnnx_zoo.from_pretrained(folder).checkpoint_info["task"] == "forecasting"
