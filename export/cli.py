"""CLI: ``lrnnx-zoo export SRC --format onnx|torchscript|torch-export --out DIR [--quantize int8]
[--push-to-hub REPO] [--batch N] [--opset N] [--rate R] [--chunk T]``.

Writes an export folder (see :mod:`lrnnx_zoo.export.folder`), then prints the validation report
and the per-step latency (median over ``--latency-steps`` single steps at batch 1, or at the fixed ``--batch``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict

from lrnnx_zoo.training_cli import int_type, positive_int


def _cmd_export(args: argparse.Namespace) -> int:
    from lrnnx_zoo.wording import command_line
    from .options import CLI_FLAGS, check_format_options
    try:        # flags that do not go together, before torch and the exporters load (1.5-6 s)
        with command_line(CLI_FLAGS):
            check_format_options(args.format, args.quantize, args.opset, args.batch)
    except ValueError as exc:
        print(f"lrnnx-zoo export: {exc}", file=sys.stderr)
        return 2
    from lrnnx_zoo.hub import CheckpointError
    from lrnnx_zoo.hub_cli import check_revision_flag
    from lrnnx_zoo.hub_save import HubPublishError
    from lrnnx_zoo.training import MissingDependencyError     # int8 accuracy needs the checkpoint's data
    from .folder import export_folder
    from .step_graph import ExportError
    from .validate import ValidationError

    try:
        with command_line(CLI_FLAGS):      # export_folder's own checks name the flags as typed
            check_revision_flag(args.src, args.revision)      # before the model is loaded
            done = export_folder(args.src, args.out, format=args.format, quantize=args.quantize,
                                 push_to_hub=args.push_to_hub, batch=args.batch, opset=args.opset,
                                 latency_steps=args.latency_steps, revision=args.revision,
                                 validation_length=args.validation_length, rate=args.rate, chunk=args.chunk)
    except ValidationError as exc:   # the flags were fine, the graph is wrong: a failure, as evaluate --check's
        print(f"lrnnx-zoo export: {exc}", file=sys.stderr)
        return 1
    # OSError: an --out that is a file, or a folder holding files the export would overwrite
    # NotImplementedError: --rate for a model with a layer that has no timescale (per-sample poles)
    except (ExportError, CheckpointError, HubPublishError, MissingDependencyError, ValueError, OSError,
            NotImplementedError) as exc:
        print(f"lrnnx-zoo export: {exc}", file=sys.stderr)
        return 2
    print(done.result.summary())
    lat = done.latency
    if lat and lat.get("chunk"):
        print(f"  per-chunk latency: median {lat['median_us']:.1f} us for {lat['chunk']} steps ({lat['per_step_us']:.2f} "
              f"us per step; p10 {lat['p10_us']:.1f}, p90 {lat['p90_us']:.1f}) at batch {lat['batch']} over "
              f"{lat['steps']} chunks [{lat['runtime']}]")
    elif lat:
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
    from .options import DEFAULT_OPSET, DEFAULT_STEPS, FOLDER_VALIDATION_LENGTH, FORMATS, MAX_OPSET, MIN_OPSET

    from lrnnx_zoo.cli import add_command
    p = add_command(sub, "export", "export a causal model as a validated recurrent step graph",
                    ["runs/digits --out digits-onnx", "runs/digits --out digits-int8 --quantize int8",
                     "org/my-model --format torchscript --out my-model-ts"],
                    description=DESCRIPTION)
    p.add_argument("src", help="checkpoint folder, shipped model name, or Hub repo id")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="graph format (default: onnx)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 dynamic quantisation (onnx only)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the folder to this Hub repo")
    p.add_argument("--batch", type=positive_int, default=None, help="fix the batch size (default: dynamic)")
    p.add_argument("--opset", type=int_type(MIN_OPSET, MAX_OPSET), default=None,
                   help=f"ONNX opset in [{MIN_OPSET}, {MAX_OPSET}] (default {DEFAULT_OPSET}; 11-19 for runtimes "
                        "older than onnxruntime 1.17, 11-18 before 1.16)")
    p.add_argument("--revision", default=None, help="revision of a Hub source checkpoint")
    p.add_argument("--latency-steps", type=int_type(0, None, "an integer >= 0 (0 skips the measurement)"),
                   default=DEFAULT_STEPS, metavar="N",
                   help=f"steps timed at batch 1, or at the fixed --batch (default {DEFAULT_STEPS}; 0: skip)")
    p.add_argument("--validation-length", type=positive_int, default=FOLDER_VALIDATION_LENGTH, metavar="STEPS",
                   help=f"steps the graph is streamed to validate it against the PyTorch model (default "
                        f"{FOLDER_VALIDATION_LENGTH}: float32 rounding in the state grows with the stream)")
    p.add_argument("--rate", type=float, default=None, metavar="R",
                   help="export for inputs sampled at R times the rate of the model's data (2: twice the samples "
                        "per unit time, e.g. 16 kHz for a model of 8 kHz audio): each layer's continuous-time "
                        "system runs with step dt / R (SequenceModel.at_rate); layers without a timescale refuse")
    p.add_argument("--chunk", type=positive_int, default=None, metavar="T",
                   help="write a chunk graph: T steps per call, x (batch, T, d_input) -> y (batch, T, d_output), "
                        "with the step graph's state (for input that arrives in frames; per-channel layers run "
                        "each chunk as one matmul)")
    commands["export"] = _cmd_export
