"""The ``lrnnx-zoo`` entry point itself: help text and behaviour in a shell pipeline (the
subcommands are tested next to the code they drive)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import lrnnx_zoo
from lrnnx_zoo.cli import build_parser, main


def test_help_describes_the_tool_not_its_source_layout():
    text = " ".join(build_parser().format_help().split())      # argparse wraps lines
    assert "export them as streaming step graphs" in text
    assert "SUBCOMMAND_MODULES" not in text and "add_commands" not in text


def test_a_closed_pipe_ends_quietly():
    # `lrnnx-zoo info NAME | head -2` printed a BrokenPipeError traceback once head had exited.
    proc = subprocess.Popen([sys.executable, "-m", "lrnnx_zoo.cli", "info", "digits-lru"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()                           # the reader leaves before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_export_help_says_where_latency_is_measured_and_the_default_format():
    # It said "at batch 1" only, but a graph fixed to --batch N is timed at batch N.
    export = build_parser()._subparsers._group_actions[0].choices["export"]
    text = " ".join(export.format_help().split())
    assert "single steps at batch 1, or at the fixed --batch" in text
    assert "graph format (default: onnx)" in text


# -- errors name the flag the user typed ------------------------------------------------------------
# Python names the library's own messages use; a user of the command line typed flags instead.
PYTHON_NAMES = re.compile(r"\b(out_dir|batch=|opset=|quantize=|format=|push_to_hub|latency_steps|revision=)")


def export_error(argv, capsys) -> str:
    """The one line `lrnnx-zoo export ARGV` prints when it refuses ARGV (exit status 2)."""
    try:
        code = main(["export", *argv])
    except SystemExit as exc:                    # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2, err
    return err


@pytest.mark.parametrize("flags, expected", [
    (["--batch", "0"], "argument --batch: expected a positive integer, got 0"),
    (["--batch", "-3"], "argument --batch: expected a positive integer, got -3"),
    (["--opset", "9"], "argument --opset: expected an integer in [11, 25], got 9"),
    (["--opset", "26"], "argument --opset: expected an integer in [11, 25], got 26"),
    (["--latency-steps", "-1"], "argument --latency-steps: expected an integer >= 0 (0 skips the measurement)"),
    (["--format", "torchscript", "--quantize", "int8"], "--quantize int8 applies to ONNX graphs only; drop --quantize or use --format onnx"),
    (["--format", "torch-export", "--opset", "17"], "--opset 17 applies to ONNX graphs only"),
    (["--format", "torchscript", "--batch", "2"], "a traced TorchScript step accepts any batch; drop --batch"),
    (["--push-to-hub", "bad//repo"], "--push-to-hub must be a Hub repo id"),
    (["--revision", "v1"], "--revision applies to Hub repos, but 'digits-lru' is a shipped checkpoint"),
])
def test_export_usage_errors_name_the_flags(flags, expected, tmp_path, capsys, monkeypatch):
    # `--batch 0` said "batch must be None (dynamic) or a positive int", `--format torchscript
    # --quantize int8` said "quantize='int8' ... use format='onnx'": Python's names, not the flags.
    import lrnnx_zoo.export.folder as folder
    monkeypatch.setattr(folder, "load_source", lambda *a, **k: pytest.fail("loaded the model before checking flags"))
    err = export_error(["digits-lru", "--out", str(tmp_path / "out"), *flags], capsys)
    assert expected in err and not PYTHON_NAMES.search(err), err
    assert not (tmp_path / "out").exists()


def test_export_out_errors_name_the_flag(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    checkpoint = tmp_path / "checkpoint"
    lrnnx_zoo.from_pretrained("digits-lru").save_pretrained(checkpoint)
    for out, expected in ((a_file, f"lrnnx-zoo export: --out {a_file} is a file; expected a folder"),
                          (a_file / "sub", f"cannot write --out {a_file / 'sub'}: {a_file} is a file"),
                          (checkpoint, f"lrnnx-zoo export: --out {checkpoint} holds an lrnnx-zoo checkpoint")):
        err = export_error(["digits-lru", "--out", str(out), "--latency-steps", "0"], capsys)
        assert expected in err and not PYTHON_NAMES.search(err), err


@pytest.mark.parametrize("command", ["info", "evaluate", "export"])
def test_revision_of_a_shipped_or_local_checkpoint_names_the_flag(command, tmp_path, capsys):
    # It said "revision='v1' applies to Hub repos ...; drop revision": from_pretrained's words.
    lrnnx_zoo.from_pretrained("digits-lru").save_pretrained(tmp_path / "local")
    out = ["--out", str(tmp_path / "out")] if command == "export" else []
    for src, kind in (("digits-lru", "shipped"), (str(tmp_path / "local"), "local")):
        assert main([command, src, "--revision", "v1", *out]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"lrnnx-zoo {command}: "), err
        assert f"--revision applies to Hub repos, but '{src}' is a {kind} checkpoint; drop --revision" in err, err
        assert not PYTHON_NAMES.search(err), err


def test_demo_out_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    # `bash scripts/demo.sh --out FILE` ended in a FileExistsError traceback from Path.mkdir.
    from lrnnx_zoo import demo
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        with pytest.raises(SystemExit) as exit_info:
            demo.main(["--out", str(out), "digits-lru"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err, err
        assert f"error: cannot write --out {out}" in err or f"error: --out {out} is a file" in err, err


def test_train_batch_larger_than_the_data_names_the_flag(tmp_path, capsys, monkeypatch):
    # It said "batch_size 5000 exceeds the 1437 training examples ...; expected a batch_size <= 1437".
    import lrnnx_zoo.training as training
    monkeypatch.setattr(training, "_run", lambda *a, **k: pytest.fail("training started"))
    assert main(["train", "digits-tiny", "--out", str(tmp_path / "out"), "--batch-size", "5000"]) == 2
    err = capsys.readouterr().err
    assert err == ("lrnnx-zoo train: --batch-size 5000 exceeds the 1437 training examples: no full batch, "
                   "so no optimiser step; expected a --batch-size <= 1437\n"), err


def test_demo_without_an_optional_package_says_what_to_install_in_one_line(monkeypatch, capsys, tmp_path):
    # `python -m lrnnx_zoo.demo digits-lru` without scikit-learn ended in a chained traceback; the hint
    # was its last line
    from lrnnx_zoo import demo, training

    def missing(info):
        raise training.MissingDependencyError("the digits data set ships with scikit-learn: "
                                              "pip install 'lrnnx-zoo[data]'")
    monkeypatch.setattr(demo, "checkpoint_data", missing)
    assert demo.main(["--out", str(tmp_path / "out"), "digits-lru"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: digits-lru: the digits data set ships with scikit-learn: pip install" in err


@pytest.mark.parametrize("card", ["---\nlicense: [unclosed\n---\n# x\n", "---\n- a\n---\n# x\n",
                                  b"---\nlicense: \xff\n---\n# x\n", "---\nx: " + "[" * 5000 + "]" * 5000 + "\n---\n"])
def test_an_unreadable_model_card_is_named_not_a_traceback(card, tmp_path, capsys):
    # `info` and `evaluate` printed tracebacks (ParserError, RecursionError, UnicodeDecodeError) for cards
    # of checkpoints from_pretrained loads fine (an audit). info shows the config and names the card;
    # evaluate measures and warns that the card's claims were not compared.
    from lrnnx_zoo.evaluate_cli import card_claims
    folder = tmp_path / "m"
    lrnnx_zoo.from_pretrained("forecast-sunspots-s4d").save_pretrained(folder)
    (folder / "README.md").write_bytes(card if isinstance(card, bytes) else card.encode())
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "none read: " in out and "README.md (the model card) cannot be read: " in out, out
    assert card_claims(lrnnx_zoo.from_pretrained(folder).checkpoint_info) == {}
    assert "its claims are not compared" in capsys.readouterr().err
