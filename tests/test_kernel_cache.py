"""SSMKernel.cached_kernel: inference reuses a kernel only for identical parameters; training
never does. Checked for every registered kernel backend of kind "ssm_kernel"."""

from __future__ import annotations

import pytest
import torch

import lrnnx_zoo

KERNELS = [b.split(".", 1)[1] for b in lrnnx_zoo.list_backends("ssm_kernel")]


@pytest.mark.parametrize("name", KERNELS)
def test_cache_hits_only_for_the_same_parameters(name):
    torch.manual_seed(0)
    k = lrnnx_zoo.get_backend("ssm_kernel", name)(4, 8)
    with torch.no_grad():
        K1, _ = k(32)
        reference = K1.clone()
        assert k.__dict__.get("_kernel_cache") is not None
        K2, _ = k(32)
        assert K2 is K1                                  # a hit: no recomputation, no copy
        K2.add_(1.0)                                     # a caller's in-place edit must not poison the cache
        torch.testing.assert_close(k(32)[0], reference, rtol=0, atol=0)
        K1 = reference
        p = next(iter(k.parameters()))
        p.data.mul_(1.5)                                 # edits through .data are seen
        K3, _ = k(32)
    assert not torch.equal(K3, K1)
    k.cache_inference_kernel = False
    with torch.no_grad():
        torch.testing.assert_close(k(32)[0], K3, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", KERNELS)
def test_training_always_recomputes_with_gradients(name):
    k = lrnnx_zoo.get_backend("ssm_kernel", name)(4, 8)
    with torch.no_grad():
        k(16)
    K, _ = k(16)
    assert K.requires_grad
    K.sum().backward()
    assert any(p.grad is not None for p in k.parameters())
