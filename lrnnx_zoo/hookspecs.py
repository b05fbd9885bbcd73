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
    """Register kernel backends: ``registry.add_backend(kind, name, fn)``. The kinds the built-in
    layers look up, by the name given as their ``backend=`` argument:

    - ``"vandermonde"`` (s4d, fftconv's s4d/lru kernels): ``fn(v, log_lam, L, conj=True)``,
      v and log_lam (..., N) complex -> ``sum_n v_n exp(l log_lam_n)``: (..., L), ``2 Re`` if conj;
    - ``"cauchy"`` (s4, fftconv's s4 kernel): ``fn(v, z, w)``, v, w (..., N), z (L,) ->
      ``sum_n v_n / (z - w_n) + conj(v_n) / (z - conj(w_n))``: (..., L) complex;
    - ``"modal"`` (lru): ``fn(u, log_lam, B, C, initial_state=None)``, u (B, L, H), log_lam (N,),
      B (N, H), C (H_out, N) -> Re(C x_t): (B, L, H_out);
    - ``"ssm_kernel"``: an :class:`~lrnnx_zoo.ssm_kernel.SSMKernel` subclass, used by
      ``FFTConvS4(kernel_type=name)`` and the ``fftconv`` layer.

    Outputs are in the inputs' precision (vandermonde: real if conj, else v's complex dtype; cauchy:
    complex; modal: u's dtype, or autocast's while it is on) and differentiable: a third party's
    backend answering otherwise, or detached while its inputs require grad, is a PluginError naming
    it at the call.
    """
