"""CLI: ``lrnnx-zoo models [PATTERN]`` and ``lrnnx-zoo info NAME_OR_PATH`` (checkpoints, not weights)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, Optional

from .hub import CARD_NAME, CheckpointError, list_models, read_config, resolve_checkpoint, shipped_checkpoints
from .hub_card import card_metrics, headline_metric, task_name


def check_revision_flag(src: str, revision: Optional[str]) -> None:
    """Refuse ``--revision`` where from_pretrained would (empty, or with a folder or shipped name),
    in the command line's words: its own message names the Python argument, revision=."""
    if revision is None:
        return
    if not revision.strip():
        raise ValueError("--revision is empty; pass a branch, tag or commit id, or leave it out for main")
    if Path(src).expanduser().is_dir() or src in shipped_checkpoints():
        kind = "local" if Path(src).expanduser().is_dir() else "shipped"
        raise ValueError(f"--revision applies to Hub repos, but {src!r} is a {kind} checkpoint; "
                         "drop --revision or pass a Hub repo id")


def _cmd_models(args: argparse.Namespace) -> int:
    names = list_models(args.pattern)
    if not names:
        print("no shipped checkpoints" + (f" match {args.pattern!r}" if args.pattern else ""), file=sys.stderr)
        return 0
    shipped = shipped_checkpoints()
    rows = []
    for name in names:
        try:
            cfg = read_config(shipped[name])
        except CheckpointError as exc:
            rows.append((name, "?", "?", f"unreadable: {exc}"))
            continue
        rows.append((name, cfg.get("family") or "?", task_name(cfg.get("task")) or "-",
                     headline_metric(cfg.get("metrics")) or "-"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, width)) + "  " + row[3])
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    try:
        check_revision_flag(args.name, args.revision)
        folder, source = resolve_checkpoint(args.name, revision=args.revision,
                                            local_files_only=args.local_files_only)
        config = read_config(folder)
    except ValueError as exc:                     # CheckpointError is one
        print(f"lrnnx-zoo info: {exc}", file=sys.stderr)
        return 2
    config["source"] = source
    metrics = card_metrics(folder / CARD_NAME)
    if args.json:
        print(json.dumps({"config": config, "card_metrics": metrics}, indent=2))
        return 0
    print(json.dumps(config, indent=2))
    print(f"\nmetrics in the model card ({CARD_NAME}):")
    for key, value in (metrics or {}).items():
        print(f"  {key}: {value}")
    if not metrics:
        print("  none recorded")
    return 0


def add_commands(sub: argparse._SubParsersAction, commands: Dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Add ``models`` and ``info`` to the ``lrnnx-zoo`` parser (see lrnnx_zoo.cli)."""
    p = sub.add_parser("models", help="checkpoints shipped with the package: name, family, task, headline metric")
    p.add_argument("pattern", nargs="?", default=None, help="fnmatch wildcard ('digits-*') or, without wildcards, a substring ('s4d')")
    p = sub.add_parser("info", help="config and card metrics of a checkpoint (folder, shipped name or Hub repo id)")
    p.add_argument("name", metavar="NAME_OR_PATH")
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit id")
    p.add_argument("--local-files-only", action="store_true", help="use the Hub cache only, never download")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    commands.update(models=_cmd_models, info=_cmd_info)
