"""The torch.nn.Module protocol of every registered layer and of SequenceModel: the things a PyTorch
user does without thinking (copy, pickle, cast, load, swap weights, hook, nest) either work
correctly or fail with a clear error."""

import copy
import io

import pytest
import torch
from torch import nn

from lrnnx_zoo import create_layer

# (name, options): every family, with the options that change what the module holds
LAYERS = [("lru", {}), ("s4d", {}), ("s4d", {"discretization": "bilinear"}), ("s4", {}),
          ("s4", {"discretization": "zoh"}), ("fftconv", {}), ("fftconv", {"kernel_type": "s4", "channels": 2})]
IDS = [name + "".join(f"-{v}" for v in kw.values()) for name, kw in LAYERS]


def layer(name, kw, seed=0, H=4):
    torch.manual_seed(seed)
    return create_layer(name, H, d_state=8, **kw).eval()


def saved_size(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return len(buf.getvalue())


# -- copies and pickles --------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw", LAYERS, ids=IDS)
def test_pickled_module_is_the_size_of_its_weights(name, kw):
    """A whole-module torch.save after an evaluation forward held the kernel cache: the spectrum and
    a snapshot of the weights. S4D with H=32, N=16 at L=4096: 1.1 MB against 10 kB of weights
    (the cache grows as H * L, the weights do not). The pickle and the copy now leave it behind,
    and still compute what the original does (the cache is rebuilt on the copy's first forward)."""
    m = layer(name, kw, H=32)
    x = torch.randn(1, 4096, 32)
    with torch.no_grad():
        y = m(x)
    weights = saved_size(m.state_dict())
    # pickling a module adds its class and attribute names to the tensors: a few kB, not H * L
    assert saved_size(m) < weights + 20_000, (saved_size(m), weights)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    twin = copy.deepcopy(m)
    for copied in (loaded, twin):
        assert not any("_kernel_cache" in vars(sub) for sub in copied.modules())
        with torch.no_grad():
            # same weights, same code path: equal to float32 rounding of the FFT (sums of 4096 terms)
            torch.testing.assert_close(copied(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,kw", LAYERS, ids=IDS)
def test_deepcopy_is_independent_of_the_original(name, kw):
    """Each copy computes with its own weights: editing the original after both ran leaves the
    copy's output as it was (no cache shared between them)."""
    m = layer(name, kw)
    x = torch.randn(2, 16, 4)
    with torch.no_grad():
        y = m(x)
        twin = copy.deepcopy(m)
        for p in m.parameters():
            p.add_(0.1)
        assert not torch.allclose(m(x), y)
        torch.testing.assert_close(twin(x), y, rtol=0, atol=0)
