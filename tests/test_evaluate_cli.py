"""``lrnnx-zoo evaluate``: a checkpoint's test metrics re-measured beside the ones it records."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import lrnnx_zoo

from lrnnx_zoo.cli import main as cli_main
from lrnnx_zoo.evaluate_cli import compare_metrics
from lrnnx_zoo.hub import shipped_checkpoints

pytest.importorskip("sklearn")  # the digits ship with scikit-learn


def test_a_shipped_checkpoint_reproduces_its_recorded_metrics(capsys):
    assert cli_main(["evaluate", "digits-s4d", "--check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_test"] == 360 and set(report["metrics"]) == {"test_accuracy", "test_loss"}
    for row in report["metrics"].values():
        # evaluate sums in float64 over the same split: the card's figures within RTOL/ATOL
        assert row["match"] and row["recorded"] == pytest.approx(row["measured"], rel=1e-3, abs=1e-4)


def test_a_metric_that_does_not_hold_is_a_mismatch_and_check_fails(tmp_path, capsys):
    folder = tmp_path / "copy of forecast"               # a space in the path, as users have
    shutil.copytree(shipped_checkpoints()["forecast-sunspots-s4d"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["metrics"]["test_mse"] *= 0.5                  # a card that claims twice the accuracy
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    assert cli_main(["evaluate", str(folder)]) == 0      # reported, not failed, without --check
    out, err = capsys.readouterr()
    mse = next(line for line in out.splitlines() if line.split()[0] == "test_mse")
    assert mse.endswith("MISMATCH") and "1 metric(s) differ" in err and "test_mse" in err
    assert cli_main(["evaluate", str(folder), "--check"]) == 1
    capsys.readouterr()


def test_a_card_that_claims_more_than_the_weights_do_fails_the_check(tmp_path, capsys):
    # --check compared config.json's metrics only: a card edited to claim more passed
    folder = tmp_path / "card claims"
    shutil.copytree(shipped_checkpoints()["forecast-sunspots-s4d"], folder)
    card = (folder / "README.md").read_text()
    (folder / "README.md").write_text(card.replace("value: 0.2015855946499877", "value: 0.1"))
    assert cli_main(["evaluate", str(folder), "--check", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)["metrics"]
    assert report["test_mse"]["match"] and not report["test_mse (card)"]["match"]
    assert report["test_mse (card)"]["recorded"] == 0.1
    assert cli_main(["evaluate", "forecast-sunspots-s4d", "--check"]) == 0   # a card agreeing with its config
    assert "(card)" not in capsys.readouterr().out                              # adds no rows


def test_a_checkpoint_without_a_recorded_split_is_refused_with_the_reason(tmp_path, capsys):
    import lrnnx_zoo
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer="s4d", d_input=1, d_output=2, d_model=8,
                                                          n_layers=1, layer_kwargs={"d_state": 4}))
    model.save_pretrained(tmp_path / "untrained")
    assert cli_main(["evaluate", str(tmp_path / "untrained")]) == 2
    err = capsys.readouterr().err
    # (it said "checkpoints written by `lrnnx-zoo train` have one", false for the first releases' train)
    assert "records no data spec" in err and "save_pretrained records one only from a dataset= dict holding it" in err
    assert "lrnnx_zoo.training.evaluate(model, data)" in err
    with pytest.raises(SystemExit) as exited:                  # argparse: usage error, status 2
        cli_main(["evaluate", "digits-s4d", "--batch-size", "0"])
    assert exited.value.code == 2 and "expected a positive integer, got 0" in capsys.readouterr().err


def test_a_dataset_recorded_as_a_name_or_not_fitting_the_model_is_reported_in_one_line(tmp_path, capsys):
    # save_pretrained(dataset="mnist") records a plain name: evaluate (and export --quantize int8)
    # failed with AttributeError: 'str' object has no attribute 'get'. A recorded split the model
    # cannot take (d_input 3 for 1-channel digits) ended in the forward's ValueError traceback.
    import lrnnx_zoo
    from lrnnx_zoo.training import checkpoint_data
    with pytest.raises(ValueError, match="records no data spec"):
        checkpoint_data({"dataset": "mnist"})
    cfg = dict(layer="s4d", d_output=10, d_model=8, n_layers=1, layer_kwargs={"d_state": 4}, pooling="mean")
    lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(d_input=1, **cfg)).save_pretrained(tmp_path / "named", dataset="mnist")
    assert cli_main(["evaluate", str(tmp_path / "named")]) == 2
    assert "records no data spec" in capsys.readouterr().err
    digits = {"name": "digits", "split": {"seed": 0, "n_train": 1437, "n_test": 360}}
    lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(d_input=3, **cfg)).save_pretrained(tmp_path / "wide", dataset=digits)
    assert cli_main(["evaluate", str(tmp_path / "wide")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lrnnx-zoo evaluate: ") and err.count("\n") == 1 and "d_input=3), got (" in err
    for name, changed in (("narrow", dict(d_output=5)), ("unpooled", dict(pooling=None))):   # outputs that do not fit
        lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(d_input=1, **{**cfg, **changed})).save_pretrained(
            tmp_path / name, dataset=digits)
        assert cli_main(["evaluate", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "one row of class scores per sequence, (256, classes >= 10)" in err, err


def test_compare_metrics_tolerance_and_unrecorded_metrics():
    rows = compare_metrics({"a": 0.5, "b": 1.0, "flag": True},
                           {"a": 0.5004, "b": 1.0012, "c": 3.0, "flag": 1.0, "nan": float("nan")})
    # an unrecorded metric counts as matching unless it is NaN or infinite (session 28: a diverged
    # model's NaN test_loss was recorded as null, and passed --check)
    assert [(k, ok) for k, _, _, ok in rows] == [("a", True), ("b", False), ("c", True), ("flag", True),
                                                 ("nan", False)]
    assert compare_metrics({"a": 0.5}, {"a": float("nan")})[0][3] is False
    assert compare_metrics({"a": None}, {"a": float("inf")})[0][3] is False
    for claim in (float("inf"), float("-inf"), float("nan")):          # inf matched everything
        assert compare_metrics({"a": claim}, {"a": 0.5})[0][3] is False


def test_a_checkpoint_whose_outputs_are_nan_fails_the_check(tmp_path, capsys):
    # Finite weights whose outputs overflow to NaN, its config recording the NaN loss as null (what a
    # diverged last step saved before session 28): `evaluate --check` exited 0.
    folder = tmp_path / "broken"
    shutil.copytree(shipped_checkpoints()["digits-s4d"], folder)
    model = lrnnx_zoo.from_pretrained(folder)
    with torch.no_grad():
        model.encoder.weight.fill_(1e30)
    assert torch.isnan(model(torch.rand(2, 64, 1))).all()
    info = model.checkpoint_info
    model.save_pretrained(folder, metrics={"test_accuracy": 0.1, "test_loss": None}, task=info["task"],
                          dataset=info["dataset"])
    assert cli_main(["evaluate", str(folder)]) == 0           # reported, not failed, without --check
    out, err = capsys.readouterr()
    loss = next(line for line in out.splitlines() if line.split()[0] == "test_loss")
    assert loss.endswith("NOT FINITE")
    assert "metric(s) measured NaN or infinite (the model's outputs are not finite): " in err and "test_loss" in err
    assert cli_main(["evaluate", str(folder), "--check"]) == 1
    capsys.readouterr()


@pytest.mark.parametrize("params, message", [
    ({"seed": 0, "n_tset": 360}, "DataSpec('digits') params ['n_tset'] are not known; expected keys among "
                                 "('seed', 'n_test', 'augment')"),
    ({"seed": 0, "n_test": "360"}, "DataSpec('digits') params['n_test'] must be an int >= 1, got '360' (str)"),
])
def test_a_damaged_recorded_data_spec_is_reported_in_one_line(tmp_path, capsys, params, message):
    # A misspelt or string-valued split parameter in config.json ended `lrnnx-zoo evaluate` with a
    # TypeError traceback from inside the data loader (Split.__init__() got an unexpected keyword
    # argument / '<' not supported between instances of 'int' and 'str').
    folder = tmp_path / "ckpt"
    shutil.copytree(shipped_checkpoints()["digits-s4d"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["dataset"]["spec"]["params"] = params
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    assert cli_main(["evaluate", str(folder)]) == 2
    assert capsys.readouterr().err == f"lrnnx-zoo evaluate: {message}\n"


def test_a_gpu_on_a_cpu_only_torch_is_refused_in_the_flags_words(capsys, monkeypatch):
    # the advice read "use device='cpu' or None", Python's words, on the command line
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli_main(["evaluate", "digits-lru", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "use --device cpu, or leave --device out" in err and "device='cpu'" not in err, err
