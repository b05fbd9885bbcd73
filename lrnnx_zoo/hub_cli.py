"""CLI: ``lrnnx-zoo models [PATTERN]``, ``lrnnx-zoo info NAME_OR_PATH`` and ``lrnnx-zoo push SRC REPO``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

# The library (lrnnx_zoo.hub, .hub_card: torch and the plugin registry, over a second) is imported in
# the commands, not here: the parser imports this module for every command, --help included.


def check_revision_flag(src: str, revision: Optional[str]) -> None:
    """Refuse ``--revision`` where from_pretrained would (empty, or with a folder or shipped name),
    in the command line's words: its own message names the Python argument, revision=."""
    if revision is None:
        return
    from .hub import shipped_checkpoints
    if not revision.strip():
        raise ValueError("--revision is empty; pass a branch, tag or commit id, or leave it out for main")
    local = Path(src).expanduser().is_dir()
    if local or src in shipped_checkpoints():
        kind = "local" if local else "shipped"
        raise ValueError(f"--revision applies to Hub repos, but {src!r} is a {kind} checkpoint; "
                         "drop --revision or pass a Hub repo id")


def model_entries(pattern: Optional[str] = None) -> List[Dict[str, Any]]:
    """Each shipped checkpoint matching ``pattern``: name, folder, family, task and metrics (None or
    {} where its config records none), or name, folder and the error that makes it unreadable."""
    from .hub import CheckpointError, list_models, read_config, shipped_checkpoints
    from .hub_card import scalar_metrics, task_name
    shipped, entries = shipped_checkpoints(), []
    for name in list_models(pattern):
        try:
            cfg = read_config(shipped[name])
        except CheckpointError as exc:
            entries.append({"name": name, "path": str(shipped[name]), "error": str(exc)})
            continue
        entries.append({"name": name, "path": str(shipped[name]), "family": cfg.get("family"),
                        "task": task_name(cfg.get("task")), "metrics": scalar_metrics(cfg.get("metrics"))})
    return entries


def _cmd_models(args: argparse.Namespace) -> int:
    from .cli import aligned, print_json         # cli imports this module's add_commands
    from .hub_card import headline_metric
    entries = model_entries(args.pattern)
    if args.json:
        print_json(entries)
        return 0
    if not entries:
        print("no shipped checkpoints" + (f" match {args.pattern!r}" if args.pattern else ""), file=sys.stderr)
        return 0
    rows = [(e["name"], "?", "?", f"unreadable: {e['error']}") if "error" in e else
            (e["name"], e["family"] or "?", e["task"] or "-", headline_metric(e["metrics"]) or "-") for e in entries]
    for line in aligned(rows):
        print(line)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .hub import CARD_NAME, read_config, resolve_checkpoint
    from .hub_card import UnreadableCardError, card_metrics, scalar_metrics
    try:
        check_revision_flag(args.name, args.revision)
        # a Hub repo's weights (up to GBs) are not downloaded: the config and the card say it all
        folder, source = resolve_checkpoint(args.name, revision=args.revision,
                                            local_files_only=args.local_files_only, need_weights=False)
        config = read_config(folder, need_weights=source["type"] != "hub")
    except ValueError as exc:                     # CheckpointError is one
        print(f"lrnnx-zoo info: {exc}", file=sys.stderr)
        return 2
    config["source"] = source
    try:
        metrics, unreadable = card_metrics(folder / CARD_NAME), None
    except UnreadableCardError as exc:       # the config is still worth showing
        metrics, unreadable = {}, str(exc)
    if args.json:
        print(json.dumps({"config": config, "card_metrics": metrics, **({"card_error": unreadable} if unreadable else {})},
                         indent=2))
        return 0
    print(json.dumps(config, indent=2))
    print(f"\nmetrics in the model card ({CARD_NAME}):")
    if unreadable:
        print(f"  none read: {unreadable}")
        return 0
    for key, value in (metrics or {}).items():
        print(f"  {key}: {value}")
    if not metrics:   # the card indexes metrics (model-index) only with a task and a dataset to index them under
        recorded = scalar_metrics(config.get("metrics"))
        print("  none in its model-index" + (f" (config.json records {', '.join(f'{k} {v:.6g}' for k, v in recorded.items())}, "
                                             "which the card shows in its text: the index needs a task and a dataset)"
                                             if recorded else ""))
    return 0


def _export_push_hint(args: argparse.Namespace) -> str:
    """For SRC a local export folder, the command that publishes an export (``push`` publishes
    checkpoints; the refusal named only OnnxStreamer and from_pretrained as ways on); else ""."""
    from .hub import CONFIG_NAME, EXPORT_KIND, loadable_source, peek_config
    # peek_config: a FIFO named config.json hung the refused push here, a 3 GB one was read whole
    config = peek_config(Path(args.src) / CONFIG_NAME)
    if config is None or config.get("kind") != EXPORT_KIND:
        return ""
    origin = loadable_source(config.get("source_checkpoint") or config.get("source")) or "SRC"
    return (f". To publish the export itself, export again with --push-to-hub (and the flags it was made "
            f"with): lrnnx-zoo export {origin} --out {args.src} --format {config.get('format') or 'onnx'} "
            f"--push-to-hub {args.repo}")


def _cmd_push(args: argparse.Namespace) -> int:
    """Publish a checkpoint (what `lrnnx-zoo train --out DIR` wrote, or anything from_pretrained
    loads) as model.push_to_hub does: loaded first, so a damaged folder is refused before any upload."""
    from .hub import from_pretrained
    from .hub_save import HubPublishError, check_repo_id, push_checkpoint

    try:
        check_repo_id(args.repo, "REPO")
        check_revision_flag(args.src, args.revision)
        if args.branch is not None and not args.branch.strip():
            raise ValueError("--branch is empty; pass a branch name, or leave it out for main")
        model = from_pretrained(args.src, revision=args.revision)
        # kept opens a sentence, whose capital letter would rename a relative SRC ("t1" -> "T1")
        commit = push_checkpoint(model, args.repo, private=args.private, commit_message=args.message,
                                 revision=args.branch, kept=f"the checkpoint {args.src} is unchanged")
    except (ValueError, HubPublishError) as exc:                 # CheckpointError is a ValueError
        print(f"lrnnx-zoo push: {exc}{_export_push_hint(args)}", file=sys.stderr)
        return 2
    where = args.repo if args.branch in (None, "main") else f"{args.repo}@{args.branch}"
    print(f"pushed {args.src} to {where}: {getattr(commit, 'commit_url', commit)}")
    return 0


PUSH_DESCRIPTION = """\
Upload a checkpoint to a Hugging Face Hub model repo (created if missing): config.json,
model.safetensors and a README.md card naming the repo, with the task, data, metrics and the
command recorded in config.json. SRC is loaded first (a damaged or foreign folder is refused
before anything is uploaded); a repo holding an export or another library's model is refused.
The token is huggingface_hub's (`hf auth login`, or HF_TOKEN). Export folders are
published with `lrnnx-zoo export SRC --out DIR --push-to-hub REPO`."""


def add_commands(sub: argparse._SubParsersAction, commands: Dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Add ``models``, ``info`` and ``push`` to the ``lrnnx-zoo`` parser (see lrnnx_zoo.cli)."""
    from .cli import add_command, add_json_flag  # cli imports this module's add_commands
    p = add_command(sub, "models", "checkpoints shipped with the package: name, family, task, headline metric",
                    ["", "'digits-*'", "s4d --json"])
    p.add_argument("pattern", nargs="?", default=None, help="fnmatch wildcard ('digits-*') or, without wildcards, a substring ('s4d')")
    add_json_flag(p)
    p = add_command(sub, "info", "config and card metrics of a checkpoint (folder, shipped name or Hub repo id)",
                    ["digits-s4d", "runs/digits --json", "org/my-model --revision v1"])
    p.add_argument("name", metavar="NAME_OR_PATH", help="checkpoint folder, shipped name or Hub repo id")
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit id")
    p.add_argument("--local-files-only", action="store_true", help="use the Hub cache only, never download")
    add_json_flag(p, "one JSON object")
    p = add_command(sub, "push", "upload a checkpoint to a Hugging Face Hub repo",
                    ["runs/digits org/my-digits --private", "runs/digits org/my-digits --branch dev"],
                    description=PUSH_DESCRIPTION)
    p.add_argument("src", metavar="SRC", help="checkpoint folder (e.g. train --out DIR), shipped name or Hub repo id")
    p.add_argument("repo", metavar="REPO", help="Hub repo id to upload to, e.g. org/my-model")
    p.add_argument("--private", action="store_true", help="create the repo private (if it does not exist)")
    p.add_argument("--branch", default=None, help="upload to this branch (created if missing; default: main)")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--revision", default=None, help="revision of a Hub SRC")
    commands.update(models=_cmd_models, info=_cmd_info, push=_cmd_push)
