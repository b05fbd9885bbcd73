"""SSMKernel.cached_kernel: inference reuses a kernel only for identical parameters; training
never does. Checked for every registered kernel backend of kind "ssm_kernel"."""

from __future__ import annotations

import copy

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


@pytest.mark.parametrize("name", KERNELS)
def test_three_lengths_in_turn_stay_cached_within_the_byte_budget(name, monkeypatch):
    # Two entries were kept per kind, so evaluation cycling three lengths (a validation set's
    # buckets) regenerated the kernel at every call (S4 zoh at L ~ 1000: 2.2 -> 20 ms a call). Now
    # older entries stay while the kind holds at most KERNEL_CACHE_BYTES; past it, the two newest.
    from lrnnx_zoo import ssm_kernel
    torch.manual_seed(0)
    k = lrnnx_zoo.get_backend("ssm_kernel", name)(4, 8)
    calls = []
    compute = ssm_kernel.SSMKernel.cached_kernel

    def counting(self, key, make):
        return compute(self, key, lambda: calls.append(key) or make())
    monkeypatch.setattr(ssm_kernel.SSMKernel, "cached_kernel", counting)
    with torch.no_grad():
        for L in (30, 31, 32, 30):  # (S4 sets its internal length, and so its C~, at the first lengths)
            k(L)
        calls.clear()
        for _ in range(2):
            for L in (30, 31, 32):
                k(L)
    assert calls == []
    monkeypatch.setattr(ssm_kernel, "KERNEL_CACHE_BYTES", 0)
    calls.clear()
    with torch.no_grad():
        for L in (40, 41, 42, 40):
            k(L)
    assert len(calls) == 4                              # over the budget: the two newest only


@pytest.mark.parametrize("name", KERNELS)
def test_a_fresh_kernels_second_spectrum_is_a_cache_hit(name):
    # S4's first call sets its internal length, rewriting C as C~ while the spectrum cache had already
    # looked at the contents: the result went in under the old contents and the second call (the first
    # evaluation batch after loading) generated the kernel again (zoh, H=64, N=256: 5 s).
    torch.manual_seed(0)
    k = lrnnx_zoo.get_backend("ssm_kernel", name)(4, 8)
    generated = []
    forward = k.checked_forward
    k.checked_forward = lambda *a, **kw: generated.append(kw) or forward(*a, **kw)
    with torch.no_grad():
        first = k.spectrum(32, 64).clone()
        second = k.spectrum(32, 64)
    assert len(generated) == 1
    torch.testing.assert_close(second, first, rtol=0, atol=0)


@pytest.mark.parametrize("cached", [True, False], ids=["dense-cached", "over-DENSE_CACHE_BYTES"])
def test_s4_first_call_discretises_once_and_powers_once(cached, monkeypatch):
    # A zoh kernel's first call discretised A twice (the length change, then the kernel: a matrix
    # exponential each; the length change rewrote C, which emptied the kernel cache in between) and
    # formed A_bar^L twice: 12 of its 16 s at H=64, N=256, L=1024, where nothing dense is cached
    # (d_model * d_state**2 * 8 bytes over DENSE_CACHE_BYTES). Within one call they are now shared,
    # and the kernel's values are those computed apart.
    from lrnnx_zoo import discretization, hippo
    from lrnnx_zoo.plugins.s4 import kernel as s4_kernel
    if not cached:
        monkeypatch.setattr(s4_kernel, "DENSE_CACHE_BYTES", 0)
    torch.manual_seed(0)
    k = lrnnx_zoo.get_backend("ssm_kernel", "s4")(4, 16, discretization="zoh")
    twin = copy.deepcopy(k)
    counts = {"exp": 0, "power": 0}
    exp, power = discretization.matrix_exp, hippo.power

    def counted(key, f):
        def wrapped(*a, **kw):
            counts[key] += 1
            return f(*a, **kw)
        return wrapped
    monkeypatch.setattr(discretization, "matrix_exp", counted("exp", exp))
    monkeypatch.setattr(hippo, "power", counted("power", power))
    with torch.no_grad():
        K = k(100)[0]
    assert counts == {"exp": 1, "power": 1}
    # the same kernel computed under autograd, where nothing is shared (float64 work rounded to float32)
    K_apart = twin(100)[0]
    torch.testing.assert_close(K, K_apart.detach(), rtol=1e-6, atol=1e-6)
