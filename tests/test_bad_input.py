"""Bad input gets a clear error that says what was expected and what was given, and loses nothing.

Each test here was a defect found by feeding the public API adversarial input: the exception type,
the message, and the files left on disk (nothing valid overwritten, nothing partial left behind).
"""

from __future__ import annotations

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
