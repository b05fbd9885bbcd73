"""Plugin discovery through real distributions on sys.path (dist-info + entry_points.txt)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
import warnings

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo.registry import DISABLE_AUTOLOAD_ENV, PluginVersionWarning, RegistryError
from plugin_fixtures import (BROKEN_IMPORT, GOOD_PLUGIN, RAISING_HOOK, activate, installed, layers_registered,
                             make_distribution, reinstall)


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """Four third-party distributions: a good one, one whose import fails, one whose hook raises,
    and one that registers a name the good one also registers."""
    root = tmp_path / "site"
    make_distribution(root, "tp-good", {"tp_good": GOOD_PLUGIN.replace("{layer_name}", "ema")}, {"ema": "tp_good"})
    make_distribution(root, "tp-broken", {"tp_broken": BROKEN_IMPORT}, {"broken": "tp_broken"})
    make_distribution(root, "tp-raising", {"tp_raising": RAISING_HOOK}, {"raising": "tp_raising"})
    make_distribution(root, "tp-clash", {"tp_clash": GOOD_PLUGIN.replace("{layer_name}", "ema")}, {"clash": "tp_clash"})
    activate(root, monkeypatch)
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    lrnnx_zoo.reload_plugins()
    yield root
    monkeypatch.undo()
    lrnnx_zoo.reload_plugins()


def _plugin(name):
    return {p.name: p for p in lrnnx_zoo.list_plugins()}[name]


def test_builtins_come_from_entry_points():
    lrnnx_zoo.reload_plugins()
    infos = {p.name: p for p in lrnnx_zoo.list_plugins()}
    for name in ("lru", "s4d"):
        assert infos[name].builtin and infos[name].ok and infos[name].distribution == "lrnnx-zoo"
        assert name in infos[name].layers


def test_broken_plugins_do_not_stop_the_rest(third_party):
    # Every built-in still loads.
    assert {"lru", "s4d"} <= set(lrnnx_zoo.list_layers())
    broken = _plugin("broken")
    assert not broken.ok and "tp-broken" in broken.error and "not installed" in broken.error
    raising = _plugin("raising")
    assert not raising.ok and "boom while registering" in raising.error
    # ... each with the fix, on the first line (the one `lrnnx-zoo plugins` prints)
    for info in (broken, raising):
        first = info.error.splitlines()[0]
        assert f"pip uninstall {info.distribution}" in first and DISABLE_AUTOLOAD_ENV in first, first
    # all or nothing: what the raising hook registered before failing is gone
    assert "half_registered" not in lrnnx_zoo.list_layers()


def test_duplicate_names_name_both_plugins(third_party):
    with pytest.raises(RegistryError) as err:
        lrnnx_zoo.create_layer("ema", 4)
    msg = str(err.value)
    assert "registered by several plugins: clash, ema" in msg and "Uninstall" in msg
    assert not _plugin("clash").ok and "also registered by" in _plugin("clash").error
    # The qualified name picks one.
    layer = lrnnx_zoo.create_layer("ema:ema", 4)
    assert layer(torch.randn(2, 10, 4)).shape == (2, 10, 4)


def test_third_party_layer_created_by_name(tmp_path, monkeypatch):
    root = make_distribution(tmp_path / "site", "tp-good", {"tp_good": GOOD_PLUGIN.replace("{layer_name}", "ema")},
                             {"ema": "tp_good"}, version="1.2.3")
    activate(root, monkeypatch)
    lrnnx_zoo.reload_plugins()
    try:
        info = _plugin("ema")
        assert info.ok and info.distribution == "tp-good" and info.version == "1.2.3" and not info.builtin
        assert info.layers == ["ema"] and info.initializers == ["ema.flat"]
        layer = lrnnx_zoo.create_layer("ema", 5)
        x = torch.randn(2, 33, 5)
        cache = layer.allocate_inference_cache(2)
        steps = torch.stack([layer.step(x[:, t], cache)[0] for t in range(33)], 1)
        torch.testing.assert_close(steps, layer(x), rtol=1e-5, atol=1e-5)
    finally:
        monkeypatch.undo()
        lrnnx_zoo.reload_plugins()


def test_autoload_can_be_turned_off(third_party, monkeypatch):
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    lrnnx_zoo.reload_plugins()
    names = {p.name for p in lrnnx_zoo.list_plugins()}
    assert {"lru", "s4d"} <= names and not names & {"ema", "broken", "raising", "clash"}
    with pytest.raises(RegistryError, match=f"not loaded: {DISABLE_AUTOLOAD_ENV} is set"):
        lrnnx_zoo.create_layer("ema", 4)


def test_unknown_names_list_what_exists():
    with pytest.raises(RegistryError, match=r"unknown layer 'lstm'; available: .*lru.*s4d"):
        lrnnx_zoo.create_layer("lstm", 8)
    with pytest.raises(RegistryError, match=r"unknown initializer for 's4d' 'nope'; available: .*legs.*lin"):
        lrnnx_zoo.create_layer("s4d", 8, d_state=4, init="nope")
    with pytest.raises(RegistryError, match=r"unknown vandermonde backend 'cuda'; available: .*keops.*torch"):
        lrnnx_zoo.create_layer("s4d", 8, d_state=4, backend="cuda")
    with pytest.raises(TypeError, match="takes"):
        lrnnx_zoo.create_layer("lru", 8, bogus=1)
    # a plugin prefix that is not the registering plugin's name: say whose it is
    with pytest.raises(RegistryError, match=r"'lru' is registered by lru, not by a plugin named 'ema'; ask for 'lru:lru'"):
        lrnnx_zoo.create_layer("ema:lru", 8)
    assert isinstance(lrnnx_zoo.create_layer("lru:lru", 8, d_state=4), torch.nn.Module)


def test_listing_filters_refuse_unknown_names():
    # A typo in the filter used to return [] silently, as if the layer had no initializers.
    with pytest.raises(RegistryError, match=r"unknown layer 's4dd'; available: .*lru.*s4d"):
        lrnnx_zoo.list_initializers("s4dd")
    with pytest.raises(RegistryError, match=r"unknown backend kind 'vandermond'; available: .*cauchy.*vandermonde"):
        lrnnx_zoo.list_backends("vandermond")
    assert lrnnx_zoo.list_initializers("fftconv") == []          # registered, with no initializers
    assert "s4d.legs" in lrnnx_zoo.list_initializers("s4d")
    assert lrnnx_zoo.list_backends("cauchy") == ["cauchy.auto", "cauchy.keops", "cauchy.torch"]


def test_register_plugin_in_code_and_unregister():
    import types
    src = GOOD_PLUGIN.replace("{layer_name}", "ema_inline")
    mod = types.ModuleType("inline_plugin")
    exec(compile(src, "inline_plugin", "exec"), mod.__dict__)
    lrnnx_zoo.register_plugin(mod, "inline")
    try:
        assert "ema_inline" in lrnnx_zoo.list_layers()
    finally:
        lrnnx_zoo.unregister_plugin("inline")
    assert "ema_inline" not in lrnnx_zoo.list_layers()


def test_cli_lists_plugins_and_failures(third_party, capsys):
    # plugins: in a fresh process that finds the distributions on PYTHONPATH; layers: in this one (a
    # second interpreter start, ~1.5 s, added nothing)
    from lrnnx_zoo.cli import main as cli_main
    env_path = str(third_party)
    out = subprocess.run([sys.executable, "-m", "lrnnx_zoo.cli", "plugins"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": env_path}, check=True).stdout
    assert "lru" in out and "s4d" in out and "FAILED" in out and "broken" in out
    assert "pip uninstall tp-broken" in out and "pip uninstall tp-raising" in out
    assert cli_main(["layers"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^lru +lru +ring$", out, re.M), out       # layer, the plugin it is from, initializers


# -- found by a bug bash -------------------------------------------------------------------------
def test_entry_point_named_like_a_builtin_cannot_hide_it(tmp_path, monkeypatch):
    # Before: the first entry point of a name won and the other was dropped without a word.
    root = tmp_path / "site"
    make_distribution(root, "tp-shadow", {"tp_shadow": GOOD_PLUGIN.replace("{layer_name}", "shadow_layer")},
                      {"s4d": "tp_shadow"})
    make_distribution(root, "tp-one", {"tp_one": GOOD_PLUGIN.replace("{layer_name}", "one_layer")}, {"twin": "tp_one"})
    make_distribution(root, "tp-two", {"tp_two": GOOD_PLUGIN.replace("{layer_name}", "two_layer")}, {"twin": "tp_two"})
    activate(root, monkeypatch)
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    try:
        lrnnx_zoo.reload_plugins()
        assert {"s4d", "lru"} <= set(lrnnx_zoo.list_layers()) and _plugin("s4d").builtin and _plugin("s4d").ok
        # Session 28: the second plugin of a name was refused, its layers lost, and which one was
        # second followed sys.path's order. Now both load, the second under its distribution's name.
        shadow = _plugin("tp-shadow:s4d")
        assert shadow.ok and shadow.layers == ["shadow_layer"] and "shadow_layer" in lrnnx_zoo.list_layers()
        assert "is also lrnnx-zoo's, so this plugin is loaded as tp-shadow:s4d; rename the entry point" in shadow.notes[0]
        twins = sorted(p.name for p in lrnnx_zoo.list_plugins() if p.name.endswith("twin"))
        assert len(twins) == 2 and all(_plugin(n).ok for n in twins)
        assert {"one_layer", "two_layer"} <= set(lrnnx_zoo.list_layers())
    finally:
        monkeypatch.undo()
        lrnnx_zoo.reload_plugins()


def test_plugin_calling_sys_exit_does_not_stop_the_process(tmp_path, monkeypatch):
    root = tmp_path / "site"
    make_distribution(root, "tp-exit", {"tp_exit": "import sys\nsys.exit('needs CUDA')\n"}, {"exiting": "tp_exit"})
    activate(root, monkeypatch)
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    try:
        lrnnx_zoo.reload_plugins()
        assert "s4d" in lrnnx_zoo.list_layers()
        assert "needs CUDA" in _plugin("exiting").error
    finally:
        monkeypatch.undo()
        lrnnx_zoo.reload_plugins()


def test_hook_mistakes_names_and_stale_clashes(tmp_path):
    import types
    from lrnnx_zoo.registry import PluginError

    typo = types.ModuleType("typo_plugin")
    typo.lrnnx_zoo_register_layer = lrnnx_zoo.hookimpl(lambda registry: None)       # missing "s"
    with pytest.raises(PluginError, match="lrnnx_zoo_register_layer is marked .* not a hook"):
        lrnnx_zoo.register_plugin(typo)
    bare = types.ModuleType("bare_plugin")
    bare.lrnnx_zoo_register_layers = lambda registry: None                          # no decorator
    with pytest.raises(PluginError, match="missing its @lrnnx_zoo.hookimpl decorator"):
        lrnnx_zoo.register_plugin(bare)
    colon = types.ModuleType("colon_plugin")
    colon.lrnnx_zoo_register_layers = lrnnx_zoo.hookimpl(
        lambda registry: registry.add_layer("my:layer", torch.nn.Identity))
    with pytest.raises(PluginError, match="without ':'"):
        lrnnx_zoo.register_plugin(colon)
    # a clash with a built-in name marks the intruder, not the built-in (which loaded as always);
    # unregistering the intruder clears it
    intruder = types.ModuleType("intruder")
    intruder.lrnnx_zoo_register_kernel_backends = lrnnx_zoo.hookimpl(
        lambda registry: registry.add_backend("vandermonde", "torch", lambda *a: None))
    with pytest.warns(UserWarning, match=r"plugin 'intruder' registered, but its names clash: backend "
                                         r"'vandermonde.torch' is also registered by s4d \(built in, which keeps the "
                                         r"name; this plugin's is 'intruder:torch'\).*'<plugin>:<name>'"):
        lrnnx_zoo.register_plugin(intruder)
    try:
        assert _plugin("s4d").ok and not _plugin("intruder").ok
        # the built-in's name still finds the built-in (shipped checkpoints failed to load)
        assert lrnnx_zoo.get_backend("vandermonde", "torch") is lrnnx_zoo.get_backend("vandermonde", "s4d:torch")
        assert lrnnx_zoo.get_backend("vandermonde", "intruder:torch") is not lrnnx_zoo.get_backend("vandermonde", "torch")
    finally:
        lrnnx_zoo.unregister_plugin("intruder")
    assert _plugin("s4d").ok
    assert "s4d" in lrnnx_zoo.list_layers()


def test_plugin_object_is_named_by_its_class():
    class Inline:
        @lrnnx_zoo.hookimpl
        def lrnnx_zoo_register_layers(self, registry):
            registry.add_layer("inline_identity", torch.nn.Identity)

    info = lrnnx_zoo.register_plugin(Inline())
    try:
        assert info.name == "Inline" and info.module.endswith("test_plugin_object_is_named_by_its_class.<locals>.Inline")
        assert "inline_identity" in lrnnx_zoo.list_layers()
    finally:
        lrnnx_zoo.unregister_plugin("Inline")


def test_seed_names_for_the_s4_helpers():
    from lrnnx_zoo.hippo import cauchy_conj
    from lrnnx_zoo.plugins.s4 import cauchy_conj as cauchy_conj_s4, krylov, power
    assert cauchy_conj is cauchy_conj_s4 and callable(krylov) and callable(power)


def test_one_plugin_object_registered_twice_is_refused_and_stays_registered():
    # the second register_plugin failed with pluggy's "already registered under a different name: B"
    # (B being the new name), and its clean-up unregistered the first registration from pluggy: a
    # third name was then accepted, and the object's layers were registered twice over, clashing
    class Twice:
        @lrnnx_zoo.hookimpl
        def lrnnx_zoo_register_layers(self, registry):
            registry.add_layer("twice_identity", torch.nn.Identity)

    plugin = Twice()
    lrnnx_zoo.register_plugin(plugin, "first")
    try:
        for other in ("second", "third"):
            with pytest.raises(lrnnx_zoo.PluginError, match="already registered as 'first'"):
                lrnnx_zoo.register_plugin(plugin, other)
        assert _plugin("first").ok and lrnnx_zoo.registry.get_layer_class("twice_identity") is torch.nn.Identity
    finally:
        lrnnx_zoo.unregister_plugin("first")
    lrnnx_zoo.register_plugin(plugin, "again")                    # free again once unregistered
    lrnnx_zoo.unregister_plugin("again")


# -- plugins that misbehave in other ways --------------------------------------------------------
class _Stop(BaseException):
    """Not an Exception: like asyncio.CancelledError, or pytest's skip() called at import."""


def _module(name, **hooks):
    import types
    module = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(module, hook, lrnnx_zoo.hookimpl(fn))
    return module


def test_a_layer_class_that_is_no_module_is_refused():
    # accepted for having a forward: the model then held a layer whose weights were in no state_dict
    class NotAModule:
        def __init__(self, d_model, **kwargs):
            pass

        def forward(self, x):
            return x

    plugin = _module("not_a_module", lrnnx_zoo_register_layers=lambda registry: registry.add_layer("nam", NotAModule))
    with pytest.raises(lrnnx_zoo.PluginError, match=r"add_layer\('nam', ...\) needs an nn.Module subclass, got "
                                                     r".*NotAModule"):
        lrnnx_zoo.register_plugin(plugin)
    assert "nam" not in lrnnx_zoo.list_layers()


def test_a_hook_raising_a_base_exception_fails_that_plugin_only():
    def stop(registry):
        registry.add_layer("stopped_half", torch.nn.Identity)
        raise _Stop("cancelled")

    with pytest.raises(lrnnx_zoo.PluginError, match=r"plugin 'stopper' failed: _Stop in a hook: cancelled"):
        lrnnx_zoo.register_plugin(_module("stopper", lrnnx_zoo_register_layers=stop))
    assert "stopped_half" not in lrnnx_zoo.list_layers() and "stopper" not in {p.name for p in lrnnx_zoo.list_plugins()}


def test_ctrl_c_inside_a_hook_stops_and_leaves_the_registry_as_it_was():
    # KeyboardInterrupt propagates (the user asked to stop; a plugin hanging in its hook must stay
    # interruptible), but what the hook registered before it was undone, and the name is free again
    def interrupted(registry):
        registry.add_layer("interrupted_half", torch.nn.Identity)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lrnnx_zoo.register_plugin(_module("interrupted", lrnnx_zoo_register_layers=interrupted))
    assert "interrupted_half" not in lrnnx_zoo.list_layers()
    assert "interrupted" not in {p.name for p in lrnnx_zoo.list_plugins()}
    fixed = _module("interrupted", lrnnx_zoo_register_layers=lambda registry: registry.add_layer("fixed", torch.nn.Identity))
    lrnnx_zoo.register_plugin(fixed)
    lrnnx_zoo.unregister_plugin("interrupted")


def test_entry_points_that_raise_base_exceptions_or_name_no_plugin(tmp_path, monkeypatch):
    root = tmp_path / "site"
    make_distribution(root, "tp-stop", {"tp_stop": "raise BaseException('stopped at import')\n"}, {"stop": "tp_stop"})
    make_distribution(root, "tp-const", {"tp_const": "LIMIT = 3\n"}, {"const": "tp_const:LIMIT"})
    make_distribution(root, "tp-none", {"tp_none": "PLUGIN = None\n"}, {"nothing": "tp_none:PLUGIN"})
    make_distribution(root, "tp-attr", {"tp_attr": "x = 1\n"}, {"attr": "tp_attr:missing"})
    activate(root, monkeypatch)
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    try:
        lrnnx_zoo.reload_plugins()                        # raised BaseException: nothing loaded at all
        assert {"lru", "s4d"} <= set(lrnnx_zoo.list_layers())
        assert "BaseException: stopped at import" in _plugin("stop").error
        assert "AttributeError: module 'tp_attr' has no attribute 'missing'" in _plugin("attr").error
        for name, given in (("const", "3"), ("nothing", "None")):       # were listed as ok, registering nothing
            error = _plugin(name).error or ""
            assert re.search(rf"implements none of the hooks .*got {given}", error), error
    finally:
        monkeypatch.undo()
        lrnnx_zoo.reload_plugins()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11+")
def test_a_plugin_constructor_failing_is_named_without_a_wrong_fix():
    # A TypeError from the plugin's own check got "Picky takes (self, d_model, ...)" appended, as if
    # the call's arguments were the problem; other errors came out bare, naming no layer or plugin.
    class Picky(torch.nn.Module):
        def __init__(self, d_model: int, d_state: int = 4):
            super().__init__()
            if d_model % 2:
                raise TypeError("Picky needs an even d_model")
            if d_state > 8:
                raise ValueError("Picky keeps at most 8 states")

    with layers_registered("picky_plugin", picky=Picky):
        with pytest.raises(TypeError, match=r"^Picky needs an even d_model\n") as caught:
            lrnnx_zoo.create_layer("picky", 3)
        assert caught.value.__notes__ == ["(raised while building layer 'picky' of the plugin 'picky_plugin', "
                                          "registered in code)"]
        with pytest.raises(ValueError, match=r"^Picky keeps at most 8 states\n") as caught:
            lrnnx_zoo.create_layer("picky", 4, d_state=9)
        assert "of the plugin 'picky_plugin'" in caught.value.__notes__[0]
        with pytest.raises(TypeError, match=r"create_layer\('picky', ...\): got an unexpected keyword argument "
                                            r"'d_sate'. Picky takes \(self, d_model"):
            lrnnx_zoo.create_layer("picky", 4, d_sate=9)
    with pytest.raises(ValueError) as caught:           # a built-in layer's own message, with no note
        lrnnx_zoo.create_layer("s4d", 4, d_state=3)
    assert not getattr(caught.value, "__notes__", None)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11+")
def test_ctrl_c_during_a_plugin_import_names_the_plugin(tmp_path, monkeypatch):
    # Ctrl-C on a slow or hung plugin import propagates (the user asked to stop), but its traceback
    # showed importlib's frames and no word of which installed plugin was being imported
    root = tmp_path / "site"
    make_distribution(root, "tp-slow", {"tp_slow": "raise KeyboardInterrupt\n"}, {"slow": "tp_slow"})
    activate(root, monkeypatch)
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            lrnnx_zoo.reload_plugins()
        assert caught.value.__notes__ == [
            "(interrupted while importing the lrnnx_zoo plugin 'slow': 'tp_slow' from tp-slow; "
            "LRNNX_ZOO_DISABLE_PLUGIN_AUTOLOAD=1 skips third-party plugins)"]
    finally:
        monkeypatch.undo()
        lrnnx_zoo.reload_plugins()
    assert {"lru", "s4d"} <= set(lrnnx_zoo.list_layers())


# -- a third-party author's journey (plugin audit) -----------------------------------------------
def _starts(line, cells):
    """The offset in ``line`` of each cell, searched left to right."""
    starts, pos = [], 0
    for cell in cells:
        pos = line.index(cell, pos)
        starts.append(pos)
        pos += len(cell)
    return starts


def test_cli_plugins_listing_is_a_table_of_aligned_columns(tmp_path, monkeypatch):
    # The distribution column was not padded, so the version and module columns wandered with it
    # ("built-in 0.1.0  (...)" against "lrnnx-realdiag 0.1.0  (...)"), and a plugin name over 12
    # characters pushed that row's status out of line.
    root = tmp_path / "site"
    make_distribution(root, "tp-a-rather-long-distribution", {"tp_long": GOOD_PLUGIN.replace("{layer_name}", "lng")},
                      {"a_rather_long_plugin_name": "tp_long"}, version="10.20.30")
    make_distribution(root, "tp-broken", {"tp_broken": BROKEN_IMPORT}, {"broken": "tp_broken"})
    with installed(root, monkeypatch):
        plugins = lrnnx_zoo.list_plugins()
        out = subprocess.run([sys.executable, "-m", "lrnnx_zoo.cli", "plugins"], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(root)}, check=True).stdout
    rows = [line for line in out.splitlines() if line and not line.startswith(" ")]
    starts = []
    for p in plugins:
        line = next(r for r in rows if r.split()[0] == p.name)
        origin = "built-in" if p.builtin else p.distribution
        starts.append(_starts(line, [p.name, "ok" if p.ok else "FAILED", origin, p.version, p.module]))
    for column in zip(*starts):
        assert len(set(column)) == 1, out


EXTRAS_FOR_S4D = '''
import lrnnx_zoo
from lrnnx_zoo.kernels.vandermonde import vandermonde_torch
from lrnnx_zoo.plugins.s4d import init_lin


@lrnnx_zoo.hookimpl
def lrnnx_zoo_register_initializers(registry):
    registry.add_initializer("s4d", "slowlin", init_lin)


@lrnnx_zoo.hookimpl
def lrnnx_zoo_register_kernel_backends(registry):
    registry.add_backend("vandermonde", "chunked", vandermonde_torch)
'''


def _ema_dist(where, dist="tp-good", plugin="ema", version="1.0.0"):
    """A distribution whose plugin ``plugin`` registers the layer 'ema' (GOOD_PLUGIN)."""
    module = dist.lower().replace("-", "_")
    return make_distribution(where, dist, {module: GOOD_PLUGIN.replace("{layer_name}", "ema")}, {plugin: module}, version)


def _extras_dist(where, dist="tp-extras", plugin="extras", version="1.0.0"):
    """A distribution whose plugin ``plugin`` adds s4d's initializer 'slowlin' and the Vandermonde backend 'chunked'."""
    module = dist.replace("-", "_")
    return make_distribution(where, dist, {module: EXTRAS_FOR_S4D}, {plugin: module}, version)


def test_cli_layers_listing_aligns_and_names_who_added_an_initializer(tmp_path, monkeypatch):
    # "s4d from s4d initializers: inv, legs, lin, random, real, slowlin": nothing said slowlin came
    # from a third-party plugin (a checkpoint using it needs that plugin), and the initializers
    # column moved with the owner's name and with layer names over 10 characters.
    root = tmp_path / "site"
    make_distribution(root, "tp-long", {"tp_long": GOOD_PLUGIN.replace("{layer_name}", "a_long_layer_name")},
                      {"longowner": "tp_long"})
    make_distribution(root, "tp-init", {"tp_init": EXTRAS_FOR_S4D}, {"extra_inits": "tp_init"})
    activate(root, monkeypatch)
    out = subprocess.run([sys.executable, "-m", "lrnnx_zoo.cli", "layers"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(root)}, check=True).stdout
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert "slowlin (extra_inits)" in rows["s4d"] and "lin," in rows["s4d"], out
    cells = {"s4d": ["s4d", "s4d", "inv"], "lru": ["lru", "lru", "ring"],
             "a_long_layer_name": ["a_long_layer_name", "longowner", "flat"]}
    starts = [_starts(rows[name], c) for name, c in cells.items()]
    for column in zip(*starts):
        assert len(set(column)) == 1, out


def _small_config(layer, d_output=2, **layer_kwargs):
    """A one-block model config of ``layer`` with d_state 4 and ``layer_kwargs`` (init=, backend=, ...)."""
    return lrnnx_zoo.ModelConfig(layer=layer, d_input=1, d_output=d_output, d_model=4, n_layers=1,
                                 layer_kwargs={"d_state": 4, **layer_kwargs})


def _save_ema_model(folder):
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer="ema", d_input=1, d_output=2, d_model=4, n_layers=1))
    model.save_pretrained(folder)
    return model


def test_loading_with_another_version_of_the_plugin_warns(tmp_path, monkeypatch):
    # config.json records the plugin's distribution and version, but a checkpoint saved with
    # tp-good 1.0.0 loaded under tp-good 2.0.0 without a word: a new release that changed the
    # layer's parametrisation gives other outputs from the same weights.
    with installed(_ema_dist(tmp_path / "v1"), monkeypatch):
        _save_ema_model(tmp_path / "ck")
        with warnings.catch_warnings():
            warnings.simplefilter("error", PluginVersionWarning)
            lrnnx_zoo.from_pretrained(tmp_path / "ck")                   # the same version: silent
        reinstall(monkeypatch, _ema_dist(tmp_path / "v2", version="2.0.0"))
        assert _plugin("ema").version == "2.0.0"
        with pytest.warns(PluginVersionWarning) as record:
            model = lrnnx_zoo.from_pretrained(tmp_path / "ck")
        msg = str(record[0].message)
        assert "tp-good 1.0.0" in msg and "tp-good 2.0.0 is installed" in msg, msg
        assert record[0].filename == __file__                           # the caller's line, not ours
        with pytest.warns(PluginVersionWarning) as record:              # through the classmethod too
            lrnnx_zoo.SequenceModel.from_pretrained(tmp_path / "ck")
        assert record[0].filename == __file__ and str(record[0].message).startswith(str(tmp_path / "ck"))
        assert "pip install tp-good==1.0.0" in msg and "save_pretrained" in msg, msg
        assert model(torch.randn(1, 5, 1)).shape == (1, 5, 2)            # a warning, not a refusal


def test_weights_a_new_plugin_release_renamed_are_blamed_on_the_release(tmp_path, monkeypatch):
    # A release renaming the layer's parameter (logit -> log_decay) made the checkpoint unloadable, and
    # the error said "the weights and the config come from different models; re-save them together",
    # though the version change was the cause (the warning beside it said so). A plugin fuzzer.
    with installed(_ema_dist(tmp_path / "v1"), monkeypatch):
        _save_ema_model(tmp_path / "ck")
        renamed = tmp_path / "v2"
        make_distribution(renamed, "tp-good", {"tp_good": GOOD_PLUGIN.replace("{layer_name}", "ema")
                                               .replace("self.logit", "self.log_decay")}, {"ema": "tp_good"}, "2.0.0")
        reinstall(monkeypatch, renamed)
        with pytest.warns(PluginVersionWarning), pytest.raises(lrnnx_zoo.CheckpointError) as caught:
            lrnnx_zoo.from_pretrained(tmp_path / "ck")
        message = str(caught.value)
        assert "missing keys ['blocks.0.layer.log_decay']" in message, message
        assert re.search(r"The plugin changed since the save, the likely cause: the checkpoint was saved with plugin "
                         r"'ema' from tp-good 1.0.0, and tp-good 2.0.0 is installed.* pip install tp-good==1.0.0",
                         message), message
        assert "different models" not in message


def test_a_distribution_name_spelled_another_way_is_the_same_release(tmp_path, monkeypatch):
    # pip reads 'TP_Good' and 'tp-good' as one project (PEP 503), but the recorded distribution was
    # compared as written: the same release re-spelled warned that another plugin now builds the layer.
    with installed(_ema_dist(tmp_path / "v1"), monkeypatch):
        _save_ema_model(tmp_path / "ck")
        reinstall(monkeypatch, _ema_dist(tmp_path / "v1b", "TP_Good"))
        assert _plugin("ema").distribution == "TP_Good"
        with warnings.catch_warnings():
            warnings.simplefilter("error", PluginVersionWarning)
            lrnnx_zoo.from_pretrained(tmp_path / "ck")


def test_loading_a_layer_now_provided_by_another_plugin_warns(tmp_path, monkeypatch):
    with installed(_ema_dist(tmp_path / "v1"), monkeypatch):
        _save_ema_model(tmp_path / "ck")
        # tp-good uninstalled, a fork installed
        reinstall(monkeypatch, _ema_dist(tmp_path / "fork", "tp-fork", "ema_fork", "0.1.0"))
        with pytest.warns(PluginVersionWarning, match=r"from plugin 'ema' \(tp-good 1.0.0\), and it is now built by "
                                                      r"plugin 'ema_fork' from tp-fork 0.1.0.*pip install tp-good==1.0.0"):
            lrnnx_zoo.from_pretrained(tmp_path / "ck")


def test_a_checkpoint_names_the_plugin_of_a_third_party_initializer_or_backend(tmp_path, monkeypatch):
    # An s4d model built with init="slowlin", backend="chunked" from a third-party plugin recorded only
    # plugin s4d (lrnnx-zoo); without the plugin, loading said "unknown vandermonde backend 'chunked';
    # available: auto, keops, torch" and nothing about what to install.
    config = _small_config("s4d", init="slowlin", backend="extras:chunked")
    with installed(_extras_dist(tmp_path / "site"), monkeypatch):
        lrnnx_zoo.SequenceModel(config).save_pretrained(tmp_path / "ck")
        saved = json.loads((tmp_path / "ck" / "config.json").read_text())
        assert saved["extra_plugins"] == [{"name": "extras", "distribution": "tp-extras", "version": "1.0.0",
                                           "names": ["s4d.slowlin", "vandermonde.chunked"]}]
        card = (tmp_path / "ck" / "README.md").read_text()
        assert "It uses `s4d.slowlin`, `vandermonde.chunked` from the plugin `extras` (tp-extras 1.0.0)" in card
        lrnnx_zoo.SequenceModel(_small_config("s4d")).save_pretrained(tmp_path / "plain")
        assert "extra_plugins" not in (tmp_path / "plain" / "config.json").read_text()   # as before
        reinstall(monkeypatch)                                  # pip uninstall tp-extras
        with pytest.raises(lrnnx_zoo.CheckpointError) as err:
            lrnnx_zoo.from_pretrained(tmp_path / "ck")
        msg = str(err.value)
        assert re.search(r"unknown (initializer for 's4d' 'slowlin'|vandermonde backend 'extras:chunked')", msg), msg
        assert "s4d.slowlin, vandermonde.chunked from plugin 'extras' (tp-extras 1.0.0)" in msg, msg
        assert "pip install tp-extras" in msg, msg
        reinstall(monkeypatch, _extras_dist(tmp_path / "v2", version="2.0.0"))
        with pytest.warns(PluginVersionWarning, match=r"tp-extras 1.0.0, and tp-extras 2.0.0 is installed"):
            lrnnx_zoo.from_pretrained(tmp_path / "ck")


def test_a_plugin_missing_an_optional_dependency_says_which_module_to_install(tmp_path, monkeypatch):
    # The error said "No module named 'tp_fast_scan' -- to fix it, update or reinstall tp-needs, or
    # uninstall it": reinstalling does not bring an optional dependency, so the way out offered
    # first did not work; the module to install is the fix.
    root = tmp_path / "site"
    make_distribution(root, "tp-needs", {"tp_needs": "import lrnnx_zoo\nimport tp_fast_scan.kernels\n"},
                      {"needs": "tp_needs"})
    _ema_dist(root)
    make_distribution(root, "tp-gone", {}, {"gone": "tp_gone_module"})       # its own module is missing
    with installed(root, monkeypatch):
        first = _plugin("needs").error.splitlines()[0]
        assert "tp-needs needs the module 'tp_fast_scan', which is not installed: install it" in first, first
        assert "pip uninstall tp-needs" in first and DISABLE_AUTOLOAD_ENV in first, first
        assert "reinstall tp-gone" in _plugin("gone").error          # a broken install: reinstalling is the fix
        assert _plugin("ema").ok and "ema" in lrnnx_zoo.list_layers()   # the others load


def test_a_checkpoint_names_the_plugin_of_an_initializer_its_kernel_takes(tmp_path, monkeypatch):
    # fftconv builds an s4d kernel, which takes s4d's initializers: a model built with a third-party
    # init="slowlin" recorded no extra_plugins (only fftconv's own table was searched), and without
    # the plugin loading said "unknown initializer for 's4d' 'slowlin'" and nothing about what to install.
    config = _small_config("fftconv", init="slowlin")
    with installed(_extras_dist(tmp_path / "site"), monkeypatch):
        lrnnx_zoo.SequenceModel(config).save_pretrained(tmp_path / "ck")
        saved = json.loads((tmp_path / "ck" / "config.json").read_text())
        assert saved.get("extra_plugins") == [{"name": "extras", "distribution": "tp-extras", "version": "1.0.0",
                                               "names": ["s4d.slowlin"]}], saved
        reinstall(monkeypatch)                                  # pip uninstall tp-extras
        with pytest.raises(lrnnx_zoo.CheckpointError, match=r"s4d.slowlin from plugin 'extras' \(tp-extras 1.0.0\), "
                                                            r"which is not installed: pip install tp-extras"):
            lrnnx_zoo.from_pretrained(tmp_path / "ck")


#: GOOD_PLUGIN's layer as 'tagged', taking a free-text ``label`` (kept, used for nothing the registry
#: provides) and a Vandermonde ``backend`` it looks up, as a layer of a plugin's own finds one.
TAGGED_PLUGIN = GOOD_PLUGIN.replace("{layer_name}", "tagged").replace(
    'def __init__(self, d_model, d_state=1, decay=0.9):\n        super().__init__("no_discretization")',
    'def __init__(self, d_model, d_state=1, decay=0.9, label="", backend="auto"):\n'
    '        super().__init__("no_discretization")\n'
    '        self.label, self.vandermonde = label, lrnnx_zoo.get_backend("vandermonde", backend)')


def test_a_checkpoint_records_only_the_plugins_whose_names_its_layer_resolved(tmp_path, monkeypatch):
    # Every string among the layer's keyword arguments was matched against every plugin's backends and
    # initializers: a free-text label="slowlin" (or "chunked") recorded tp-extras, whose s4d initializer
    # and Vandermonde backend this model never used (its card said it needs them, and a new tp-extras
    # release warned on every load).
    from lrnnx_zoo.hub_save import checkpoint_config
    root = make_distribution(tmp_path / "site", "tp-tagged", {"tp_tagged": TAGGED_PLUGIN}, {"tagged": "tp_tagged"})
    _extras_dist(root)
    with installed(root, monkeypatch):
        for label in ("slowlin", "chunked", "extras:chunked"):
            model = lrnnx_zoo.SequenceModel(_small_config("tagged", label=label))
            assert "extra_plugins" not in checkpoint_config(model), label
        used = lrnnx_zoo.SequenceModel(_small_config("tagged", label="slowlin", backend="chunked"))
        recorded = [{"name": "extras", "distribution": "tp-extras", "version": "1.0.0",
                     "names": ["vandermonde.chunked"]}]
        assert checkpoint_config(used)["extra_plugins"] == recorded
        assert checkpoint_config(used.at_rate(1.0))["extra_plugins"] == recorded      # a copy keeps it


def test_loading_with_an_extra_now_from_another_plugin_warns(tmp_path, monkeypatch):
    # The layer's plugin was compared with whoever provides the layer now (a fork warns), but an
    # extra plugin only with a plugin of its recorded name: tp-extras uninstalled and a fork
    # registering the same initializer and backend under another name loaded without a word.
    config = _small_config("s4d", init="slowlin", backend="chunked")
    with installed(_extras_dist(tmp_path / "site"), monkeypatch):
        lrnnx_zoo.SequenceModel(config).save_pretrained(tmp_path / "ck")
        # tp-extras uninstalled, a fork installed
        reinstall(monkeypatch, _extras_dist(tmp_path / "fork", "tp-fork", "extras_fork", "0.1.0"))
        with pytest.warns(PluginVersionWarning, match=r"s4d.slowlin, vandermonde.chunked from plugin 'extras' "
                                                      r"\(tp-extras 1.0.0\), and it is now built by plugin 'extras_fork' "
                                                      r"from tp-fork 0.1.0.*pip install tp-extras==1.0.0"):
            lrnnx_zoo.from_pretrained(tmp_path / "ck")


def _s4d_slowlin_plugin(name):
    """A module registering the initializer s4d.slowlin, as plugin ``name`` would."""
    from lrnnx_zoo.plugins.s4d import init_lin
    module = types.ModuleType(name)

    @lrnnx_zoo.hookimpl
    def lrnnx_zoo_register_initializers(registry):
        registry.add_initializer("s4d", "slowlin", init_lin)
    module.lrnnx_zoo_register_initializers = lrnnx_zoo_register_initializers
    return module


def test_a_clashing_extra_plugin_is_not_said_to_have_failed_to_load(tmp_path):
    # The recorded plugin was loaded, but another one now registers the same initializer: the
    # error said "which is installed but failed to load: duplicate names: ...", which it had not.
    config = _small_config("s4d", init="slowlin", d_output=1)
    lrnnx_zoo.register_plugin(_s4d_slowlin_plugin("tp_slowlin"), "extras")
    try:
        lrnnx_zoo.SequenceModel(config).save_pretrained(tmp_path / "ck")
        with pytest.warns(UserWarning, match="also registered by extras"):
            lrnnx_zoo.register_plugin(_s4d_slowlin_plugin("tp_other"), "clash")
        with pytest.raises(lrnnx_zoo.CheckpointError) as err:
            lrnnx_zoo.from_pretrained(tmp_path / "ck")
    finally:
        for name in {"extras", "clash"} & {p.name for p in lrnnx_zoo.list_plugins()}:
            lrnnx_zoo.unregister_plugin(name)
    msg = str(err.value)
    assert "from plugin 'extras', which is loaded, but initializer 's4d.slowlin' is also registered by clash" in msg
    assert "failed to load" not in msg, msg


@pytest.mark.parametrize("names", [5, "s4d.slowlin", {"s4d": "slowlin"}])
def test_a_hand_edited_extra_plugins_entry_is_not_refused(tmp_path, names):
    # extra_plugins entries are read leniently, but '"names": 5' made from_pretrained raise
    # "TypeError: 'int' object is not iterable" (and a str was listed letter by letter).
    config = _small_config("s4d", init="slowlin", d_output=1)
    lrnnx_zoo.register_plugin(_s4d_slowlin_plugin("tp_slowlin"), "extras")
    try:
        folder = lrnnx_zoo.SequenceModel(config).save_pretrained(tmp_path / "ck")
    finally:
        lrnnx_zoo.unregister_plugin("extras")
    saved = json.loads((folder / "config.json").read_text())
    saved["extra_plugins"][0]["names"] = names
    (folder / "config.json").write_text(json.dumps(saved))
    with pytest.raises(lrnnx_zoo.CheckpointError) as err:             # the plugin is gone: a hint, not a crash
        lrnnx_zoo.from_pretrained(folder)
    assert "It was saved with initializers or backends from plugin 'extras', which is not loaded" in str(err.value)
    saved["model"]["layer_kwargs"]["init"] = "lin"                   # buildable: it loads
    (folder / "config.json").write_text(json.dumps(saved))
    assert lrnnx_zoo.from_pretrained(folder) is not None


# -- mistakes a plugin author makes (session 20's audit) ------------------------------------------

def _undecorated_module(name, **hooks):
    module = types.ModuleType(name)
    for attr, fn in hooks.items():      # as given: decorated, or not, by the test
        setattr(module, attr, fn)
    return module


def test_a_star_import_of_a_builtin_family_is_refused_and_s4d_keeps_working():
    # "from lrnnx_zoo.plugins.s4d import *" brought s4d's hooks along: they registered every s4d name
    # a second time under the new plugin, and create_layer("s4d", 8) became ambiguous for everyone.
    from lrnnx_zoo.plugins import s4d
    star = _undecorated_module("tp_star")
    exec("from lrnnx_zoo.plugins.s4d import *", star.__dict__)
    assert not hasattr(star, "lrnnx_zoo_register_layers")          # __all__ keeps the hooks home
    star.lrnnx_zoo_register_layers = s4d.lrnnx_zoo_register_layers  # imported by name: refused, with the why
    with pytest.raises(lrnnx_zoo.PluginError, match=r"plugin 's4d''s hook \(lrnnx_zoo.plugins.s4d."
                                                    r"lrnnx_zoo_register_layers\), imported into this one"):
        lrnnx_zoo.register_plugin(star, "star")
    assert lrnnx_zoo.create_layer("s4d", 8, d_state=4)(torch.randn(1, 5, 8)).shape == (1, 5, 8)


def test_a_name_registered_twice_by_one_plugin_is_refused_when_it_loads():
    # It clashed with itself: the warning named no other plugin ("also registered by ;") and even the
    # qualified name 'twice:twice' was ambiguous.
    from lrnnx_zoo.plugins.s4d import S4D

    @lrnnx_zoo.hookimpl
    def lrnnx_zoo_register_layers(registry):
        registry.add_layer("twice", S4D)
        registry.add_layer("twice", S4D)
    with pytest.raises(lrnnx_zoo.PluginError, match="layer 'twice' is registered twice by plugin 'twice'"):
        lrnnx_zoo.register_plugin(_undecorated_module("tp_twice", lrnnx_zoo_register_layers=lrnnx_zoo_register_layers), "twice")
    assert "twice" not in lrnnx_zoo.list_layers()


@pytest.mark.parametrize("bad", [123, None, ("a", "b"), " s4d ", "bad\nlayer", "tab\tname", "bell\x07"])
def test_a_name_that_is_no_string_gets_the_names_message(bad):
    # session 28 (a plugin fuzzer): ' s4d ' was accepted and listed like the built-in s4d, and a name
    # with a newline broke `lrnnx-zoo layers`' one name per line
    from lrnnx_zoo.plugins.s4d import S4D

    @lrnnx_zoo.hookimpl
    def lrnnx_zoo_register_layers(registry):
        registry.add_layer(bad, S4D)
    with pytest.raises(lrnnx_zoo.PluginError, match=r"names must be non-empty strings without ':'.*got "
                                                    + re.escape(repr(bad))):
        lrnnx_zoo.register_plugin(_undecorated_module("tp_intname", lrnnx_zoo_register_layers=lrnnx_zoo_register_layers),
                                  "intname")


def test_a_plugin_class_and_a_hook_wrapper_are_refused_with_the_fix():
    from lrnnx_zoo.plugins.s4d import S4D

    class Plugin:
        @lrnnx_zoo.hookimpl
        def lrnnx_zoo_register_layers(self, registry):
            registry.add_layer("klass", S4D)
    # the class itself: its hook was called with the registry as self ("missing 1 required positional
    # argument: 'registry'")
    with pytest.raises(lrnnx_zoo.PluginError, match=r"is the class Plugin, .* at an instance \(plugin = Plugin\(\)"):
        lrnnx_zoo.register_plugin(Plugin, "klass")
    info = lrnnx_zoo.register_plugin(Plugin(), "klass")               # an instance works
    try:
        assert info.ok and lrnnx_zoo.create_layer("klass", 4, d_state=2)(torch.randn(1, 3, 4)).shape == (1, 3, 4)
    finally:
        lrnnx_zoo.unregister_plugin("klass")

    @lrnnx_zoo.hookimpl(wrapper=True)
    def lrnnx_zoo_register_layers(registry):     # a generator: calling it registered nothing, silently
        registry.add_layer("wrapped", S4D)
        return (yield)
    with pytest.raises(lrnnx_zoo.PluginError, match=r"lrnnx_zoo_register_layers is a hook wrapper"):
        lrnnx_zoo.register_plugin(_undecorated_module("tp_wrapped", lrnnx_zoo_register_layers=lrnnx_zoo_register_layers),
                                  "wrapped")


def test_a_third_party_reusing_a_builtin_name_is_the_one_reported(tmp_path, monkeypatch):
    # A plugin registering "s4d" marked the built-in s4d FAILED too (and `plugins --strict` blamed it),
    # and every unknown-name error listed s4d among the "plugins that failed to load".
    root = make_distribution(tmp_path / "site", "tp-dupe", {"tp_dupe": GOOD_PLUGIN.replace("{layer_name}", "s4d")},
                             {"dupe": "tp_dupe"})
    activate(root, monkeypatch)
    lrnnx_zoo.reload_plugins()
    try:
        assert _plugin("s4d").ok and _plugin("s4d").builtin
        dupe = _plugin("dupe")
        assert not dupe.ok and "layer 's4d' is also registered by s4d (built in, which keeps the name; this " \
                               "plugin's is 'dupe:s4d')" in dupe.error
        # The built-in keeps its name (an ambiguity error here made every shipped s4d checkpoint fail to
        # load, and `lrnnx-zoo train` crash); the intruder's layer is one qualified name away.
        assert type(lrnnx_zoo.create_layer("s4d", 8, d_state=4)).__module__ == "lrnnx_zoo.plugins.s4d"
        assert lrnnx_zoo.create_layer("s4d:s4d", 8, d_state=4)(torch.randn(1, 3, 8)).shape == (1, 3, 8)
        assert type(lrnnx_zoo.create_layer("dupe:s4d", 8)).__module__ == "tp_dupe"
        assert lrnnx_zoo.from_pretrained("forecast-sunspots-s4d") is not None
        with pytest.raises(RegistryError) as err:
            lrnnx_zoo.create_layer("lstm", 8)
        assert "failed to load" not in str(err.value)
    finally:
        monkeypatch.undo()
        lrnnx_zoo.reload_plugins()


def test_an_initializer_or_backend_nothing_looks_up_is_noted(capsys):
    # add_initializer("S4D", ...) and add_backend("vandermond", ...) loaded as ok and were never used.
    from lrnnx_zoo.plugins.s4d import init_lin
    from lrnnx_zoo.cli import main

    @lrnnx_zoo.hookimpl
    def lrnnx_zoo_register_initializers(registry):
        registry.add_initializer("S4D", "typo", init_lin)

    @lrnnx_zoo.hookimpl
    def lrnnx_zoo_register_kernel_backends(registry):
        registry.add_backend("vandermond", "fast", lambda *a: None)
    plugin = _undecorated_module("tp_typos", lrnnx_zoo_register_initializers=lrnnx_zoo_register_initializers,
                                 lrnnx_zoo_register_kernel_backends=lrnnx_zoo_register_kernel_backends)
    with pytest.warns(UserWarning) as caught:
        info = lrnnx_zoo.register_plugin(plugin, "typos")
    try:
        notes = [str(w.message) for w in caught]
        assert any("initializer 'S4D.typo' is for layer 'S4D', which no loaded plugin registers" in n for n in notes)
        assert any("backends of kind 'vandermond' are looked up by no built-in layer" in n for n in notes)
        assert info.ok and len(info.notes) == 2                    # loaded: its layer may come from elsewhere
        main(["plugins"])
        assert "note:         initializer 'S4D.typo'" in capsys.readouterr().out
    finally:
        lrnnx_zoo.unregister_plugin("typos")
    assert not any(p.notes for p in lrnnx_zoo.list_plugins())      # the built-ins have none

    # A plugin with layers of its own may look up a kind of its own: no note (it warned at every load)
    @lrnnx_zoo.hookimpl
    def lrnnx_zoo_register_layers(registry):
        registry.add_layer("with_own_kind", torch.nn.Identity)
    own = _undecorated_module("tp_own_kind", lrnnx_zoo_register_layers=lrnnx_zoo_register_layers,
                              lrnnx_zoo_register_kernel_backends=lrnnx_zoo_register_kernel_backends)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = lrnnx_zoo.register_plugin(own, "own_kind")
    try:
        assert info.ok and info.notes == []
    finally:
        lrnnx_zoo.unregister_plugin("own_kind")


def test_reload_plugins_finds_an_editable_install_made_while_running(tmp_path, monkeypatch):
    # `pip install -e` puts the source folder on the path through a .pth file, which Python reads
    # at start-up only: reload_plugins() found the entry point and failed to import the plugin
    # ("No module named 'tp_editable' -- ... update or reinstall"), the fix the error itself offered.
    import site
    site_dir, src = tmp_path / "site-packages", tmp_path / "src"
    make_distribution(src, "tp-editable", {"tp_editable": GOOD_PLUGIN.replace("{layer_name}", "edited")},
                      {"editable": "tp_editable"})
    # the dist-info lives in site-packages, the module stays in the source folder
    (src / "tp_editable-0.1.0.dist-info").rename(site_dir.mkdir() or site_dir / "tp_editable-0.1.0.dist-info")
    (site_dir / "__editable__.tp_editable-0.1.0.pth").write_text(f"{src}\n")
    activate(site_dir, monkeypatch)
    monkeypatch.setattr(site, "getsitepackages", lambda: [str(site_dir)])
    monkeypatch.setattr(site, "ENABLE_USER_SITE", False)
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    try:
        lrnnx_zoo.reload_plugins()
        assert _plugin("editable").ok, _plugin("editable").error
        assert "edited" in lrnnx_zoo.list_layers() and str(src) in sys.path
        lrnnx_zoo.reload_plugins()                     # read once: the path is not added again
        assert sys.path.count(str(src)) == 1 and _plugin("editable").ok
    finally:
        monkeypatch.undo()
        lrnnx_zoo.reload_plugins()


def test_initializers_of_an_unknown_layer_name_the_layers_that_have_some():
    # Session 28 (an API fuzzer): a misspelt layer said "unknown initializer for 's4dd' 'legs';
    # available: none", as if s4dd existed without initializers.
    from lrnnx_zoo.registry import RegistryError
    with pytest.raises(RegistryError, match=r"^no initializers for layer 's4dd'; layers with initializers: .*'s4d'"):
        lrnnx_zoo.get_initializer("s4dd", "legs")
    assert callable(lrnnx_zoo.get_initializer("s4d", "legs"))
