"""lrnnx-zoo: linear recurrent and state-space sequence layers, as plugins, with streaming export.

Importing the package imports nothing else (not torch): each name below loads its module on first
use, so ``lrnnx-zoo --version`` and ``--help`` answer without torch. The registry discovers plugins
on first use too (``list_layers()``, ``create_layer(...)``).

Start here:
    create_layer("s4d", d_model=64, d_state=64)    a registered layer: x (B, L, H) -> y (B, L, H)
    list_layers(), list_plugins()                  what is installed (and any plugin that failed)
    SequenceModel(ModelConfig(layer=..., ...))     encoder -> residual blocks -> decoder
    from_pretrained(name_or_path), list_models()   Hub-format checkpoints (config.json + safetensors)
    lrnnx_zoo.export                               step graphs for ONNX Runtime / TorchScript / torch.export
"""

__version__ = "0.1.0"

import importlib
import importlib.util
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ imports each on first use
    from . import convolution, discretization, export, hippo, plugins, step_forms, testing, training
    from .base import LRNN, LTI_LRNN
    from .hookspecs import hookimpl, hookspec
    from .hub import CheckpointError, from_pretrained, list_models
    from .hub_save import HubPublishError
    from .models import ModelConfig, SequenceModel
    from .registry import (PluginError, PluginInfo, RegistryError, create_layer, get_backend,
                           get_initializer, list_backends, list_initializers, list_layers, list_plugins,
                           register_plugin, reload_plugins, unregister_plugin)

#: Each public name and the submodule that defines it.
_HOME = {
    "hookimpl": "hookspecs", "hookspec": "hookspecs", "LRNN": "base", "LTI_LRNN": "base",
    "ModelConfig": "models", "SequenceModel": "models", "CheckpointError": "hub", "from_pretrained": "hub",
    "list_models": "hub", "HubPublishError": "hub_save",
    **{name: "registry" for name in (
        "PluginError", "PluginInfo", "RegistryError", "create_layer", "get_backend", "get_initializer",
        "list_backends", "list_initializers", "list_layers", "list_plugins", "register_plugin",
        "reload_plugins", "unregister_plugin")},
}

__all__ = [
    "__version__", "hookimpl", "hookspec", "LRNN", "LTI_LRNN", "ModelConfig", "SequenceModel",
    "PluginError", "PluginInfo", "RegistryError", "create_layer", "get_backend", "get_initializer",
    "list_backends", "list_initializers", "list_layers", "list_plugins", "register_plugin",
    "reload_plugins", "unregister_plugin", "convolution", "discretization", "step_forms",
    "CheckpointError", "HubPublishError", "from_pretrained", "list_models",
]


#: Submodules the README names as public API (hippo's HiPPO helpers, the convolution functions, the
#: step forms' split_poles, training.train, testing's contract kit), listed by dir() and imported on first use.
_PUBLIC_MODULES = ("convolution", "export", "hippo", "plugins", "step_forms", "testing", "training")


def __getattr__(name: str) -> object:
    # A public name or submodule on first use. The package imported base, registry, models and hub
    # (torch, pluggy: 1.3-1.8 s) on `import lrnnx_zoo`, which every `lrnnx-zoo` command paid before
    # argparse ran, --version and --help included. A submodule the package used to import for
    # itself (lrnnx_zoo.hub, lrnnx_zoo.wording) still resolves after a bare `import lrnnx_zoo`.
    home = _HOME.get(name)
    if home is not None:
        value = getattr(importlib.import_module(f".{home}", __name__), name)
        globals()[name] = value          # later lookups skip this function
        return value
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")     # sets the package attribute too
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names (``__all__``), the public submodules (``_PUBLIC_MODULES``, imported on first
    use) and the module's dunders: the submodules the package imports for itself (folder_swap, wording,
    hub_save, ...) stay reachable but are not advertised."""
    return sorted(set(__all__) | set(_PUBLIC_MODULES) | {n for n in globals() if n.startswith("__")})


# torch already loaded (`import torch` first): register the library's torch.library operators, as
# `import lrnnx_zoo` did while it imported torch itself, so that torch.export.load of a program
# exported from a model finds them (lrnnx_zoo.operators). Without torch, nothing: the CLI starts fast.
if "torch" in sys.modules:
    importlib.import_module(f"{__name__}.operators")
