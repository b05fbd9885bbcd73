"""Command line: ``lrnnx-zoo plugins | layers | backends | ...``.

Each group of subcommands lives next to the code it drives, in a module with
``add_commands(sub, commands)``; this file only lists those modules (see SUBCOMMAND_MODULES).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import sys
import textwrap
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Type

#: What ``lrnnx-zoo --help`` says (the module docstring above is for people reading this file).
DESCRIPTION = ("Linear RNN and state-space layers (LRU, S4, S4D, FFTConv) as plugins: see what is installed, "
               "inspect, train, evaluate and publish checkpoints, export them as streaming step graphs. "
               "`lrnnx-zoo COMMAND --help` lists a command's options.")

COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {}
#: The flags that give the library's arguments, for its messages while a command runs (lrnnx_zoo.wording):
#: a refusal deep inside train or from_pretrained then says --init-from, not init_from=.
FLAGS = {"out_dir": "--out", "init_from": "--init-from", "resume": "--resume", "checkpoint_every": "--checkpoint-every",
         "local_files_only": "--local-files-only", "revision": "--revision", "epochs": "--epochs",
         "max_steps": "--max-steps"}
#: The arguments (argparse dests) that take a path, expanded with ``~`` as a shell would (a --message
#: "~ fix" is no path).
PATH_ARGS = ("name", "src", "out", "init_from", "resume")
# Modules adding subcommands: add_commands(subparsers, COMMANDS). Missing ones are skipped.
SUBCOMMAND_MODULES = ("lrnnx_zoo.hub_cli", "lrnnx_zoo.training_cli", "lrnnx_zoo.evaluate_cli", "lrnnx_zoo.export.cli")


def add_command(sub: argparse._SubParsersAction, name: str, summary: str, examples: Sequence[str],
                description: Optional[str] = None) -> argparse.ArgumentParser:
    """Add subcommand ``name``: ``summary`` is its line in ``lrnnx-zoo --help``; its own --help opens
    with ``description`` (default: the summary) and ends with ``examples`` (argument strings)."""
    text = description or summary[:1].upper() + summary[1:] + "."
    if "\n" not in text:                         # one paragraph: wrap it; a preformatted one stays as written
        text = textwrap.fill(text, 78)   # argparse's width in a pipe or 80-column terminal
    heading = "example:" if len(examples) == 1 else "examples:"
    epilog = heading + "".join(f"\n  lrnnx-zoo {name} {example}".rstrip() for example in examples)
    return sub.add_parser(name, help=summary, description=text, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def aligned(rows: Sequence[Sequence[str]]) -> List[str]:
    """Rows of cells as lines of left-aligned columns, each as wide as its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def add_json_flag(parser: argparse.ArgumentParser, what: str = "a JSON list of objects") -> None:
    """``--json``: print ``what`` on stdout instead of the table, for scripts (see :func:`print_json`)."""
    parser.add_argument("--json", action="store_true", help=f"print {what} instead of the table")


def print_json(value: Any) -> None:
    """One JSON document on stdout and nothing else there (notes go to stderr)."""
    print(json.dumps(value, indent=2))


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .registry import list_plugins, misplaced_entry_points
    plugins = list_plugins()
    status = 1 if args.strict and any(p.error for p in plugins) else 0
    # a distribution whose entry point is in a mistyped group is listed nowhere else
    misplaced = ["note: " + m for m in misplaced_entry_points()]
    if args.json:
        print_json([{**dataclasses.asdict(p), "ok": p.ok} for p in plugins])
        for line in misplaced:
            print(line, file=sys.stderr)
        return status
    rows = [("PLUGIN", "STATUS", "DISTRIBUTION", "VERSION", "MODULE")] + [
        (p.name, "ok" if p.ok else "FAILED", "built-in" if p.builtin else (p.distribution or "registered in code"),
         p.version or "-", p.module) for p in plugins]
    lines = aligned(rows)
    print(lines[0])
    for p, line in zip(plugins, lines[1:]):
        print(line)
        if p.layers:
            print(f"    layers:       {', '.join(p.layers)}")
        if p.initializers:
            print(f"    initializers: {', '.join(p.initializers)}")
        if p.backends:
            print(f"    backends:     {', '.join(p.backends)}")
        if p.error:
            print("    error:        " + p.error.strip().splitlines()[0])
        for note in p.notes:
            print("    note:         " + note)
    for line in misplaced:
        print(line)
    return status


def layer_entries() -> List[Dict[str, Any]]:
    """Each registered layer: its name, the plugins registering it, and its initializers with theirs."""
    from .registry import get_registry, layer_owners
    reg = get_registry()
    return [{"name": name, "plugins": layer_owners(name),
             "initializers": [{"name": init, "plugin": e.plugin} for (layer, init), entries
                              in sorted(reg._initializers.items()) if layer == name for e in entries]}
            for name in sorted(reg._layers)]


def _cmd_layers(args: argparse.Namespace) -> int:
    entries = layer_entries()
    if args.json:
        print_json(entries)
        return 0
    rows = [("LAYER", "FROM", "INITIALIZERS")]
    for entry in entries:
        # an initializer another plugin added is named with it: a checkpoint using it needs that plugin
        inits = [i["name"] if i["plugin"] in entry["plugins"] else f"{i['name']} ({i['plugin']})"
                 for i in entry["initializers"]]
        rows.append((entry["name"], ", ".join(entry["plugins"]), ", ".join(inits) or "-"))
    for line in aligned(rows):
        print(line)
    return 0


def _cmd_backends(args: argparse.Namespace) -> int:
    from .registry import RegistryError, get_registry, list_backends
    try:
        backends = list_backends(args.kind)
    except RegistryError as exc:
        print(f"lrnnx-zoo backends: {exc}", file=sys.stderr)
        return 2
    reg = get_registry()
    owners = {b: [e.plugin for e in reg._backends[tuple(b.split(".", 1))]] for b in backends}
    if args.json:
        print_json([{"kind": b.split(".", 1)[0], "name": b.split(".", 1)[1], "plugins": owners[b]} for b in backends])
        return 0
    for b in backends:
        # who registered it, where a third party did (as `layers` names their initializers): a plugin's
        # backend, or one clashing with a built-in's name, read as the built-in families' own
        builtin = all(getattr(reg.plugins.get(o), "builtin", False) for o in owners[b])
        print(b if builtin else f"{b} ({', '.join(owners[b])})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="lrnnx-zoo", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = add_command(sub, "plugins", "installed plugins, what each registered, and failures", ["", "--strict --json"])
    p.add_argument("--strict", action="store_true", help="exit 1 if any plugin failed to load")
    add_json_flag(p)
    add_json_flag(add_command(sub, "layers", "registered layers and who registered them", ["", "--json"]))
    p = add_command(sub, "backends", "registered kernel backends", ["", "cauchy", "--json"])
    p.add_argument("kind", nargs="?", default=None,
                   help="list only backends of this kind (the built-in kinds: vandermonde, cauchy, modal, ssm_kernel)")
    add_json_flag(p)
    COMMANDS.update(plugins=_cmd_plugins, layers=_cmd_layers, backends=_cmd_backends)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.add_commands(sub, COMMANDS)
    return parser


@contextlib.contextmanager
def escaped_output() -> Iterator[None]:
    """While the command runs, stdout writes a character its encoding lacks (a non-ASCII folder name on
    an ASCII or cp1252 stdout: ``PYTHONIOENCODING=ascii``, a Windows console redirected to a file) as
    an escape (``\\xfc``), as Python's stderr always does: it raised UnicodeEncodeError, a traceback
    after the work was done (export had written its folder). Only a strict stream is changed, and it
    is restored."""
    stream = sys.stdout
    strict = getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure")
    if strict:
        stream.reconfigure(errors="backslashreplace")
    try:
        yield
    finally:
        if strict and not stream.closed:
            stream.reconfigure(errors="strict")


def unexpandable_home(args: argparse.Namespace) -> Optional[str]:
    """Why an argument that starts with ``~`` cannot be expanded, or None when all can
    (:func:`lrnnx_zoo.utf8.home_trouble`): every path function raised RuntimeError, a traceback from
    deep in a command."""
    from .utf8 import home_trouble
    for dest in PATH_ARGS:
        value = getattr(args, dest, None)
        trouble = home_trouble(value) if isinstance(value, str) else None
        if trouble:
            return trouble
    return None


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``lrnnx-zoo`` with ``argv`` (default: sys.argv[1:]); the exit status (argparse's usage
    errors and --help/--version exit through SystemExit, status 2 or 0). Called in-process it leaves
    the C allocator as the application set it (:func:`console_main` is the command's own process)."""
    return run_commands(build_parser, COMMANDS, argv)


def console_main() -> int:
    """The ``lrnnx-zoo`` command and ``python -m lrnnx_zoo``: :func:`main` in a process of its own, with
    :func:`~lrnnx_zoo.runtime.tune_allocator` applied first. That is process-wide and for good (freed
    memory is kept for reuse, never returned), so :func:`main` called from an application's process no
    longer applies it (it did, until then)."""
    from .runtime import tune_allocator      # ctypes only: nothing slow before the command's own try
    tune_allocator()
    return main()


def run_commands(build: Callable[[], argparse.ArgumentParser], commands: Dict[str, Callable[[argparse.Namespace], int]],
                 argv: Optional[List[str]] = None) -> int:
    """Parse ``argv`` with the parser ``build()`` makes (which fills ``commands``) and run the command
    it names, as ``lrnnx-zoo`` does: Ctrl-C, SIGTERM and SIGHUP end it with one line and 130 / 143 /
    129, clean-ups run, output to a closed pipe stops quietly, a warning the filters let through is one
    line (:func:`warning_line`). Also the entry point torchrun launches
    (:func:`lrnnx_zoo.training_cli.main`), whose workers torchrun stops with SIGTERM."""
    from .thread_warnings import this_threads_display
    from .training_cli import Terminated, stop_signals_raise
    command = None
    try:
        # Everything that may import torch (a second or two) is inside this try: a Ctrl-C while it
        # loads printed a KeyboardInterrupt traceback. The package itself imports nothing (see
        # lrnnx_zoo/__init__.py), so the parser, --help, --version and usage errors never load torch.
        from .wording import command_line
        parser = build()
        args = parser.parse_args(argv)
        command = args.command
        unexpandable = unexpandable_home(args)
        if unexpandable:
            parser.error(unexpandable)
        with command_line(FLAGS), escaped_output(), stop_signals_raise(), this_threads_display(warning_line(command)):
            status = commands[args.command](args)
        return status if flush_stdout() else 1
    except SystemExit:
        flush_stdout()          # --help or --version into `| head -1`: argparse's status, no message
        raise
    except KeyboardInterrupt as stop:
        # Ctrl-C: one line and the shell's status for SIGINT (128 + 2) rather than a traceback; after
        # the word, what the command had left done (a push: whether anything was committed)
        said = f": {stop}" if str(stop) else ""
        print(f"lrnnx-zoo{f' {command}' if command else ''}: interrupted{said}", file=sys.stderr)
        return 130
    except Terminated as stop:
        # SIGTERM (`timeout`, a job scheduler, `docker stop`) or SIGHUP (a closed terminal) killed the
        # process outright: an export left its hidden staging folder (.OUT.tmp-XXXXXXXX) beside --out;
        # now clean-ups run first. After the signal, what was left done, as after "interrupted"
        said = f": {stop}" if str(stop) else ""
        print(f"lrnnx-zoo {command}: terminated by {stop.name}{said}", file=sys.stderr)
        return 128 + stop.signum
    except BrokenPipeError:
        # The reader went away (`lrnnx-zoo info NAME | head`): stop quietly, as other tools do.
        flush_stdout()
        return 1


def warning_line(command: str) -> Callable[[Type[Warning], str], None]:
    """How a command shows a warning (see :func:`~lrnnx_zoo.thread_warnings.this_threads_display`): one
    ``lrnnx-zoo COMMAND: warning: TEXT`` line on stderr, as the command's other messages, where Python
    shows ``/path/to/lrnnx-zoo:8: PluginVersionWarning: TEXT`` and the script's line
    ``sys.exit(console_main())``, which tell a user nothing. Lost, as Python's, where stderr is gone.
    Open progress bars (a push's upload, train's) are cleared first and drawn again below the line."""
    def show(category: Type[Warning], text: str) -> None:
        if sys.stderr is None:          # pythonw: print would write it to stdout instead
            return
        from tqdm import tqdm
        try:
            # on a bar's line it read "model.safetensors: 40%|####  | ...lrnnx-zoo push: warning: TEXT"
            with tqdm.external_write_mode(file=sys.stderr):
                print(f"lrnnx-zoo {command}: warning: {text}", file=sys.stderr)
        except OSError:
            pass
    return show


def flush_stdout() -> bool:
    """Flush stdout; False when its reader has gone (``lrnnx-zoo layers | head -1``), with stdout then
    pointed at /dev/null. Output to a pipe waits in Python's buffer until the flush at exit, which
    printed "Exception ignored ... BrokenPipeError" and exited 120 after main had returned (unless
    PYTHONUNBUFFERED was set): main flushes before it returns instead."""
    stream = sys.stdout
    if stream is None:              # pythonw: no console
        return True
    try:
        stream.flush()
        return True
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())     # the flush at exit then succeeds
        return False


if __name__ == "__main__":      # python -m lrnnx_zoo.cli: a process of its own, as the command
    sys.exit(console_main())
