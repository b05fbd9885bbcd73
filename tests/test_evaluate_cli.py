"""``lrnnx-zoo evaluate``: a checkpoint's test metrics re-measured beside the ones it records."""

from __future__ import annotations

import json
import shutil

import pytest

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


def test_a_checkpoint_without_a_recorded_split_is_refused_with_the_reason(tmp_path, capsys):
    import lrnnx_zoo
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer="s4d", d_input=1, d_output=2, d_model=8,
                                                          n_layers=1, layer_kwargs={"d_state": 4}))
    model.save_pretrained(tmp_path / "untrained")
    assert cli_main(["evaluate", str(tmp_path / "untrained")]) == 2
    assert "records no data spec" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:                  # argparse: usage error, status 2
        cli_main(["evaluate", "digits-s4d", "--batch-size", "0"])
    assert exited.value.code == 2 and "expected a positive integer, got 0" in capsys.readouterr().err


def test_compare_metrics_tolerance_and_unrecorded_metrics():
    rows = compare_metrics({"a": 0.5, "b": 1.0, "flag": True},
                           {"a": 0.5004, "b": 1.0012, "c": 3.0, "flag": 1.0, "nan": float("nan")})
    assert [(k, ok) for k, _, _, ok in rows] == [("a", True), ("b", False), ("c", True), ("flag", True),
                                                 ("nan", True)]
    assert compare_metrics({"a": 0.5}, {"a": float("nan")})[0][3] is False
