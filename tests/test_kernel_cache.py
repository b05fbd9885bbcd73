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


def _probe_calls(k):
    """A cached_kernel lookup under key ("probe",) and the list its computations are logged in."""
    made = []

    def lookup():
        return k.cached_kernel(("probe",), lambda: made.append(1) or torch.ones(3))
    return lookup, made


@pytest.mark.parametrize("name", KERNELS)
def test_a_hit_gathers_nothing_again_and_compares_without_torch_ops(name, monkeypatch):
    # Each hit gathered the watched tensors and the settings again (named_parameters, every submodule's
    # __dict__ walked and sorted) and compared each tensor with two aten ops (detach, equal): 45 of an
    # S4D kernel's (H=128, N=64) ~208 us forward at (1, 64, 128). While the layout is unchanged a hit
    # now compares the contents only, in numpy on CPU.
    from aten_log import AtenLog
    from lrnnx_zoo import ssm_kernel
    torch.manual_seed(0)
    k = lrnnx_zoo.get_backend("ssm_kernel", name)(4, 8)
    lookup, made = _probe_calls(k)
    gathered = []
    for method in ("_watched", "_settings"):
        original = getattr(ssm_kernel.SSMKernel, method)
        monkeypatch.setattr(ssm_kernel.SSMKernel, method,
                            lambda self, _f=original, _m=method: gathered.append(_m) or _f(self))

    with torch.no_grad():
        first = lookup()
        gathered.clear()
        with AtenLog() as counted:
            for _ in range(3):
                assert lookup() is first
    assert made == [1]
    assert gathered == []
    assert counted.names == []


@pytest.mark.parametrize("compared", ["as-bytes", "elementwise"])
@pytest.mark.parametrize("name", KERNELS)
def test_a_hit_still_sees_new_and_changed_settings_attributes_and_parameters(name, compared, monkeypatch):
    from lrnnx_zoo import ssm_kernel
    if compared == "elementwise":
        monkeypatch.setattr(ssm_kernel, "PROBE_BYTES_COPIED", 0)
    torch.manual_seed(0)
    k = lrnnx_zoo.get_backend("ssm_kernel", name)(4, 8)
    lookup, made = _probe_calls(k)
    # The hit path trusts the snapshot's watched tensors and settings while the layout (every submodule's
    # attributes, parameters, buffers, submodules, by identity) is unchanged: each change here must still
    # invalidate, and each equal replacement keep the result.
    p_name, p = next(iter(k.named_parameters()))
    with torch.no_grad():
        lookup()

        def recomputes(change):
            """How many computations ``change()`` then a lookup took (0 or 1)."""
            before = len(made)
            change()
            lookup()
            after = len(made)
            lookup()                              # and the new result is then a hit
            assert len(made) == after
            return after - before
        assert recomputes(lambda: None) == 0
        assert recomputes(lambda: setattr(k, "scale", 0.5)) == 1           # a new setting
        assert recomputes(lambda: setattr(k, "scale", 0.25)) == 1          # a changed one
        assert recomputes(lambda: setattr(k, "scale", 1 / 4)) == 0         # an equal one
        k.extra = torch.nn.Module()
        assert recomputes(lambda: setattr(k.extra, "mode", "a")) == 1      # a submodule's setting
        assert recomputes(lambda: setattr(k.extra, "mode", "b")) == 1
        assert recomputes(lambda: setattr(k, "applied", torch.ones(5))) == 1   # a tensor attribute (prune's)
        assert recomputes(lambda: setattr(k, "applied", torch.ones(5))) == 0   # replaced by an equal one
        assert recomputes(lambda: k.applied.mul_(2)) == 1
        assert recomputes(lambda: setattr(k, p_name, torch.nn.Parameter(p.detach().clone()))) == 0
        q = getattr(k, p_name)
        assert recomputes(lambda: setattr(k, p_name, torch.nn.Parameter(q.detach() + 1))) == 1
        q = getattr(k, p_name)
        assert recomputes(lambda: setattr(q, "data", q.detach().clone())) == 0     # p.data replaced, equal
        assert recomputes(lambda: setattr(q, "data", q.detach() * 2 + 1)) == 1
        assert recomputes(lambda: q.data.add_(1)) == 1                   # in place, no version counter moved
        assert recomputes(lambda: setattr(q, "data", q.detach().unsqueeze(0))) == 1   # the same bytes, reshaped
        assert recomputes(lambda: k.register_buffer("extra_buffer", torch.zeros(2))) == 1
        assert recomputes(lambda: k.get_buffer("extra_buffer").fill_(1)) == 1
        assert recomputes(lambda: delattr(k, "extra_buffer")) == 1


def test_a_kernel_whose_settings_read_elsewhere_is_compared_by_value_at_every_call():
    # A hit trusts its layout only for the _settings / _watched defined by SSMKernel: an override may read
    # what no attribute of the kernel holds.
    mode = ["a"]

    class Moded(lrnnx_zoo.get_backend("ssm_kernel", "s4d")):
        def _settings(self):
            return super()._settings() + (("mode", mode[0]),)
    torch.manual_seed(0)
    lookup, made = _probe_calls(Moded(4, 8))
    with torch.no_grad():
        lookup()
        lookup()
        mode[0] = "b"
        lookup()
    assert len(made) == 2
