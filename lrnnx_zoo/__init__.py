"""lrnnx-zoo: linear recurrent and state-space sequence layers, as plugins, with streaming export.

Importing the package compiles nothing and loads no plugin; the registry discovers plugins on
first use (``list_layers()``, ``create_layer(...)``).
"""

__version__ = "0.1.0"

from .hookspecs import hookimpl, hookspec
from .base import LRNN, LTI_LRNN
from .registry import (PluginError, PluginInfo, RegistryError, create_layer, get_backend,
                       get_initializer, list_backends, list_initializers, list_layers, list_plugins,
                       register_plugin, reload_plugins, unregister_plugin)
from .models import ModelConfig, SequenceModel
from .hub import CheckpointError, from_pretrained, list_models
from .hub_save import HubPublishError
from . import convolution, discretization, step_forms

__all__ = [
    "__version__", "hookimpl", "hookspec", "LRNN", "LTI_LRNN", "ModelConfig", "SequenceModel",
    "PluginError", "PluginInfo", "RegistryError", "create_layer", "get_backend", "get_initializer",
    "list_backends", "list_initializers", "list_layers", "list_plugins", "register_plugin",
    "reload_plugins", "unregister_plugin", "convolution", "discretization", "step_forms",
    "CheckpointError", "HubPublishError", "from_pretrained", "list_models",
]
