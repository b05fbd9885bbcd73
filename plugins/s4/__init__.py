"""S4: the structured state-space layer with a normal-plus-low-rank HiPPO kernel
(Gu, Goel, Ré 2022, "Efficiently Modeling Long Sequences with Structured State Spaces", ICLR).

Registers the layer "s4" (:class:`S4Layer`), its initializers (the HiPPO measures legs, legt,
fourier, lagt, tlagt, glagt: :mod:`.measures`), the kernel backend ("ssm_kernel", "s4")
(:class:`S4Kernel`) and the Cauchy backends ("cauchy", "torch" | "keops" | "auto") used by
Algorithm 1. Seed-compatible names: ``S4``, ``SSKernelNPLR``, ``HippoSSKernel``,
``LinearActivation``, ``TransposedLinear``, ``Activation``, ``get_initializer``.

Modules: ``kernel`` (parameters, C~, rate, state passing, step modes), ``measures`` (the
initializers), ``generating`` (Algorithm 1), ``dense`` (real-coordinate dense system, zoh, exact
state advance), ``step`` (step forms), ``layer``, ``nn``; the shared-pole Cauchy sums live in
lrnnx_zoo.kernels.cauchy_shared.
"""

from __future__ import annotations

from lrnnx_zoo import hookimpl
from lrnnx_zoo.hippo import cauchy_conj, krylov, power  # seed names, re-exported
from lrnnx_zoo.kernels.cauchy import cauchy_conj_keops
from lrnnx_zoo.kernels.cauchy_shared import cauchy_conj_auto, cauchy_conj_shared

from .kernel import HippoSSKernel, S4Kernel, SSKernelNPLR, optimizer_param_groups
from .layer import S4, S4Layer
from .measures import NPLR_MEASURES, nplr_initializer
from .nn import Activation, DropoutNd, LinearActivation, TransposedLinear, get_initializer
from .step import ChannelDPLRStepForm, DiagonalAccuracyError

__all__ = ["S4", "S4Layer", "SSKernelNPLR", "HippoSSKernel", "S4Kernel", "optimizer_param_groups",
           "ChannelDPLRStepForm", "DiagonalAccuracyError", "LinearActivation", "TransposedLinear", "Activation",
           "DropoutNd", "get_initializer", "cauchy_conj", "krylov", "power"]


@hookimpl
def lrnnx_zoo_register_layers(registry) -> None:
    registry.add_layer("s4", S4Layer)


@hookimpl
def lrnnx_zoo_register_initializers(registry) -> None:
    for measure in NPLR_MEASURES:
        registry.add_initializer("s4", measure, nplr_initializer(measure))


@hookimpl
def lrnnx_zoo_register_kernel_backends(registry) -> None:
    # "torch" is the generic torch Cauchy with a fast path when the poles are shared by several
    # numerators (it defers to lrnnx_zoo.kernels.cauchy.cauchy_conj_torch otherwise).
    registry.add_backend("cauchy", "torch", cauchy_conj_shared)
    registry.add_backend("cauchy", "keops", cauchy_conj_keops)
    registry.add_backend("cauchy", "auto", cauchy_conj_auto)
    registry.add_backend("ssm_kernel", "s4", S4Kernel)
