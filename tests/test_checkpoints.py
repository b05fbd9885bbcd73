"""Every shipped checkpoint reaches the metric its model card states, recomputed here on the
split its config records, and its ONNX step graph streams to the same score.

Tolerances: the card's metric was computed by the same evaluation code at training time; float32
differences since then (e.g. a re-ordered FFT) may flip a prediction that sat on a decision
boundary, so accuracy may differ by one test sample (1/360) and forecast errors by 1% relative.
"""

from __future__ import annotations

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo.training import checkpoint_data, evaluate, score

MODELS = lrnnx_zoo.list_models()


def test_there_is_a_checkpoint_of_every_builtin_family_and_a_streaming_forecaster():
    families = {lrnnx_zoo.from_pretrained(m).checkpoint_info["family"] for m in MODELS}
    assert {"lru", "s4d"} <= families
    assert any(lrnnx_zoo.from_pretrained(m).config.pooling is None for m in MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_shipped_card_is_what_save_pretrained_writes_for_its_config(name):
    # a card edited by hand, or left behind when the card format changed, would disagree with its config
    import json
    from lrnnx_zoo.hub import resolve_checkpoint
    from lrnnx_zoo.hub_card import build_card
    folder, _ = resolve_checkpoint(name)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    n_parameters = sum(p.numel() for p in lrnnx_zoo.from_pretrained(name).parameters())
    assert (folder / "README.md").read_text(encoding="utf-8") == str(build_card(config, name, n_parameters))


@pytest.mark.parametrize("name", MODELS)
def test_card_metric_recomputed_on_the_stated_split(name):
    model = lrnnx_zoo.from_pretrained(name)
    info = model.checkpoint_info
    data = checkpoint_data(info)
    got = evaluate(model, data)
    card = info["metrics"]
    if data.task == "sequence-classification":
        assert len(data.y_test) == info["dataset"]["split"]["n_test"]
        assert abs(got["test_accuracy"] - card["test_accuracy"]) <= 1 / len(data.y_test) + 1e-6
        assert got["test_accuracy"] >= 0.95
    else:
        assert got["test_mse"] == pytest.approx(card["test_mse"], rel=0.01)
        assert got["naive_test_mse"] == pytest.approx(card["naive_test_mse"], rel=1e-6)
        assert got["test_mse"] < 0.9 * got["naive_test_mse"], "clearly better than the last-value forecast"


@pytest.mark.parametrize("name", MODELS)
def test_onnx_step_graph_scores_like_pytorch(name, tmp_path):
    from lrnnx_zoo.export import OnnxStreamer, to_onnx
    model = lrnnx_zoo.from_pretrained(name)
    data = checkpoint_data(model.checkpoint_info)
    result = to_onnx(name, tmp_path / "model.onnx")
    assert result.validation.max_abs_error < 1e-4
    streamed = torch.from_numpy(OnnxStreamer(result.path).run(data.x_test.numpy()))
    if data.task == "sequence-classification":
        streamed = streamed[:, -1]          # the last step carries the whole sequence's logits
    with torch.no_grad():
        reference = model(data.x_test)
    assert (streamed - reference).abs().max().item() < 1e-4
    ours, theirs = score(streamed, data), evaluate(model, data)
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-4)


@pytest.mark.parametrize("fmt", ["torchscript", "torch-export"])
@pytest.mark.parametrize("name", MODELS)
def test_torchscript_and_torch_export_of_every_checkpoint_validate(name, fmt, tmp_path):
    import warnings
    from lrnnx_zoo.export import to_torch_export, to_torchscript
    exporter = {"torchscript": to_torchscript, "torch-export": to_torch_export}[fmt]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # torch.jit warns since torch 2.11
        result = exporter(name, tmp_path / f"step.{fmt}")
    assert result.validation.max_abs_error < 1e-4     # checked by streaming the saved artifact


def test_main_job_runs_end_to_end(capsys):
    # README's first command: load, evaluate, export, stream through ONNX Runtime, parity, latency
    from lrnnx_zoo.demo import main
    assert main(["forecast-sunspots-s4d", "--steps", "50"]) == 0
    out = capsys.readouterr().out
    assert "parity" in out and "us/step ONNX Runtime" in out and "result     : OK" in out


def test_main_job_writes_its_graphs_into_out_whatever_path_names_the_checkpoint(tmp_path, capsys):
    # The name was joined to --out: a folder given by an absolute path (or through "..") put its
    # .onnx files next to the checkpoint, outside --out, where nothing removed them.
    import shutil
    from lrnnx_zoo.demo import main
    from lrnnx_zoo.hub import resolve_checkpoint
    shutil.copytree(resolve_checkpoint("forecast-sunspots-s4d")[0], tmp_path / "ckpts" / "sun")
    (tmp_path / "ckpts" / "sub").mkdir()
    name, out = str(tmp_path / "ckpts" / "sub" / ".." / "sun"), tmp_path / "out"
    assert main([name, "--out", str(out), "--steps", "1"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["sun-chunk32.onnx", "sun.onnx"]
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["sub", "sun"]


def test_main_job_gives_two_checkpoints_of_one_folder_name_graphs_of_their_own(tmp_path, monkeypatch, capsys):
    # Each checkpoint's graphs are named after its folder's own name: runs/exp1/final and runs/exp2/final
    # both wrote out/final.onnx, the second over the first (whose "exported" line then named the other
    # model's graph); the relative names kept them apart before (out/exp1/final.onnx).
    import shutil
    from lrnnx_zoo import demo, export
    from lrnnx_zoo.hub import resolve_checkpoint
    for run in ("exp1", "exp2"):
        shutil.copytree(resolve_checkpoint("forecast-sunspots-s4d")[0], tmp_path / "runs" / run / "final")
    written = []

    def to_onnx(model, path, **kwargs):     # where the graph goes; the rest of the demo is not needed
        written.append(path)
        raise ValueError("stopped after naming the graph")
    monkeypatch.setattr(export, "to_onnx", to_onnx)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert demo.main(["runs/exp1/final", "runs/exp2/final", "--out", str(out), "--steps", "1"]) == 2
    assert capsys.readouterr().err.count("stopped after naming the graph") == 2
    assert len(set(written)) == 2 and all(path.parent == out for path in written), written


def test_main_job_reports_a_users_mistake_without_a_traceback(tmp_path, capsys):
    # A mistyped path, or a checkpoint of the user's own that records no evaluation split, used to
    # end the demo in a traceback; it is an error line naming the checkpoint, and the others still run.
    from lrnnx_zoo import ModelConfig, SequenceModel
    from lrnnx_zoo.demo import main
    SequenceModel(ModelConfig(layer="s4d", d_input=1, d_output=1, d_model=4, n_layers=1,
                              layer_kwargs={"d_state": 2})).save_pretrained(tmp_path / "mine")
    missing = str(tmp_path / "no-such-folder")
    assert main([missing, str(tmp_path / "mine")]) == 2
    err = capsys.readouterr().err
    assert f"error: {missing}: no checkpoint" in err
    assert "records no data spec" in err
    with pytest.raises(SystemExit):
        main(["--steps", "0"])           # the latency median of zero steps is undefined
    assert "--steps: expected a positive integer, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("name", MODELS)
def test_card_command_sets_the_thread_count_its_bytes_need(name):
    # The card's command, typed on a 2-core machine, trained other bytes than the shipped weights
    # (a 1-thread run's): the card now sets the run's thread count.
    from lrnnx_zoo.hub import resolve_checkpoint
    folder, _ = resolve_checkpoint(name)
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert f"OMP_NUM_THREADS=1 lrnnx-zoo train {name} " in card
