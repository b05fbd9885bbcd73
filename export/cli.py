"""CLI: ``lrnnx-zoo export SRC --format onnx|torchscript|torch-export --out DIR [--quantize int8]
[--push-to-hub REPO] [--batch N] [--opset N]``.

Writes an export folder (see :mod:`lrnnx_zoo.export.folder`), then prints the validation report
and the per-step latency (median over ``--latency-steps`` single steps at batch 1, or at the fixed ``--batch``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict


def _cmd_export(args: argparse.Namespace) -> int:
    from lrnnx_zoo.hub import CheckpointError
    from lrnnx_zoo.hub_save import HubPublishError
    from .folder import check_arguments, check_destination, export_folder
    from .step_graph import ExportError
    from .validate import ValidationError

    try:
        # checked here first so that messages name the flags (--out), not export_folder's arguments
        out = check_arguments(args.out, args.format, args.quantize, args.opset, args.batch, args.latency_steps,
                              args.push_to_hub, cli=True)
        check_destination(out, args.format, "--out")
        done = export_folder(args.src, args.out, format=args.format, quantize=args.quantize,
                             push_to_hub=args.push_to_hub, batch=args.batch, opset=args.opset,
                             latency_steps=args.latency_steps, revision=args.revision)
    # OSError: an --out that is a file, or a folder holding files the export would overwrite
    except (ExportError, ValidationError, CheckpointError, HubPublishError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(done.result.summary())
    lat = done.latency
    if lat:
        print(f"  per-step latency: median {lat['median_us']:.1f} us (p10 {lat['p10_us']:.1f}, "
              f"p90 {lat['p90_us']:.1f}) at batch {lat['batch']} over {lat['steps']} steps [{lat['runtime']}]")
    print(f"wrote {done.folder}: {', '.join(done.files)}")
    if done.commit is not None:
        print(f"pushed to {args.push_to_hub}: {getattr(done.commit, 'commit_url', done.commit)}")
    return 0


DESCRIPTION = """\
Export a causal model (checkpoint folder, shipped name or Hub repo id) as a recurrent step graph
(x_t, state) -> (y_t, state'). The folder --out receives the graph (model.onnx, model.ts or
model.pt2), step_form.safetensors, config.json and a README.md card. The graph is streamed and
compared with the PyTorch model before anything is written; then the validation report and the
per-step latency (median over --latency-steps single steps at batch 1, or at the fixed --batch)
are printed."""


def add_commands(sub: argparse._SubParsersAction, commands: Dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Add ``export`` to the ``lrnnx-zoo`` parser (see lrnnx_zoo.cli)."""
    from .folder import FORMATS

    p = sub.add_parser("export", help="export a causal model as a validated recurrent step graph",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint folder, shipped model name, or Hub repo id")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="graph format (default: onnx)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 dynamic quantisation (onnx only)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the folder to this Hub repo")
    p.add_argument("--batch", type=int, default=None, help="fix the batch size (default: dynamic)")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset in [11, 25] (default 20; 11-19 for runtimes older than onnxruntime 1.17)")
    p.add_argument("--revision", default=None, help="revision of a Hub source checkpoint")
    p.add_argument("--latency-steps", type=int, default=500, help="steps timed at batch 1, or at the fixed --batch (0: skip)")
    commands["export"] = _cmd_export
