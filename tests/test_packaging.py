"""What an installed lrnnx-zoo relies on: the files its wheel ships, and the oldest releases of its
dependencies that pyproject.toml admits (each fix here was found running the suite against them)."""

from __future__ import annotations

import re

import pluggy
import pytest

import lrnnx_zoo
from lrnnx_zoo.registry import DISABLE_AUTOLOAD_ENV
from plugin_fixtures import activate, make_distribution


# -- the oldest dependency releases the floors admit ---------------------------------------------
def test_an_entry_point_naming_none_is_reported_without_registering_none(tmp_path, monkeypatch):
    # pluggy 1.3-1.6 take register(None, name) as blocking that name; unregistering the None plugin
    # then failed an assertion, so with one such third-party entry point reload_plugins() raised
    # "AssertionError: one of name or plugin needs to be specified" and no family loaded at all.
    # pluggy 1.7 ignores a None plugin, so the spy stands in for the older releases.
    registered = []
    real_register = pluggy.PluginManager.register

    def register(self, plugin, name=None):
        registered.append((name, plugin))
        return real_register(self, plugin, name)

    monkeypatch.setattr(pluggy.PluginManager, "register", register)
    root = tmp_path / "site"
    make_distribution(root, "tp-none", {"tp_none": "PLUGIN = None\n"}, {"nothing": "tp_none:PLUGIN"})
    activate(root, monkeypatch)
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    try:
        lrnnx_zoo.reload_plugins()
        assert {"lru", "s4d"} <= set(lrnnx_zoo.list_layers())
        error = {p.name: p for p in lrnnx_zoo.list_plugins()}["nothing"].error or ""
        assert re.search(r"implements none of the hooks .*got None", error), error
        assert [name for name, plugin in registered if plugin is None] == []
    finally:
        monkeypatch.undo()
        lrnnx_zoo.reload_plugins()
