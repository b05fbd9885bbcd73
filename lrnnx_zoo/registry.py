"""The registry of layers, initializers and kernel backends, filled by plugins.

Plugins are discovered through the entry point group ``lrnnx_zoo``. pluggy's own
``load_setuptools_entrypoints`` stops at the first plugin that fails to import and does not notice
two plugins claiming one name, so we load entry points one at a time, call each plugin's hooks
separately, and keep a record of what each registered and what went wrong. A failing plugin
registers nothing (all or nothing) and never stops the others.

Set ``LRNNX_ZOO_DISABLE_PLUGIN_AUTOLOAD=1`` to load only the built-in families.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import importlib.util
import inspect
import os
import re
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pluggy
import torch
from torch import nn

from . import hookspecs
from .interfaces import Layer
from .wording import add_note

ENTRY_POINT_GROUP = "lrnnx_zoo"
DISABLE_AUTOLOAD_ENV = "LRNNX_ZOO_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_DISTRIBUTION = "lrnnx-zoo"
# Used only when the package runs from a source tree without its dist-info (not pip-installed).
_BUILTIN_FALLBACK = {"lru": "lrnnx_zoo.plugins.lru", "s4d": "lrnnx_zoo.plugins.s4d",
                     "s4": "lrnnx_zoo.plugins.s4", "fftconv": "lrnnx_zoo.plugins.fftconv"}
_HOOKS = ("lrnnx_zoo_register_layers", "lrnnx_zoo_register_initializers",
          "lrnnx_zoo_register_kernel_backends")
#: The backend kinds the built-in layers look up (registry.get_backend); a plugin may add its own.
BUILTIN_BACKEND_KINDS = ("vandermonde", "cauchy", "modal", "ssm_kernel")


#: What a plugin may raise without taking the process down: anything, SystemExit (a plugin calling
#: sys.exit() at import, e.g. "needs CUDA") and other BaseExceptions (asyncio.CancelledError, pytest's
#: skip() at import) included -- except KeyboardInterrupt, which is re-raised (the user asked to stop,
#: and a plugin hanging at import must stay interruptible) after undoing what the plugin registered.
PLUGIN_FAILURES = BaseException
#: How a hook is written, for the errors about one written otherwise.
_HOOK_SHAPE = ("a hook is a function decorated with @lrnnx_zoo.hookimpl, named after the hook and taking one "
               "argument, registry: def lrnnx_zoo_register_layers(registry)")


def _hook_mistake(plugin: Any, others: Dict[str, str]) -> Optional[str]:
    """A plugin's hook that pluggy would ignore without a word, or call other than as written: a
    hookimpl-decorated function whose name is not a hook (a typo), a hook-named function without
    the decorator, a class given for an instance, a hook wrapper, or another plugin's hook imported
    into this one (``others``: module name -> plugin name; ``from lrnnx_zoo.plugins.s4d import *``
    brought s4d's hooks along, which registered all of s4d's names a second time)."""
    project = hookspecs.PROJECT
    if isinstance(plugin, type):
        return (f"is the class {plugin.__name__}, but hooks are called on a module or an instance: point the "
                f"entry point at a module, or at an instance (plugin = {plugin.__name__}() in its module)")
    if inspect.isfunction(plugin) and plugin.__module__:
        # `name = "pkg.mod:lrnnx_zoo_register_layers"`, as console_scripts are written: "implements none
        # of the hooks ... got <function lrnnx_zoo_register_layers>" did not say what to point it at
        return (f"is the function {plugin.__module__}.{plugin.__name__}, but a plugin is the module (or object) "
                f"that holds the hooks, not a hook: point the entry point at {plugin.__module__!r} "
                f"(`{ENTRY_POINT_GROUP}` entry point: <plugin> = \"{plugin.__module__}\")")
    for attr in _HOOKS:
        fn = getattr(plugin, attr, None)
        opts = getattr(fn, project + "_impl", None)
        if isinstance(opts, dict) and (opts.get("wrapper") or opts.get("hookwrapper")):
            return (f"{attr} is a hook wrapper (wrapper=True / hookwrapper=True); registration hooks are called "
                    f"once each, with the registry: drop the option and register directly")
        home = getattr(fn, "__module__", None)
        if opts is not None and home in others and home != getattr(plugin, "__name__", None):
            return (f"{attr} is plugin {others[home]!r}'s hook ({home}.{attr}), imported into this one (a star "
                    f"import?): it would register {others[home]!r}'s names a second time. Import what you "
                    f"use by name and define this plugin's own hooks")
    for attr in dir(plugin):
        fn = getattr(plugin, attr, None)
        if not callable(fn) or not attr.startswith(project + "_"):
            continue
        decorated = hasattr(fn, project + "_impl")
        if decorated and attr not in _HOOKS:
            return (f"{attr} is marked @{project}.hookimpl but is not a hook; hooks: {', '.join(_HOOKS)} "
                    f"(a typo?)")
        if attr in _HOOKS and not decorated:
            return f"{attr} is missing its @{project}.hookimpl decorator, so it would never be called"
    if not any(hasattr(getattr(plugin, hook, None), project + "_impl") for hook in _HOOKS):
        return (f"implements none of the hooks ({', '.join(_HOOKS)}): expected a module or object with "
                f"@{project}.hookimpl functions, got {plugin!r} ({type(plugin).__name__}); check the entry point")
    return None


def source_checkout(package_dir: str) -> Optional[str]:
    """The source checkout that the package folder ``package_dir`` (lrnnx_zoo's) sits in, when it is one:
    a ``pyproject.toml`` and the ``plugins/`` folder beside it, which only an install (editable too)
    maps to ``lrnnx_zoo.plugins``. Imported from there (the checkout's root on sys.path before the
    installed package: the current directory of ``python -m pytest`` or ``python -c``), the built-in
    families cannot be imported. None otherwise."""
    root = os.path.dirname(os.path.abspath(package_dir))
    if (os.path.isfile(os.path.join(root, "pyproject.toml")) and os.path.isdir(os.path.join(root, "plugins"))
            and not os.path.exists(os.path.join(package_dir, "plugins"))):
        return root
    return None


def _way_out(info: "PluginInfo", exc: Optional[BaseException] = None) -> str:
    """What a user can do about an installed plugin that failed (appended to its error)."""
    if info.builtin:
        missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
        root = source_checkout(os.path.dirname(__file__)) if (missing or "").startswith("lrnnx_zoo.plugins") else None
        if root is None:
            return ""
        # a plugin author running the contract suite with `python -m pytest` in a checkout got every
        # built-in family missing and "no backends of kind 'vandermonde'" from their own layer
        return (f" -- lrnnx_zoo was imported from the source checkout {root}, which comes before the installed "
                f"package on sys.path (the current directory, under `python -m pytest` or `python -c`); its "
                f"built-in families are the folder plugins/, which only an install maps to lrnnx_zoo.plugins. "
                f"Run from another directory, run `pytest` (not `python -m pytest`) in the checkout, or install "
                f"the checkout: pip install -e {root}")
    if not info.distribution:
        return ""
    dist = info.distribution
    missing = _missing_dependency(info, exc)
    fix = (f"{dist} needs the module {missing!r}, which is not installed: install it (the package that provides "
           f"it, or the extra of {dist} that brings it), or uninstall {dist}" if missing
           else f"to fix it, update or reinstall {dist}, or uninstall it")   # reinstalling brings no optional one
    return f" -- {fix} (pip uninstall {dist}); {DISABLE_AUTOLOAD_ENV}=1 loads only the built-in families"


def _failure(exc: BaseException, module: str, info: "PluginInfo", in_hook: bool = False) -> str:
    """``exc`` as a plugin's error says it, "TYPE: MESSAGE" ("TYPE in a hook: MESSAGE"), with where in
    the plugin's files (``module``) it was raised and the way out (:func:`_way_out`) at the end of the
    message's first line, then the message's other lines as raised. Appended to a multi-line message
    they came after its last line, far from the plugin's name, where `lrnnx-zoo plugins` (an error's
    first line) did not show them. A message that cannot be read (its ``__str__`` raises) reads as in
    Python's own tracebacks, "<exception str() failed>": raised here, it stopped every other plugin."""
    try:
        text = str(exc)
    except Exception:       # noqa: BLE001 - any error of the plugin's __str__ is the plugin's
        text = "<exception str() failed>"
    lines = text.splitlines(keepends=True) or [""]
    first = (lines[0].splitlines() or [""])[0]
    said = f"{type(exc).__name__}{' in a hook' if in_hook else ''}: {first}"
    return f"{said}{_raised_at(exc, module)}{_way_out(info, exc)}{lines[0][len(first):]}{''.join(lines[1:])}"


def _raised_at(exc: BaseException, module: str) -> str:
    """Where in the plugin's own files ``exc`` was raised: " (raised at FILE:LINE, in FUNC)" for the
    innermost frame under the plugin's top-level package (``module``, the entry point's value), or ""
    (none there: a SyntaxError names its line itself). A failed import or hook said only "NameError:
    name 'x' is not defined" or a PluginError of ``registry.add_layer``; `lrnnx-zoo plugins` prints one
    line, and the plugin's author had to import the module by hand to find which of theirs raised."""
    top = module.partition(":")[0].partition(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except Exception:           # a name that is no module (register_plugin of an object), a broken parent
        return ""
    roots = list(getattr(spec, "submodule_search_locations", None) or []) or \
        ([spec.origin] if spec is not None and spec.origin else [])
    roots = [os.path.abspath(r) for r in roots]
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = os.path.abspath(frame.filename)
        if any(path == r or path.startswith(os.path.join(r, "")) for r in roots):
            return f" (raised at {frame.filename}:{frame.lineno}, in {frame.name})"
    return ""


def _missing_dependency(info: "PluginInfo", exc: Optional[BaseException]) -> Optional[str]:
    """The module a plugin imports that is not installed (an optional dependency, say), or None when
    ``exc`` is no ModuleNotFoundError or the missing module is the plugin's own (a broken install)."""
    missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    own = info.module.partition(":")[0].partition(".")[0]
    return missing if missing and missing.partition(".")[0] != own else None


#: The real dtype of a complex one's precision (a "vandermonde" backend's 2 Re output).
_REAL_OF = {torch.complex64: torch.float32, torch.complex128: torch.float64}

#: Per kind a built-in layer calls: the backend's arguments -> the output's shape and dtype (those of the
#: built-in backends), and how the contract reads (the hookspec's). A third party's backend answering
#: otherwise failed inside the layer (None: "'NoneType' object has no attribute 'to'"), or not at all: a
#: complex kernel where 2 Re was due was cast to its real part (half the kernel), float16 lost precision.
_BACKEND_OUTPUTS: Dict[str, Tuple[Callable[..., Tuple[Tuple[int, ...], torch.dtype]], str]] = {
    "vandermonde": (lambda v, log_lam, L, conj=True: ((*v.shape[:-1], L), _REAL_OF.get(v.dtype, v.dtype) if conj
                                                      else v.dtype),
                    "fn(v, log_lam, L, conj=True) -> a tensor (..., L) for v (..., N): 2 Re(...), real of v's "
                    "precision, if conj, else complex of v's dtype"),
    "cauchy": (lambda v, z, w: ((*torch.broadcast_shapes(v.shape[:-1], w.shape[:-1]), z.shape[-1]),
                                torch.promote_types(torch.promote_types(v.dtype, z.dtype), w.dtype)),
               "fn(v, z, w) -> a complex tensor (..., L) of the inputs' dtype for v, w (..., N) and z (L,)"),
    "modal": (lambda u, log_lam, B, C, initial_state=None: ((*u.shape[:-1], C.shape[0]), u.dtype),
              "fn(u, log_lam, B, C, initial_state=None) -> a real tensor (B, L, H_out) of u's dtype for u (B, L, H) "
              "and C (H_out, N)"),
}


def _autocast_dtype(out: torch.Tensor, due: torch.dtype) -> bool:
    """Whether ``out``, a real tensor where ``due`` was due, is in autocast's dtype while autocast is on
    for its device: the built-in modal backend's matmuls give bfloat16 under CPU autocast too."""
    kind = out.device.type
    return (due.is_floating_point and torch.is_autocast_enabled(kind)
            and out.dtype == torch.get_autocast_dtype(kind))


def _batched(out: torch.Tensor) -> bool:
    """Whether ``out`` is torch.func.vmap's batched tensor, whose requires_grad does not say whether
    gradients flow through it (torch.func.grad's wrapper's does: a detached output there is refused)."""
    batched = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", None)
    return bool(batched is not None and batched(out))


def _checked_backend(fn: Callable[..., Any], kind: str, name: str, plugin: str) -> Callable[..., Any]:
    """``fn``, a third-party ``kind`` backend, held to the kind's contract (_BACKEND_OUTPUTS) at each call:
    a PluginError naming the backend and its plugin for an output of another shape or dtype, or one cut
    off from autograd while its inputs require grad; an exception it raises gets a note naming them."""
    expected, contract = _BACKEND_OUTPUTS[kind]
    who = f"{kind} backend {name!r} of plugin {plugin!r}"

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            out = fn(*args, **kwargs)
        except Exception as exc:
            # a backend's own bug (a wrong signature, a failing op) named neither it nor its plugin
            add_note(exc, f"(raised by the {who}, which must be {contract})")
            raise
        shape, dtype = expected(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape) or (
                out.dtype != dtype and not _autocast_dtype(out, dtype)):
            got = (f"a {out.dtype} tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor)
                   else type(out).__name__)
            raise PluginError(f"{who} must be {contract}, here a {dtype} tensor of shape {tuple(shape)}; "
                              f"it returned {got}")
        # under torch.func's vmap a batched output reads requires_grad=False though gradients flow through it
        if (torch.is_grad_enabled() and not out.requires_grad and not _batched(out)
                and any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values()))):
            # a detached (or numpy-made) kernel trained nothing: the layer's parameters got no gradient
            raise PluginError(f"{who} returned a tensor cut off from autograd: its inputs require grad and its "
                              f"output does not (detached, or computed outside torch: numpy, .item(), .tolist()), "
                              f"so the layer's parameters would get no gradient; compute it with differentiable "
                              f"torch ops, or a torch.autograd.Function with a backward")
        return out
    return checked


class RegistryError(LookupError):
    """A name that is unknown or ambiguous in the registry."""


class PluginError(RuntimeError):
    """A plugin failed to load or registered something invalid."""


class PluginVersionWarning(UserWarning):
    """A checkpoint was saved with another distribution or version of a third-party plugin than the
    one installed now: the same weights may mean something else to it."""


@dataclass
class PluginInfo:
    """What one plugin is and what it registered (``list_plugins`` returns these)."""

    name: str
    module: str
    distribution: Optional[str] = None
    version: Optional[str] = None
    builtin: bool = False
    layers: List[str] = field(default_factory=list)
    initializers: List[str] = field(default_factory=list)
    backends: List[str] = field(default_factory=list)
    error: Optional[str] = None
    #: What it registered that nothing will look up (an initializer of a layer no plugin has, a backend
    #: of a kind no layer asks for): loaded, but likely a typo (``lrnnx-zoo plugins`` shows these).
    notes: List[str] = field(default_factory=list)
    #: Why it was loaded under "distribution:name" (an entry point name another distribution has too).
    renamed: Optional[str] = None

    @property
    def ok(self) -> bool:
        """Whether the plugin loaded (no ``error``)."""
        return self.error is None


@dataclass
class _Entry:
    value: Any
    plugin: str


#: Where :func:`create_layer` leaves, on each layer it builds, what its construction looked up in the
#: registry: a tuple of ("kind.name" or "layer.name", plugin) of each backend and initializer resolved
#: (:func:`extra_plugins` records the third-party ones a checkpoint needs).
RESOLVED_ATTR = "_lrnnx_zoo_resolved"

#: The list the lookups of the create_layer call under way note their entries in (None outside one).
_RESOLVING: contextvars.ContextVar[Optional[List[Tuple[str, str]]]] = \
    contextvars.ContextVar("lrnnx_zoo_resolving", default=None)


class Registry:
    """Name tables filled by plugins. Plugins call ``add_*`` inside their hooks."""

    def __init__(self) -> None:
        self._layers: Dict[str, List[_Entry]] = {}
        self._initializers: Dict[Tuple[str, str], List[_Entry]] = {}
        self._backends: Dict[Tuple[str, str], List[_Entry]] = {}
        self.plugins: Dict[str, PluginInfo] = {}
        self._current: Optional[PluginInfo] = None

    # -- called by plugins -------------------------------------------------------------------
    def add_layer(self, name: str, cls: type) -> None:
        """Register layer class ``cls`` under ``name`` (built with ``cls(d_model=..., **kwargs)``)."""
        from torch import nn
        if not isinstance(cls, type) or not issubclass(cls, nn.Module):
            raise PluginError(f"add_layer({name!r}, ...) needs an nn.Module subclass, got {cls!r}")
        self._add(self._layers, name, cls, "layers", name, (name,))

    def add_initializer(self, layer: str, name: str, fn: Callable[..., Any]) -> None:
        """Register initializer ``name`` for ``layer`` (its signature is the layer's to define)."""
        self._add(self._initializers, (layer, name), fn, "initializers", f"{layer}.{name}", (layer, name))

    def add_backend(self, kind: str, name: str, fn: Callable[..., Any]) -> None:
        """Register kernel backend ``name`` of ``kind`` ("vandermonde", "cauchy", "modal" or
        "ssm_kernel": the signatures are in :func:`lrnnx_zoo.hookspecs.lrnnx_zoo_register_kernel_backends`)."""
        self._add(self._backends, (kind, name), fn, "backends", f"{kind}.{name}", (kind, name))

    def _add(self, table: Dict, key: Any, value: Any, what: str, label: str, parts: Tuple[Any, ...]) -> None:
        if not callable(value):
            raise PluginError(f"{label}: expected a callable, got {value!r}")
        for part in parts:            # each given name, whatever its type (an int one failed iterating it)
            # no whitespace or control characters either: ' s4d ' listed like the built-in s4d, and a
            # newline broke `lrnnx-zoo layers`' one name per line
            if not isinstance(part, str) or not part or ":" in part or any(c.isspace() or not c.isprintable()
                                                                           for c in part):
                raise PluginError(f"{what} names must be non-empty strings without ':' (reserved for "
                                  f"'<plugin>:<name>' lookups), spaces or control characters, got {part!r} in "
                                  f"{label!r}")
        plugin = self._current.name if self._current else "<direct>"
        if any(e.plugin == plugin for e in table.get(key, [])):
            # else a clash with itself: no '<plugin>:<name>' could pick one of the two
            raise PluginError(f"{what[:-1]} {label!r} is registered twice by plugin {plugin!r}; register each "
                              f"name once")
        table.setdefault(key, []).append(_Entry(value, plugin))
        if self._current is not None:
            getattr(self._current, what).append(label)

    # -- lookups -------------------------------------------------------------------------------
    def get_layer(self, name: str) -> type:
        return self._lookup(self._layers, name, "layer", sorted(self._layers))

    def get_initializer(self, layer: str, name: str) -> Callable[..., Any]:
        known = sorted(n for (l, n) in self._initializers if l == layer)
        if not known:       # it said "unknown initializer for 's4dd' 'legs'; available: none"
            layers = sorted({l for l, _ in self._initializers})
            raise RegistryError(f"no initializers for layer {layer!r}; layers with initializers: "
                                f"{', '.join(repr(l) for l in layers) or 'none'}")
        return self._lookup(self._initializers, (layer, name), f"initializer for {layer!r}", known, name)

    def get_backend(self, kind: str, name: str = "auto") -> Callable[..., Any]:
        """The backend ``name`` of ``kind``; "auto" is the plugin's own chooser when it registered
        one, else "torch" (always present)."""
        if name == "auto" and (kind, "auto") not in self._backends and (kind, "torch") in self._backends:
            name = "torch"
        known = sorted(n for (k, n) in self._backends if k == kind)
        if not known:
            raise RegistryError(f"no backends of kind {kind!r}; kinds available: "
                                f"{', '.join(sorted({k for k, _ in self._backends})) or 'none'}")
        fn = self._lookup(self._backends, (kind, name), f"{kind} backend", known, name)
        owner = next(e.plugin for entries in self._backends.values() for e in entries if e.value is fn)
        if kind in _BACKEND_OUTPUTS and not getattr(self.plugins.get(owner), "builtin", False):
            return _checked_backend(fn, kind, name, owner)
        return fn

    def _lookup(self, table: Dict, key: Any, what: str, known: List[str], label: Any = None) -> Any:
        label = key if label is None else label
        plugin, _, bare = label.rpartition(":") if isinstance(label, str) else ("", "", label)
        if plugin:  # "plugin:name" picks one of several plugins that registered the same name
            key = bare if isinstance(key, str) else key[:-1] + (bare,)
        entries = table.get(key, [])
        if plugin:
            entries = [e for e in entries if e.plugin == plugin]
        if not entries and plugin and table.get(key):   # the name exists, under another plugin's name
            owners = [e.plugin for e in table[key]]
            raise RegistryError(f"{what} {bare!r} is registered by {', '.join(owners)}, not by a plugin named "
                                f"{plugin!r}; ask for '{owners[0]}:{bare}' (or {bare!r} while one plugin has it)")
        if not entries:
            failed = [p.name for p in self.plugins.values() if p.error and not p.error.startswith("duplicate")]
            hint = f" Plugins that failed to load: {', '.join(failed)} (see `lrnnx-zoo plugins`)." if failed else ""
            if not _autoload():
                hint += f" Third-party plugins are not loaded: {DISABLE_AUTOLOAD_ENV} is set."
            else:           # a plugin declared in a mistyped group is installed, and was never looked at
                hint += "".join(" " + m for m in misplaced_entry_points())
            if isinstance(key, tuple):
                # add_backend("vandermond", "fast", fn) or add_initializer("S4D", ...): the name is there, under a
                # kind no built-in layer asks for or a layer no plugin has (note_unreachable noted it at load)
                hint += "".join(f" {bare!r} is registered as '{'.'.join(other)}' by plugin {e.plugin!r}: a typo in "
                                f"its {'kind' if table is self._backends else 'layer'} there?"
                                for other, found in sorted(table.items()) if other[-1] == bare and other != key
                                and (self._unreachable_kind(other[0]) if table is self._backends
                                     else other[0] not in self._layers)
                                for e in found)
            raise RegistryError(f"unknown {what} {label!r}; available: {', '.join(known) or 'none'}.{hint}")
        if len(entries) > 1 and not plugin:
            # A built-in family keeps its bare names: a third-party plugin reusing one (marked in
            # `lrnnx-zoo plugins`) made every shipped checkpoint of that family fail to load.
            builtin = [e for e in entries if getattr(self.plugins.get(e.plugin), "builtin", False)]
            if len(builtin) == 1:
                entries = builtin
        if len(entries) > 1:
            owners = [e.plugin for e in entries]
            raise RegistryError(
                f"{what} {label!r} is registered by several plugins: {', '.join(owners)}. Uninstall all but one, "
                f"or ask for it as '<plugin>:{bare}', e.g. '{owners[0]}:{bare}'.")
        # An initializer or a backend a layer being built uses. Never while compiling: no layer is built
        # then, and dynamo cannot trace ContextVar.get (a lookup in forward broke every compiled graph).
        if isinstance(key, tuple) and not torch.compiler.is_compiling():
            resolving = _RESOLVING.get()
            if resolving is not None:
                resolving.append((".".join(key), entries[0].plugin))
        return entries[0].value

    def names(self, table: str, **filters: Optional[str]) -> List[str]:
        """Registered names of ``table``; a filter naming no registered layer / backend kind is
        refused (a typo would otherwise read as "nothing registered")."""
        if table == "layers":
            return sorted(self._layers)
        if table == "initializers":
            layer = filters.get("layer")
            found = sorted(f"{l}.{n}" for (l, n) in self._initializers if layer in (None, l))
            if layer is not None and not found and layer not in self._layers:
                raise RegistryError(f"unknown layer {layer!r}; available: {', '.join(sorted(self._layers)) or 'none'}")
            return found
        kind = filters.get("kind")
        found = sorted(f"{k}.{n}" for (k, n) in self._backends if kind in (None, k))
        if kind is not None and not found:
            kinds = sorted({k for k, _ in self._backends})
            raise RegistryError(f"unknown backend kind {kind!r}; available: {', '.join(kinds) or 'none'}")
        return found

    # -- loading -----------------------------------------------------------------------------
    def load_plugin(self, plugin: Any, info: PluginInfo, pm: pluggy.PluginManager) -> None:
        """Register one plugin object and run its hooks; on failure undo all it registered."""
        self.plugins[info.name] = info
        try:
            if plugin is not None:  # pluggy < 1.7 takes register(None, name) as blocking that name
                pm.register(plugin, name=info.name)
        except KeyboardInterrupt:
            del self.plugins[info.name]
            raise
        except PLUGIN_FAILURES as exc:  # pluggy validates hook names and signatures here
            # one line (`lrnnx-zoo plugins` prints the first): pluggy's second and third lines held
            # the offending argument, and none said what the hook must look like
            said = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            info.error = f"{type(exc).__name__}: {said}; {_HOOK_SHAPE}{_way_out(info)}"
            return
        others = {getattr(p, "__name__", None): n for n, p in pm.list_name_plugin() if n != info.name}
        mistake = _hook_mistake(plugin, others)
        if mistake:
            info.error = mistake + _way_out(info)
            if plugin is not None and pm.is_registered(plugin):    # unregister(None) fails an assertion
                pm.unregister(plugin)
            return
        wrong = [f"{impl.function.__name__}({', '.join(impl.argnames)})" for hook in _HOOKS
                 for impl in getattr(pm.hook, hook).get_hookimpls()
                 if impl.plugin_name == info.name and tuple(impl.argnames) != ("registry",)]
        if wrong:       # a hook without parameters failed when called, as a TypeError and a traceback
            info.error = f"hook {', '.join(wrong)} takes no registry; {_HOOK_SHAPE}{_way_out(info)}"
            pm.unregister(plugin)
            return
        # A generator (a stray yield) or async hook returns without running its body: the plugin loaded
        # "ok", having registered nothing, and its layers were just "unknown".
        deferred = [impl.function.__name__ for hook in _HOOKS for impl in getattr(pm.hook, hook).get_hookimpls()
                    if impl.plugin_name == info.name and (inspect.isgeneratorfunction(impl.function) or
                                                          inspect.iscoroutinefunction(impl.function) or
                                                          inspect.isasyncgenfunction(impl.function))]
        if deferred:
            info.error = (f"hook {', '.join(deferred)} is a generator or async function, whose body a call does "
                          f"not run, so it would register nothing: drop the yield / async; {_HOOK_SHAPE}"
                          f"{_way_out(info)}")
            pm.unregister(plugin)
            return
        self._current = info
        try:
            for hook in _HOOKS:
                for impl in getattr(pm.hook, hook).get_hookimpls():
                    if impl.plugin_name == info.name:
                        impl.function(self)
        except KeyboardInterrupt:           # stop as asked, with the registry as it was before this plugin
            self._forget(info.name)
            del self.plugins[info.name]
            pm.unregister(plugin)
            raise
        except PLUGIN_FAILURES as exc:
            info.error = (f"{_failure(exc, info.module, info, in_hook=True)}"
                          f"\n{traceback.format_exc(limit=-3)}")
            self._forget(info.name)
        finally:
            self._current = None
        self.mark_duplicates()

    def _forget(self, plugin: str) -> None:
        for table in (self._layers, self._initializers, self._backends):
            for key in list(table):
                table[key] = [e for e in table[key] if e.plugin != plugin]
                if not table[key]:
                    del table[key]
        info = self.plugins[plugin]
        info.layers, info.initializers, info.backends = [], [], []

    def note_unreachable(self) -> None:
        """Note on each plugin what it registered that nothing looks up: an initializer for a layer
        no loaded plugin registers, a backend of a kind that is neither a built-in one nor registered
        by another plugin too. Loaded all the same (its layer may come from a plugin not installed
        here, its kind may be one its own layers ask for); `lrnnx-zoo plugins` shows the note, since
        add_initializer("S4D", ...) or add_backend("vandermond", ...) was otherwise silently useless."""
        for info in self.plugins.values():
            info.notes = [info.renamed] if info.renamed else []
        for (layer, name), entries in sorted(self._initializers.items()):
            if layer not in self._layers:
                for e in entries:
                    if e.plugin in self.plugins:
                        self.plugins[e.plugin].notes.append(
                            f"initializer '{layer}.{name}' is for layer {layer!r}, which no loaded plugin registers "
                            f"(layers: {', '.join(sorted(self._layers))}): a typo?")
        for kind in sorted({k for k, _ in self._backends}):
            if self._unreachable_kind(kind):
                owner = next(e.plugin for (k, _), entries in self._backends.items() if k == kind for e in entries)
                if owner in self.plugins:
                    self.plugins[owner].notes.append(
                        f"backends of kind {kind!r} are looked up by no built-in layer (kinds: "
                        f"{', '.join(BUILTIN_BACKEND_KINDS)}), and the plugin registers no layer: a typo?")

    def _unreachable_kind(self, kind: str) -> bool:
        """Whether no layer looks backends of ``kind`` up: not a built-in kind, and registered by one
        plugin alone, which registers no layer (a plugin with layers of its own may look its kinds up
        itself: it warned at every load)."""
        owners = {e.plugin for (k, _), entries in self._backends.items() if k == kind for e in entries}
        if kind in BUILTIN_BACKEND_KINDS or len(owners) != 1:
            return False
        info = self.plugins.get(next(iter(owners)))
        return info is None or not info.layers

    def mark_duplicates(self) -> None:
        """Note on every plugin involved in a name clash which names clash and with whom; clashes
        that are gone (a plugin was unregistered) are cleared."""
        for info in self.plugins.values():
            if info.error is not None and info.error.startswith("duplicate"):
                info.error = None
        clashes: Dict[str, List[str]] = {}
        for what, table in (("layer", self._layers), ("initializer", self._initializers),
                            ("backend", self._backends)):
            for key, entries in table.items():
                owners = [e.plugin for e in entries]
                if len(owners) < 2:
                    continue
                label = key if isinstance(key, str) else ".".join(key)
                builtin = [o for o in owners if getattr(self.plugins.get(o), "builtin", False)]
                for o in owners:
                    others = ", ".join(x for x in owners if x != o)
                    bare = label if isinstance(key, str) else key[-1]
                    keeps = (f" (built in, which keeps the name; this plugin's is '{o}:{bare}')"
                             if len(builtin) == 1 and o not in builtin else "")
                    clashes.setdefault(o, []).append(f"{what} {label!r} is also registered by {others}{keeps}")
        for name, items in clashes.items():
            info = self.plugins.get(name)
            if info is not None and info.builtin:
                continue        # it loaded as it always does: the plugin that reuses its names is at fault
            if info is not None and (info.error is None or info.error.startswith("duplicate")):
                info.error = "duplicate names: " + "; ".join(items) + \
                             ". Uninstall one of the plugins or use '<plugin>:<name>'."


def _autoload() -> bool:
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("1", "true", "yes")


def misplaced_entry_points(distribution: Optional[str] = None) -> List[str]:
    """One sentence per installed entry point declared in a group that looks like ours but is not
    (``lrnnx_zoo.plugins``, ``lrnnx-zoo``, ``lrnx_zoo``: a typo in ``[project.entry-points.<group>]``),
    optionally only those of ``distribution``. Discovery reads only :data:`ENTRY_POINT_GROUP`, so such a
    plugin was simply absent: its layers were "unknown" and ``lrnnx-zoo plugins`` did not list it.
    Read on demand (an error, the CLI's listing), never at start-up."""
    import difflib
    want = _canonical(distribution) if distribution else None
    found = []
    try:
        groups = entry_points()
        names = sorted(g for g in groups.groups if g != ENTRY_POINT_GROUP)
    except Exception:       # a broken metadata file elsewhere must not hide the error this adds to
        return []
    squeeze = lambda g: re.sub(r"[^a-z0-9]", "", g.lower())      # noqa: E731
    near = set(difflib.get_close_matches(ENTRY_POINT_GROUP, names, n=len(names), cutoff=0.8))
    for group in names:
        if not (squeeze(group).startswith(squeeze(ENTRY_POINT_GROUP)) or group in near):
            continue
        for ep in groups.select(group=group):
            dist = getattr(ep, "dist", None)
            dist_name = getattr(dist, "name", None) or "an unknown distribution"
            if want is not None and _canonical(dist_name) != want:
                continue
            found.append(f"{dist_name} declares the entry point {ep.name} = {ep.value!r} in the group {group!r}, "
                         f"which lrnnx-zoo does not read: plugins are found in the group {ENTRY_POINT_GROUP!r} "
                         f"([project.entry-points.{ENTRY_POINT_GROUP}] in its pyproject.toml); fix the group, "
                         f"then reinstall {dist_name}.")
    return found


def _discover(registry: Registry, pm: pluggy.PluginManager) -> None:
    autoload = _autoload()
    seen: Dict[str, str] = {}           # entry point (= plugin) name -> the distribution that has it

    def is_builtin(ep: Any) -> bool:
        dist = getattr(ep, "dist", None)
        return (getattr(dist, "name", None) or "").replace("_", "-").lower() == BUILTIN_DISTRIBUTION

    # Built-in families first, so a third-party entry point with a built-in's name cannot hide it.
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (not is_builtin(e), e.name)):
        dist = getattr(ep, "dist", None)
        dist_name = getattr(dist, "name", None) if dist else None
        builtin = is_builtin(ep)
        if not builtin and not autoload:
            continue
        info = PluginInfo(ep.name, ep.value, dist_name, getattr(dist, "version", None) if dist else None, builtin)
        clash = None
        if ep.name in seen:
            if seen[ep.name] == dist_name:          # the same distribution seen twice on sys.path
                continue
            # Loaded under its distribution's name: refused, one of two plugins of one name lost its
            # layers, and which one depended on the order of sys.path
            clash = (f"entry point name {ep.name!r} of {dist_name or 'an unknown distribution'} is also "
                     f"{seen[ep.name]}'s, so this plugin is loaded as {dist_name}:{ep.name}; rename the entry point "
                     f"in [project.entry-points.{ENTRY_POINT_GROUP}] of {dist_name or 'that distribution'} to "
                     f"give it a name of its own")
            info.name = f"{dist_name}:{ep.name}"
        else:
            seen[ep.name] = dist_name or "?"
        try:
            plugin = ep.load()
        except KeyboardInterrupt as exc:
            # Ctrl-C on a slow or hung import: its traceback shows importlib's frames, not whose
            skip = "" if builtin else f"; {DISABLE_AUTOLOAD_ENV}=1 skips third-party plugins"
            add_note(exc, f"(interrupted while importing the lrnnx_zoo plugin {info.name!r}: {ep.value!r} from "
                          f"{dist_name or 'an unknown distribution'}{skip})")
            raise
        except PLUGIN_FAILURES as exc:
            registry.plugins[info.name] = info
            info.error = f"could not import {ep.value!r} from {dist_name or 'an unknown distribution'}: " \
                         f"{_failure(exc, ep.value, info)}\n{traceback.format_exc(limit=-3)}"
            continue
        info.renamed = clash
        registry.load_plugin(plugin, info, pm)
    for name, module in _BUILTIN_FALLBACK.items():
        if name in seen:
            continue
        try:
            plugin = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:  # that family is not part of this build
                continue
            raise
        from . import __version__
        info = PluginInfo(name, module, BUILTIN_DISTRIBUTION, __version__, True)
        registry.load_plugin(plugin, info, pm)
    registry.note_unreachable()


_lock = threading.RLock()
_registry: Optional[Registry] = None
_pm: Optional[pluggy.PluginManager] = None


def get_registry() -> Registry:
    """The process-wide registry, loading plugins on first use."""
    global _registry, _pm
    ready = _registry
    if ready is not None:   # no lock once loaded: layers look up backends in forward (and dynamo
        return ready        # cannot trace a lock, so torch.compile broke the graph there)
    with _lock:
        if _registry is None:
            pm = pluggy.PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            reg = Registry()
            _discover(reg, pm)
            _registry, _pm = reg, pm
        return _registry


def reload_plugins() -> Registry:
    """Forget everything and discover plugins again (after installing one at run time).

    A plugin module this process has already imported is registered as it was imported: Python
    does not import it again, so a plugin's changed or upgraded code takes effect in a new process
    (or after ``importlib.reload`` of its module, before this call). An editable install
    (``pip install -e``) since this process started is found too (:func:`_read_new_path_files`)."""
    global _registry
    with _lock:
        _registry = None
        _read_new_path_files()
        importlib.invalidate_caches()
        return get_registry()


#: When this module was imported: .pth files written later are new to this process.
_STARTED = time.time()
#: Those read since ((folder, name, mtime)): each once, as at start-up (an editable install's
#: finder appended itself to sys.meta_path again at every reload).
_READ_PATH_FILES: set = set()


def _read_new_path_files() -> None:
    """Read the .pth files written into site-packages since this process started (as Python read
    the others at start-up). An editable install puts its source on the path through one, so
    reload_plugins() after ``pip install -e`` found the plugin's entry point and failed to import
    it ("No module named ..."), advising to reinstall what was installed. Only new files: an old
    one's import lines were run at start-up and are not run twice."""
    import site
    dirs = list(getattr(site, "getsitepackages", lambda: [])())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    known = {os.path.normcase(os.path.abspath(p)) for p in sys.path if p}
    for folder in dirs:
        try:
            names = sorted(n for n in os.listdir(folder) if n.endswith(".pth"))
        except OSError:
            continue
        for name in names:
            try:
                mtime = os.path.getmtime(os.path.join(folder, name))
            except OSError:
                continue
            if mtime >= _STARTED and (folder, name, mtime) not in _READ_PATH_FILES:
                _READ_PATH_FILES.add((folder, name, mtime))
                site.addpackage(folder, name, known)


def register_plugin(plugin: Any, name: Optional[str] = None) -> PluginInfo:
    """Register a plugin object or module directly, without an entry point (for scripts and tests).

    Raises PluginError if it fails (an error in its hooks, a name already taken by a plugin, an
    object already registered); the registry is left as it was. A layer, initializer or backend name
    that another plugin registered too is not a failure: the plugin is kept, as an installed one
    would be, the returned info's ``error`` names the clash, a warning says so, and each clashing
    name is reachable as "<plugin>:<name>" (the bare name stays the built-in's, or is ambiguous).
    """
    reg = get_registry()
    assert _pm is not None
    name = name or getattr(plugin, "__name__", type(plugin).__name__)
    if name in reg.plugins:
        raise PluginError(f"a plugin named {name!r} is already registered; pick another name")
    if _pm.is_registered(plugin):   # pluggy refuses it too, and the clean-up below unregistered the first
        raise PluginError(f"this plugin object is already registered as {_pm.get_name(plugin)!r}; unregister "
                          "that first (lrnnx_zoo.unregister_plugin) to register it under another name")
    where = getattr(plugin, "__name__", None) or f"{type(plugin).__module__}.{type(plugin).__qualname__}"
    info = PluginInfo(name, where)
    reg.load_plugin(plugin, info, _pm)
    if info.error and not info.error.startswith("duplicate"):
        del reg.plugins[name]
        if _pm.is_registered(plugin):
            _pm.unregister(plugin)
        raise PluginError(f"plugin {name!r} failed: {info.error}")
    reg.note_unreachable()
    for note in info.notes:
        warnings.warn(f"plugin {name!r}: {note}", stacklevel=2)
    if info.error:
        # kept, as for installed plugins, but the bare name is now ambiguous for every caller in this
        # process (a built-in's stays the built-in's): the one who registered it hears it here
        warnings.warn(f"plugin {name!r} registered, but its names clash: {info.error.removeprefix('duplicate names: ')}",
                      stacklevel=2)
    return info


def unregister_plugin(name: str) -> None:
    """Remove a plugin and everything it registered."""
    reg = get_registry()
    assert _pm is not None
    if name not in reg.plugins:
        raise RegistryError(f"no plugin named {name!r}; loaded: {', '.join(sorted(reg.plugins))}")
    reg._forget(name)
    del reg.plugins[name]
    plugin = _pm.get_plugin(name)
    if plugin is not None:
        _pm.unregister(plugin)
    reg.mark_duplicates()       # a clash this plugin was part of is over
    reg.note_unreachable()      # an initializer of a layer it registered now has no layer


def layer_owners(layer: str) -> List[str]:
    """The plugins that register the layer ``layer`` names ("family" or "plugin:family"): one when
    the name is unambiguous, none when no loaded plugin has it."""
    prefix, _, family = layer.rpartition(":")
    return [e.plugin for e in get_registry()._layers.get(family, []) if not prefix or e.plugin == prefix]


def plugin_change(record: Dict[str, Any], layer: str) -> Optional[str]:
    """How the plugin that now provides ``layer`` differs from ``record``, the {name, distribution,
    version} a checkpoint was saved with; None when it is the same release, when nothing was
    recorded, and for the built-in families (their checkpoints are versioned by format_version)."""
    owners = layer_owners(layer)
    info = get_registry().plugins.get(owners[0]) if len(owners) == 1 else None   # else the lookup itself explains
    return _release_change(record, info, f"layer {layer.rpartition(':')[2]!r}")


def _canonical(distribution: Optional[str]) -> Optional[str]:
    """A distribution name as pip compares them (PEP 503): 'TP_Good' and 'tp-good' are one project."""
    return None if distribution is None else re.sub(r"[-_.]+", "-", distribution).lower()


def release_of(record: Dict[str, Any], unrecorded: str = "registered in code") -> str:
    """A plugin's release as "distribution version" ("tp-good 1.0.0"; just the distribution when no
    version is recorded, ``unrecorded`` in its place when no distribution is: a plugin registered in
    code), from a checkpoint's record or a PluginInfo's fields."""
    return f"{record.get('distribution') or unrecorded} {record.get('version') or ''}".rstrip()


def _release_change(record: Dict[str, Any], info: Optional[PluginInfo], what: str) -> Optional[str]:
    """How ``info``, the plugin now providing ``what``, differs from the recorded one (see plugin_change)."""
    dist, version = record.get("distribution"), record.get("version")
    if info is None or not dist or (dist == BUILTIN_DISTRIBUTION and info.builtin):
        return None
    saved = release_of(record)
    now = release_of({"distribution": info.distribution, "version": info.version}, "code (register_plugin)")
    as_saved = f"pip install {dist}=={version}" if version else f"pip install {dist}"
    if (info.name, _canonical(info.distribution)) != (record.get("name"), _canonical(dist)):
        record_now = now if info.distribution else "the plugin registered in code"
        return (f"was saved with {what} from plugin {record.get('name')!r} ({saved}), and it is now built "
                f"by plugin {info.name!r} from {now}: the same weights may mean something else to it. To load it "
                f"as saved: {as_saved}; or check the model and re-save it (model.save_pretrained) to record "
                f"{record_now}")
    if info.version != version:
        return (f"was saved with plugin {info.name!r} from {saved}, and {now} is installed: if that release changed "
                f"{what}, the same weights give other outputs. To load it as saved: {as_saved}; or check "
                f"the model and re-save it (model.save_pretrained) to record {info.version}")
    return None


def extra_plugins(layer: str, model: nn.Module) -> List[Dict[str, Any]]:
    """The third-party plugins, other than the one providing ``layer``, whose initializers or kernel
    backends the layers in ``model`` resolved when :func:`create_layer` built them (``init="slowlin"``,
    ``backend="other:fast"``; those of another family whose kernel a layer builds included), as a
    checkpoint records them: [{name, distribution, version, names: ["s4d.slowlin", ...]}]. Building
    the layer needs them, so loading it does too. What was looked up, not the strings among the
    layer's keyword arguments: those were matched against every plugin's names, and a free-text value
    that happened to equal one (``label="fast"``) recorded an unrelated plugin. A name a layer looks up
    only later, in forward, is not seen here."""
    reg = get_registry()
    own = set(layer_owners(layer))
    found: Dict[str, set] = {}
    for module in model.modules():
        for label, plugin in module.__dict__.get(RESOLVED_ATTR, ()):
            info = reg.plugins.get(plugin)
            if info is not None and not info.builtin and plugin not in own:
                found.setdefault(plugin, set()).add(label)
    return [{"name": name, "distribution": reg.plugins[name].distribution, "version": reg.plugins[name].version,
             "names": sorted(names)} for name, names in sorted(found.items())]


def _records(value: Any) -> List[Dict[str, Any]]:
    """The entries of a checkpoint's ``extra_plugins`` that name a plugin, each with ``names`` as a
    list of str (a hand-edited one is not refused: names that are no list count as none)."""
    entries = [r for r in value if isinstance(r, dict) and isinstance(r.get("name"), str)] \
        if isinstance(value, list) else []
    return [{**r, "names": [str(n) for n in r["names"]] if isinstance(r.get("names"), list) else []} for r in entries]


def _used(record: Dict[str, Any]) -> str:
    """What a checkpoint used of an extra plugin, for a message ("s4d.slowlin, vandermonde.chunked")."""
    return ", ".join(record["names"]) or "initializers or backends"


def _extra_provider(reg: Registry, record: Dict[str, Any]) -> Optional[PluginInfo]:
    """The loaded plugin that now provides an ``extra_plugins`` entry's names: the recorded plugin
    when it is loaded, else the one plugin registering them (a fork, or lrnnx-zoo itself), else None."""
    info = reg.plugins.get(record["name"])
    if info is not None:
        return info
    keys = [tuple(label.split(".", 1)) for label in record["names"]]   # "s4d.slowlin"
    owners = {e.plugin for key in keys for table in (reg._initializers, reg._backends) for e in table.get(key, [])}
    return reg.plugins.get(owners.pop()) if len(owners) == 1 else None


def extra_plugin_changes(records: Any) -> List[str]:
    """:func:`plugin_change` for the ``extra_plugins`` a checkpoint records (those now provided)."""
    reg = get_registry()
    changes = (_release_change(r, _extra_provider(reg, r), _used(r))
               for r in _records(records))
    return [c for c in changes if c]


def unloaded_plugin_remedy(info: Optional["PluginInfo"], distribution: Optional[str]) -> str:
    """What to do about a plugin a checkpoint needs that is not cleanly loaded (``info``: its
    registry entry, None when absent; ``distribution``: as the checkpoint records it), as a clause
    to follow the plugin's name: "which is loaded, but ...", "which is installed but failed to
    load: ...", "which is not installed: pip install DIST ...", "which is not loaded: ..."."""
    if info is not None and (info.error or "").startswith("duplicate"):    # loaded; the name is ambiguous
        return f"which is loaded, but {info.error.removeprefix('duplicate names: ').strip().splitlines()[0]}"
    if info is not None and info.error:
        return f"which is installed but failed to load: {info.error.strip().splitlines()[0]} (see `lrnnx-zoo plugins`)."
    if distribution and _installed(distribution):
        if not _autoload():     # it said "not installed: pip install ..." of an installed plugin
            return (f"which is installed ({distribution}) but not loaded, since {DISABLE_AUTOLOAD_ENV} is set: "
                    f"unset it, or register the plugin with lrnnx_zoo.register_plugin.")
        misplaced = misplaced_entry_points(distribution)
        if misplaced:
            return f"which is installed but not loaded: {' '.join(misplaced)}"
        return (f"which is installed ({distribution}) but not loaded: check its 'lrnnx_zoo' entry point, then "
                f"restart Python or call lrnnx_zoo.reload_plugins().")
    if distribution:
        return f"which is not installed: pip install {distribution}, then restart Python or call lrnnx_zoo.reload_plugins()."
    return "which is not loaded: install the package that provides it, or register it with lrnnx_zoo.register_plugin."


def _installed(distribution: str) -> bool:
    """Whether a distribution of that name is installed (its metadata is found)."""
    import importlib.metadata
    try:
        importlib.metadata.distribution(distribution)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return True


def autoload_note() -> str:
    """The sentence that explains missing third-party plugins when autoloading is switched off ("" else)."""
    return "" if _autoload() else f" Note: {DISABLE_AUTOLOAD_ENV} is set, so third-party plugins are not loaded."


def missing_extra_plugins(records: Any) -> str:
    """For a model that could not be built: which of the ``extra_plugins`` a checkpoint records are
    not loaded, and what to do about each ("" when all are)."""
    reg = get_registry()
    hints = []
    for r in _records(records):
        info = reg.plugins.get(r["name"])
        if info is not None and info.ok:
            continue
        saved = f" ({release_of(r)})" if r.get("distribution") else ""
        hints.append(f" It was saved with {_used(r)} from plugin {r['name']!r}{saved}, "
                     f"{unloaded_plugin_remedy(info, r.get('distribution'))}")
    return "".join(hints) + (autoload_note() if hints else "")


# -- public helpers ----------------------------------------------------------------------------
def list_layers() -> List[str]:
    """Names of all registered layers."""
    return get_registry().names("layers")


def list_initializers(layer: Optional[str] = None) -> List[str]:
    """Registered initializers as "layer.name", optionally for one layer (RegistryError if unknown)."""
    return get_registry().names("initializers", layer=layer)


def list_backends(kind: Optional[str] = None) -> List[str]:
    """Registered kernel backends as "kind.name", optionally of one kind (RegistryError if unknown)."""
    return get_registry().names("backends", kind=kind)


def list_plugins() -> List[PluginInfo]:
    """Every discovered plugin with its version, what it registered, and its error if it failed."""
    return sorted(get_registry().plugins.values(), key=lambda p: (not p.builtin, p.name))


def get_layer_class(name: str) -> type:
    return get_registry().get_layer(name)


def get_initializer(layer: str, name: str) -> Callable[..., Any]:
    """The initializer ``name`` registered for ``layer`` (RegistryError listing the known ones if
    none); "<plugin>:<name>" picks one that two plugins registered."""
    return get_registry().get_initializer(layer, name)


def initial_values(layer: str, name: str, what: str, shapes: Sequence[Tuple[int, ...]], context: str,
                   *args: Any, **kwargs: Any) -> Tuple[Any, ...]:
    """The tensors the initializer ``name`` of ``layer`` returns for ``args``, or a ValueError saying what was
    expected: ``what`` (e.g. "(A, B)") of ``shapes``, for ``context`` (the sizes asked for). A plugin's
    initializer returning None or other shapes failed as "cannot unpack non-iterable NoneType object" or a
    size mismatch at the layer's first forward, naming neither the initializer nor what it should give."""
    fn = get_initializer(layer, name)
    try:
        out = fn(*args, **kwargs)
    except Exception as exc:
        # a plugin's initializer of another signature failed as "<lambda>() takes 1 positional argument
        # but 2 were given", naming neither it, its plugin nor the call it must take (looked up only then)
        owner = next((e.plugin for entries in get_registry()._initializers.values() for e in entries
                      if e.value is fn), None)
        call = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
        add_note(exc, f"(raised by the {layer} initializer {name!r} of plugin {owner!r}, called as fn({call}) for "
                      f"{context}; it must return {what} tensors of shapes {', '.join(map(str, shapes))})")
        raise
    shapes = [tuple(w) for w in shapes]
    tensors = isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out)
    if not tensors or [tuple(t.shape) for t in out] != shapes:
        got = (tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in out)
               if isinstance(out, (tuple, list)) else type(out).__name__)
        raise ValueError(f"the {layer} initializer {name!r} must return {what} tensors of shapes "
                         f"{', '.join(map(str, shapes))} for {context}; got {got}")
    return tuple(out)


def get_backend(kind: str, name: str = "auto") -> Callable[..., Any]:
    """The kernel backend ``name`` of ``kind`` ("vandermonde", "cauchy", "modal", "ssm_kernel", ...);
    "auto" is the plugin's own chooser when it registered one, else "torch"."""
    return get_registry().get_backend(kind, name)


def check_layer_arguments(name: str, d_model: int, **kwargs: Any) -> type:
    """The class of the registered layer ``name``, after checking that ``cls(d_model=d_model, **kwargs)``
    binds to its signature: a TypeError naming the layer and the signature it takes, without building it
    (what create_layer checks first; training checks a recipe's layer_kwargs so before loading data)."""
    cls = get_layer_class(name)
    try:
        # the arguments against the signature first: a TypeError the constructor itself raises (a
        # plugin's own check) got the signature as the fix, though the signature was not the problem
        inspect.signature(cls).bind(d_model=d_model, **kwargs)
    except TypeError as exc:
        fix = ""
        if "d_state" in kwargs and not _accepts(cls, "d_state"):
            # a plugin layer of the author's own (d_model only) failed every recipe and the contract kit
            fix = (f"; every registered layer takes d_state (layers are built as create_layer(name, d_model, "
                   f"d_state=N): recipes, layer_kwargs and lrnnx_zoo.testing pass it): add d_state to "
                   f"{cls.__name__}.__init__ and check it with lrnnx_zoo.base.check_sizes, even if unused")
        raise TypeError(f"create_layer({name!r}, ...): {exc}. {cls.__name__} takes {_signature(cls)}{fix}") from exc
    except ValueError:      # no signature to read (a class implemented in C)
        pass
    return cls


def _accepts(cls: type, argument: str) -> bool:
    """Whether ``cls(...)`` takes the keyword ``argument`` (by name or through **kwargs)."""
    params = inspect.signature(cls).parameters.values()
    return any(p.name == argument or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def create_layer(name: str, d_model: int, **kwargs: Any) -> Layer:
    """Build the registered layer ``name``: ``cls(d_model=d_model, **kwargs)`` (d_state etc. in kwargs).

    Every registered layer maps (B, L, d_model) to (B, L, d_model) and has ``step``,
    ``allocate_inference_cache`` and ``step_form``: the return type, :class:`~lrnnx_zoo.interfaces.Layer`,
    is ``nn.Module`` at run time and declares them for type checkers.
    """
    cls = check_layer_arguments(name, d_model, **kwargs)
    resolved: List[Tuple[str, str]] = []
    outer, token = _RESOLVING.get(), _RESOLVING.set(resolved)
    try:
        layer = cls(d_model=d_model, **kwargs)
    except Exception as exc:
        owners = layer_owners(name)
        info = get_registry().plugins.get(owners[0]) if len(owners) == 1 else None
        if info is not None and not info.builtin:
            # a plugin's constructor failing deep inside it named neither the layer nor the plugin
            add_note(exc, f"(raised while building layer {name!r} of the plugin {info.name!r}, "
                          f"{release_of({'distribution': info.distribution, 'version': info.version})})")
        raise
    finally:
        _RESOLVING.reset(token)
    if outer is not None:       # a layer built inside another one's constructor: that one uses it too
        outer.extend(resolved)
    # in __dict__, as a plain value: a deepcopy (at_rate) keeps it, state_dict does not see it
    layer.__dict__[RESOLVED_ATTR] = tuple(dict.fromkeys(resolved))
    return layer


def _signature(cls: type) -> str:
    return str(inspect.signature(cls.__init__))
