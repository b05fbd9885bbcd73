"""CLI: ``lrnnx-zoo evaluate SRC``: re-measure a checkpoint's test metrics on the split its config
records, beside the metrics its config and card claim.

It answers "does this checkpoint (downloaded, copied, converted) still do what its card says?".
``--check`` turns a mismatch into exit status 1, for scripts and CI.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from .training_cli import positive_int      # the library itself is imported in the command (see hub_cli)

#: ``--check`` accepts |measured - recorded| <= ATOL + RTOL * |recorded|: float32 sums over a few
#: hundred sequences move in the 5th-6th digit between thread counts and CPUs, far below one
#: example's weight in an accuracy over a few hundred (1/360 = 2.8e-3).
RTOL, ATOL = 1e-3, 1e-4


def compare_metrics(recorded: Dict[str, Any], measured: Dict[str, float], rtol: float = RTOL,
                    atol: float = ATOL) -> List[Tuple[str, Optional[float], float, bool]]:
    """Rows (metric, recorded or None, measured, within tolerance) for every measured metric; a
    metric the checkpoint does not record counts as matching (nothing to contradict) unless the
    measured value is NaN or infinite: weights whose outputs are NaN (a diverged last step) recorded
    their NaN loss as null, and passed ``--check``."""
    rows = []
    for key, value in measured.items():
        claim = recorded.get(key)
        if not isinstance(claim, (int, float)) or isinstance(claim, bool):
            rows.append((key, None, value, math.isfinite(value)))
            continue
        # an infinite claim matched anything: inf <= atol + rtol * inf (a card of 1e400 passed --check)
        ok = math.isfinite(value) and math.isfinite(claim) and abs(value - claim) <= atol + rtol * abs(claim)
        rows.append((key, float(claim), value, ok))
    return rows


def card_claims(info: Dict[str, Any]) -> Dict[str, Any]:
    """The metrics the model card of the loaded checkpoint (``info``: its checkpoint_info, whose source
    names its folder) claims in its model-index where they differ from its config's: a card edited, or
    copied from another run, claims what the weights may not do. Read from the folder the weights came
    from, not resolved again (a Hub branch could have moved on in between)."""
    from pathlib import Path
    from .hub import CARD_NAME
    from .hub_card import UnreadableCardError, card_metrics
    folder = (info.get("source") or {}).get("path")
    recorded = info.get("metrics") or {}
    if folder is None:
        return {}
    try:
        claimed = card_metrics(Path(folder) / CARD_NAME)
    except UnreadableCardError as exc:        # the weights still evaluate; say what was not compared
        print(f"lrnnx-zoo evaluate: warning: {exc}; its claims are not compared", file=sys.stderr)
        return {}
    return {k: v for k, v in claimed.items() if recorded.get(k) != v}


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .hub import CheckpointError, from_pretrained
    from .hub_cli import check_revision_flag
    from .training import MissingDependencyError, TrainingSetupError, check_device, checkpoint_data, evaluate
    try:
        check_revision_flag(args.src, args.revision)
        device = check_device(args.device, cli=True)
        model = from_pretrained(args.src, revision=args.revision, local_files_only=args.local_files_only)
        info = model.checkpoint_info
        data = checkpoint_data(info)
        card = card_claims(info)
    except (CheckpointError, TrainingSetupError, MissingDependencyError, ValueError,
            TypeError) as exc:   # TypeError: a recorded spec's value
        print(f"lrnnx-zoo evaluate: {exc}", file=sys.stderr)
        return 2
    if device is not None:
        model.to(device)
    t = time.perf_counter()
    try:
        measured = evaluate(model, data, batch_size=args.batch_size)
    except ValueError as exc:       # a recorded split the model cannot take (the model's own check says so)
        print(f"lrnnx-zoo evaluate: the test split {args.src} records does not fit its model: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t
    rows = compare_metrics(info.get("metrics") or {}, measured)
    # the card's own claims where they differ from the config's, as rows of their own
    rows += [(f"{key} (card)", claim, value, ok) for key, claim, value, ok in compare_metrics(card, measured)
             if claim is not None]
    mismatched = [key for key, _, _, ok in rows if not ok]
    if args.json:
        print(json.dumps({"source": info.get("source"), "n_test": len(data.x_test), "seconds": seconds,
                          "metrics": {k: {"recorded": c, "measured": m, "match": ok} for k, c, m, ok in rows}},
                         indent=2))
    else:
        from .hub_card import dataset_name
        name = dataset_name(info.get("dataset"))        # None would print as "(None)"
        print(f"{args.src}: {len(data.x_test)} test sequences of {data.x_test.shape[1]} steps"
              f"{f' ({name})' if name else ''}, {seconds:.1f} s")
        width = max(len(k) for k, *_ in rows)
        print(f"  {'metric':<{width}}  {'recorded':>10}  {'measured':>10}  difference")
        for key, claim, value, ok in rows:
            shown = "-" if claim is None else f"{claim:.6g}"
            diff = "" if claim is None else f"{value - claim:+.2e}"
            diff += "" if ok else ("  NOT FINITE" if not math.isfinite(value) else "  MISMATCH")
            print(f"  {key:<{width}}  {shown:>10}  {value:>10.6g}  {diff}")
        broken = [key for key, _, value, _ in rows if not math.isfinite(value)]
        if broken:
            print(f"{len(broken)} metric(s) measured NaN or infinite (the model's outputs are not finite): "
                  f"{', '.join(broken)}", file=sys.stderr)
        if len(mismatched) > len(broken):
            print(f"{len(mismatched) - len(broken)} metric(s) differ from the record by more than {ATOL:g} + "
                  f"{RTOL:g} x |recorded|: {', '.join(k for k in mismatched if k not in broken)}", file=sys.stderr)
    return 1 if mismatched and args.check else 0


def add_commands(sub: argparse._SubParsersAction, commands: Dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Register ``evaluate`` on the ``lrnnx-zoo`` parser (see lrnnx_zoo.cli)."""
    from .cli import add_command
    p = add_command(sub, "evaluate", "re-measure a checkpoint's test metrics beside the ones it records",
                    ["digits-s4d", "runs/digits --check --json"],
                    description="Load a checkpoint (folder, shipped name or Hub repo id), rebuild the test split "
                                "its config.json records, evaluate it and print each metric beside the "
                                "recorded one.")
    p.add_argument("src", metavar="NAME_OR_PATH", help="checkpoint folder, shipped name or Hub repo id")
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit id")
    p.add_argument("--local-files-only", action="store_true", help="use the Hub cache only, never download")
    p.add_argument("--batch-size", type=positive_int, default=256, help="sequences per forward (default 256)")
    p.add_argument("--device", default=None, help="torch device to evaluate on, e.g. cuda (default: cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--check", action="store_true",
                   help=f"exit 1 if a metric differs from the record by more than {ATOL:g} + {RTOL:g} x |recorded|")
    commands.update(evaluate=_cmd_evaluate)
