"""The ``lrnnx-zoo`` entry point itself: help text and behaviour in a shell pipeline (the
subcommands are tested next to the code they drive)."""

from __future__ import annotations

import subprocess
import sys

from lrnnx_zoo.cli import build_parser


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
