"""The three hooks a plugin implements. Built-in families use them exactly as third parties do.

A plugin is a module (or object) exposed under the entry point group ``lrnnx_zoo``::

    [project.entry-points.lrnnx_zoo]
    my_family = "my_package.lrnnx_plugin"

with functions marked ``@lrnnx_zoo.hookimpl``. Inside each hook the plugin calls the registry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .registry import Registry

PROJECT = "lrnnx_zoo"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def lrnnx_zoo_register_layers(registry: "Registry") -> None:
    """Register layer classes: ``registry.add_layer(name, cls)``."""


@hookspec
def lrnnx_zoo_register_initializers(registry: "Registry") -> None:
    """Register initializers: ``registry.add_initializer(layer, name, fn)``."""


@hookspec
def lrnnx_zoo_register_kernel_backends(registry: "Registry") -> None:
    """Register kernel backends: ``registry.add_backend(kind, name, fn)`` (kind e.g. "cauchy",
    "vandermonde", "conv")."""
