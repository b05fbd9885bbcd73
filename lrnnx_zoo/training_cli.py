"""``lrnnx-zoo train RECIPE --out DIR [--seed N] [--epochs N] [--checkpoint-every N|epoch] [--resume [PATH]]
[--init-from SRC] [--layer NAME] [--layer-kwargs JSON] [--no-progress]`` and ``lrnnx-zoo recipes``.

Also runnable as a module, which is how torchrun launches it:
``python -m torch.distributed.run --nproc_per_node=2 -m lrnnx_zoo.training_cli train RECIPE --out DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple


def _int_in(text: str, minimum: int, maximum: Optional[int], expected: str) -> int:
    """``text`` as an int in [minimum, maximum], else argparse's usage error (exit 2, no traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def int_type(minimum: int, maximum: Optional[int] = None, expected: Optional[str] = None) -> Callable[[str], int]:
    """An argparse type: an int in [minimum, maximum] (no maximum: >= minimum), ``expected`` saying so."""
    expected = expected or (f"an integer in [{minimum}, {maximum}]" if maximum is not None
                            else f"an integer >= {minimum}")
    return lambda text: _int_in(text, minimum, maximum, expected)


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (so --epochs 0 or --batch-size 0 is a usage error, not a crash)."""
    return _int_in(text, 1, None, "a positive integer")


def seed_int(text: str) -> int:
    """argparse type: a seed, an int in [0, SEED_MAX] (a huge one is a usage error, not an overflow)."""
    from .recipes import SEED_MAX
    return _int_in(text, 0, SEED_MAX, f"an integer in [0, {SEED_MAX}]")


def checkpoint_every(text: str) -> Any:
    """argparse type: "epoch", or a positive int (optimiser steps between training snapshots)."""
    if text == "epoch":
        return text
    return _int_in(text, 1, None, "a positive integer (optimiser steps) or 'epoch'")


def json_object(text: str) -> Dict[str, Any]:
    """argparse type: a JSON object (--layer-kwargs '{"d_state": 32}'), else a usage error saying so."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"d_state\": 32}}', got {text!r} "
                                         f"({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of keyword arguments such as "
                                         f"'{{\"d_state\": 32}}', got {text!r}")
    return value


def _cmd_recipes(args: argparse.Namespace) -> int:
    from .recipes import RECIPES, list_recipes
    if getattr(args, "json", False):
        from .cli import print_json
        print_json([{"name": name, "description": RECIPES[name].description, "model": RECIPES[name].model,
                     "data": RECIPES[name].data.name, "epochs": RECIPES[name].optim.epochs,
                     "batch_size": RECIPES[name].optim.batch_size, "lr": RECIPES[name].optim.lr}
                    for name in list_recipes()])
        return 0
    for name in list_recipes():
        r = RECIPES[name]
        m, o = r.model, r.optim
        print(f"{name:<24} {r.description}")
        print(f"{'':<24} layer={m['layer']} d_model={m.get('d_model')} n_layers={m.get('n_layers')} "
              f"data={r.data.name} epochs={o.epochs} batch={o.batch_size} lr={o.lr}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .recipes import UnknownRecipeError, get_recipe, override
    try:
        recipe = get_recipe(args.recipe)
    except UnknownRecipeError as exc:
        print(f"lrnnx-zoo train: {exc}", file=sys.stderr)
        return 2
    from .hub import CheckpointError
    from .hub_save import check_save_target
    try:  # before training: a run that cannot save its checkpoint is wasted
        check_save_target(args.out, "--out")
    except (CheckpointError, PermissionError) as exc:
        print(f"lrnnx-zoo train: {exc}", file=sys.stderr)
        return 2
    recipe = override(recipe, seed=args.seed, epochs=args.epochs, batch_size=args.batch_size,
                      max_steps=args.max_steps, layer=args.layer, layer_kwargs=args.layer_kwargs)
    from .registry import PluginError, RegistryError
    from .training import (BatchExceedsDataError, MissingDependencyError, TrainingDivergedError, TrainingSetupError,
                           train)
    try:
        # SIGTERM / SIGHUP arrive as Terminated: lrnnx_zoo.cli.main runs every command under stop_signals_raise
        # its warnings (EpochsNotReachedWarning, ResumeNotExactWarning, ...): a line each, as run_commands shows them
        _, metrics = train(recipe, out_dir=args.out, progress=not args.no_progress,
                           checkpoint_every=args.checkpoint_every,
                           resume=False if args.resume is None else args.resume,
                           init_from=args.init_from)
    except BatchExceedsDataError as exc:
        name = "--batch-size" if args.batch_size is not None else "batch size"   # the recipe's own
        print(f"lrnnx-zoo train: {exc.message(name)}", file=sys.stderr)
        return 2
    except (TrainingSetupError, MissingDependencyError, RegistryError, PluginError) as exc:  # before training started
        # (a layer, initializer or backend the plugins do not provide: a 44-line traceback before)
        print(f"lrnnx-zoo train: {exc}", file=sys.stderr)
        return 2
    except TrainingDivergedError as exc:   # the message names the step and what to change
        print(f"lrnnx-zoo train: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:      # e.g. the save after training: a full disk, an --out the checks let through
        print(f"lrnnx-zoo train: {exc} (--out {args.out}: {_kept(args.out)})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # Ctrl-C: say what is left rather than show a traceback
        print(f"lrnnx-zoo train: interrupted (--out {args.out}: {_kept(args.out)})", file=sys.stderr)
        return 130
    except Terminated as stop:
        print(f"lrnnx-zoo train: terminated by {stop.name} (--out {args.out}: {_kept(args.out)})", file=sys.stderr)
        return 128 + stop.signum
    from .training import launcher_int     # train checked both (RANK only under torchrun, where it counts)
    if launcher_int("WORLD_SIZE", 1) <= 1 or launcher_int("RANK", 0) == 0:
        print(json.dumps(metrics, sort_keys=True))
    return 0


def _kept(out: str) -> str:
    """What a stopped run left in ``out``: its newest training snapshot (and how to go on), or nothing."""
    from .training_state import list_snapshots, snapshot_root
    held = list_snapshots(snapshot_root(out))
    if not held:
        return "nothing was saved"
    return f"the newest training snapshot is {held[-1][1]}; add --resume to the same command to continue from it"


class Terminated(BaseException):
    """SIGTERM (a job scheduler's stop, ``kill``) or SIGHUP (the terminal closed) during an ``lrnnx-zoo``
    command: a BaseException, as KeyboardInterrupt is, so that no ``except Exception`` on the way
    swallows it. ``signum``: the signal; the command exits with status 128 + signum, as the shell
    reports a process the signal killed. Its message, empty at first as a KeyboardInterrupt's, is what
    the command had left done where one says so (a push: whether anything was committed)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__()
        self.signum = int(signum)

    def __reduce__(self) -> Any:
        # rebuilt from the signal, not from the message (args), which __init__ would take for one
        return _terminated, (self.signum, self.args)

    @property
    def name(self) -> str:
        """The signal's name, "SIGTERM" or "SIGHUP"."""
        return signal.Signals(self.signum).name


def _terminated(signum: int, args: Tuple[Any, ...]) -> Terminated:
    """A :class:`Terminated` for ``signum`` with message ``args`` (unpickling)."""
    stop = Terminated(signum)
    stop.args = args
    return stop


#: The signals :func:`stop_signals_raise` turns into :class:`Terminated` (SIGHUP where the platform has it).
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` while a command runs, so that a scheduler's stop
    or a closed terminal says, as Ctrl-C does, which snapshot to resume from (it ended the process
    without a word). Only from the main thread, where Python runs signal handlers. ``lrnnx-zoo`` runs
    every command under it (lrnnx_zoo.cli.main): clean-ups run, and an export leaves no hidden staging
    folder behind. A signal the caller ignores stays ignored (``nohup lrnnx-zoo train ...`` goes on when
    its terminal closes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Terminated(signum)
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            if handler is not signal.SIG_IGN:
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def add_commands(sub: argparse._SubParsersAction, commands: Dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Register ``train`` and ``recipes`` on the ``lrnnx-zoo`` parser."""
    from .cli import add_command
    p = add_command(sub, "train", "train a named recipe and write a checkpoint",
                    ["digits-s4d --out runs/digits", "digits-s4d --out runs/digits --epochs 5 --checkpoint-every epoch",
                     "digits-s4d --out runs/digits --checkpoint-every epoch --resume",
                     "digits-s4d --out runs/mine --layer my_layer --layer-kwargs '{\"d_state\": 32}'"],
                    description="Train a recipe (see `lrnnx-zoo recipes`). Under torchrun the global batch "
                                "is split evenly across processes.")
    p.add_argument("recipe", help="recipe name, e.g. digits-s4d")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="write the checkpoint (config.json, model.safetensors, README.md) here")
    p.add_argument("--seed", type=seed_int, default=None, help="override the recipe's seed")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="override the recipe's number of epochs (a warning says when max_steps stops the run first)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="override the global batch size")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimiser steps")
    p.add_argument("--checkpoint-every", type=checkpoint_every, default=None, metavar="N|epoch",
                   help="write a training snapshot (weights, optimiser, schedule, random state) every N optimiser "
                        "steps, or at each epoch's end, into DIR/training_state (the newest two are kept)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="continue the interrupted run from the newest snapshot in DIR/training_state (or from "
                        "PATH: a snapshot folder); the result is that of the uninterrupted run, bit for bit")
    p.add_argument("--init-from", default=None, metavar="SRC",
                   help="start from the weights of this checkpoint (folder, shipped name or Hub repo id) "
                        "instead of random ones; its model must be the recipe's")
    p.add_argument("--layer", default=None, metavar="NAME",
                   help="train this registered layer (`lrnnx-zoo layers`, a plugin's too) in place of the recipe's; "
                        "of the recipe's layer arguments only d_state carries over")
    p.add_argument("--layer-kwargs", type=json_object, default=None, metavar="JSON",
                   help="keyword arguments for the layer as a JSON object, e.g. '{\"d_state\": 32}', added to "
                        "(and overriding) the recipe's")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or summary line")
    p = add_command(sub, "recipes", "list the training recipes", ["", "--json"])
    p.add_argument("--json", action="store_true", help="print one JSON list (as the other listings do)")
    commands.update(train=_cmd_train, recipes=_cmd_recipes)


def main(argv: Optional[List[str]] = None) -> int:
    """``train`` and ``recipes`` as ``lrnnx-zoo`` runs them (:func:`lrnnx_zoo.cli.run_commands`), for
    torchrun, which launches a module: its SIGTERM to the workers when one fails, or a Ctrl-C, killed
    them without the line naming the snapshot to resume from, and a Ctrl-C while torch loaded printed
    a traceback."""
    from .cli import run_commands
    commands: Dict[str, Callable[[argparse.Namespace], int]] = {}

    def build() -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog="lrnnx-zoo")
        add_commands(parser.add_subparsers(dest="command", required=True), commands)
        return parser
    return run_commands(build, commands, argv)


if __name__ == "__main__":       # torchrun's workers: processes of their own, as the lrnnx-zoo command
    from .runtime import tune_allocator
    tune_allocator()
    sys.exit(main())
