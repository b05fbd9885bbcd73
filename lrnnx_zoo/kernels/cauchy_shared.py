"""Cauchy sums whose poles are shared by several numerators (S4 Algorithm 1, step 2).

S4's kernel needs, per channel and node, four sums over the same poles w (the Woodbury terms
k00, k01, k10, k11), plus one per state vector in state passing. The generic backends in
:mod:`lrnnx_zoo.kernels.cauchy` broadcast w to every numerator and rebuild the pole factor
1 / ((z - w)(z - conj w)) for each of them; here it is built once per distinct pole row and all
numerators are contracted with it in one batched matmul:

    out[p, j, l] = sum_n (a[p, j, n] z_l - b[p, j, n]) q[p, n, l],
    q = 1 / ((z_l - w_pn)(z_l - conj w_pn)),   a = 2 Re v,   b = 2 Re(v conj w),

which is the conjugate-pair identity (*) of :mod:`lrnnx_zoo.kernels.cauchy`. Measured on the
2-core CPU at H=128, N/2=32, 4 numerators: 5x faster than the broadcasting torch backend.

The nodes are processed in blocks; with autograd each block is checkpointed, so the backward
pass recomputes q block by block and memory stays O(block), as in the generic backend.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .cauchy import _complex_dtype, cauchy_conj_keops, cauchy_conj_torch
from .keops_support import keops_available

__all__ = ["cauchy_conj_shared", "cauchy_conj_auto", "KEOPS_MIN_TERMS"]

#: Bytes of one (rows, N, block) complex pole block; small enough to stay in cache-friendly sizes.
_BLOCK_BYTES = 8 * 2**20
#: "auto" picks keops when distinct-pole-rows * numerators * N * L reaches this on that device;
#: None: never. CPU: the shared torch path beat keops at every size in benchmarks/bench_s4.py.
KEOPS_MIN_TERMS: Dict[str, Optional[int]] = {"cpu": None, "cuda": 0}


def _block(ab: Tensor, c: Tensor, d: Tensor, z: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """One node block.  ab: (P, 2J, N) complex (real values),  c, d: (P, N, 1) real,  z: (l,) complex
    -> (P, J, l), written into ``out`` if given."""
    # (z - w)(z - conj w) = z^2 - 2Re(w) z + |w|^2  (c = 2 Re w, d = |w|^2), in one buffer
    q = (d + z * z).addcmul_(c, z, value=-1).reciprocal_()     # (P, N, l)
    s = ab @ q                                                 # (P, 2J, l)
    J = ab.shape[1] // 2
    return torch.sub(z * s[:, :J], s[:, J:], out=out)


def _shared_axes(v_shape: torch.Size, w_shape: torch.Size) -> tuple[torch.Size, list[int]]:
    batch = torch.broadcast_shapes(v_shape[:-1], w_shape[:-1])
    w_b = (1,) * (len(batch) - (len(w_shape) - 1)) + tuple(w_shape[:-1])
    return batch, [i for i, (s, ws) in enumerate(zip(batch, w_b)) if ws == 1 and s > 1]


def cauchy_conj_shared(v: Tensor, z: Tensor, w: Tensor, chunk_size: Optional[int] = None) -> Tensor:
    """Conjugate-pair Cauchy sum ``sum_n v_n/(z_l - w_n) + conj(v_n)/(z_l - conj(w_n))`` in torch.

    Same contract as :func:`lrnnx_zoo.kernels.cauchy.cauchy_conj_torch`: v, w (..., N) with
    broadcasting batch dims, z (L,) -> (..., L) complex. Batch axes along which w is broadcast
    (size 1 in w) share one pole block; without such axes this defers to the generic backend.

    Args:
        chunk_size: nodes per block; default keeps a (rows, N, block) complex block near 8 MB.
    """
    if z.dim() != 1:
        raise ValueError(f"cauchy_conj_shared: z must be 1-D (L,), got shape {tuple(z.shape)}")
    batch, shared = _shared_axes(v.shape, w.shape)
    if not shared:
        return cauchy_conj_torch(v, z, w, chunk_size=chunk_size)
    cdt = _complex_dtype(v, z, w)
    N, L = v.shape[-1], z.shape[0]
    own = [i for i in range(len(batch)) if i not in shared]
    perm = own + shared + [len(batch)]
    v = v.to(cdt).expand(*batch, N).permute(perm)
    w = w.to(cdt).expand(*batch, N).permute(perm)        # shared axes are stride-0 views: no copy
    own_shape, shared_shape = v.shape[:len(own)], v.shape[len(own):-1]
    P, J = math.prod(own_shape), math.prod(shared_shape)
    v = v.reshape(P, J, N)
    w = w.reshape(P, J, N)[:, :1] if J else w.reshape(P, 1, N)
    ab = torch.cat([2 * v.real, 2 * (v * w.conj()).real], dim=1).to(cdt)        # (P, 2J, N)
    c = (2 * w.real).transpose(1, 2)                                            # (P, N, 1)
    d = (w.real.square() + w.imag.square()).transpose(1, 2)
    z = z.to(cdt)
    if chunk_size is None:
        chunk_size = max(1, _BLOCK_BYTES // max(1, P * N * z.element_size()))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (ab, c, d, z))
    if grad:   # in-place ops in _block touch its own temporaries only, so checkpointing stays valid
        parts = [checkpoint(_block, ab, c, d, z[s:s + chunk_size], use_reentrant=False)
                 for s in range(0, L, chunk_size)]
        out = torch.cat(parts, dim=-1) if parts else ab.new_zeros(P, J, 0)
    else:      # one output buffer: blocks written in place (a list of parts fragments the heap)
        out = torch.empty(P, J, L, dtype=cdt, device=v.device)
        for s in range(0, L, chunk_size):
            _block(ab, c, d, z[s:s + chunk_size], out=out[..., s:s + chunk_size])
    out = out.reshape(*own_shape, *shared_shape, L)
    inverse = [perm.index(i) for i in range(len(perm))]
    return out.permute(inverse)


def cauchy_conj_auto(v: Tensor, z: Tensor, w: Tensor) -> Tensor:
    """"auto": keops when usable and the problem reaches :data:`KEOPS_MIN_TERMS` for the device,
    else :func:`cauchy_conj_shared`. ``LRNNX_ZOO_DISABLE_KEOPS=1`` always gives the torch path."""
    threshold = KEOPS_MIN_TERMS.get(v.device.type)
    if threshold is not None:
        batch = torch.broadcast_shapes(v.shape[:-1], w.shape[:-1])
        if math.prod(batch) * v.shape[-1] * z.shape[-1] >= threshold and keops_available():
            return cauchy_conj_keops(v, z, w)
    return cauchy_conj_shared(v, z, w)
