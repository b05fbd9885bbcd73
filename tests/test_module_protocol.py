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


# -- weights replaced under a running stream -----------------------------------------------------
def _load_assigned(m, other):
    m.load_state_dict(other.state_dict(), assign=True)


def _reassigned(m, other):
    """Each parameter attribute rebound to a new nn.Parameter (``layer.D = nn.Parameter(...)``)."""
    for name, p in list(other.named_parameters()):
        owner, _, attr = name.rpartition(".")
        setattr(m.get_submodule(owner), attr, nn.Parameter(p.detach().clone()))


def _data_set(m, other):
    """``p.data = new`` (the tensor behind the parameter replaced, the Parameter object kept)."""
    for p, q in zip(m.parameters(), other.parameters()):
        p.data = q.detach().clone()


def _swapped(m, other):
    for p, q in zip(m.parameters(), other.parameters()):
        torch.utils.swap_tensors(p, nn.Parameter(q.detach().clone()))


REPLACE = {"load_state_dict(assign=True)": _load_assigned, "reassigned": _reassigned,
           "data_set": _data_set, "swap_tensors": _swapped}
STREAMING = [(n, kw) for n, kw in LAYERS]


@pytest.mark.parametrize("how", list(REPLACE))
@pytest.mark.parametrize("name,kw", STREAMING, ids=IDS)
def test_step_refuses_a_cache_of_replaced_weights(name, kw, how):
    """A stream's cache holds the step form of the weights it was made from. Weights changed in place
    (an optimiser step, load_state_dict) were refused at the next step; weights *replaced* -- loaded
    with assign=True (the meta-device idiom), rebound, swapped -- were not, and the stream went on with
    the old ones silently (outputs O(1) off the new model's)."""
    m, other = layer(name, kw), layer(name, kw, seed=1)
    x = torch.randn(2, 4)
    cache = m.allocate_inference_cache(2)
    with torch.no_grad():
        m.step(x, cache)
        REPLACE[how](m, other)
        with pytest.raises(RuntimeError, match="weights changed since this cache was made"):
            m.step(x, cache)
        # a new cache steps with the new weights
        y, _ = m.step(x, m.allocate_inference_cache(2))
        ref, _ = other.step(x, other.allocate_inference_cache(2))
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["reassigned", "data_set"])
@pytest.mark.parametrize("seed_class", ["S4", "FFTConvS4"])
def test_seed_step_refuses_replaced_weights(seed_class, how):
    """The seed classes' setup_step() form likewise: replaced weights are refused at the next step,
    and setup_step() again steps with them."""
    from lrnnx_zoo.convolution import FFTConvS4
    from lrnnx_zoo.plugins.s4 import S4

    def make(seed):
        torch.manual_seed(seed)
        return (S4(4, d_state=8) if seed_class == "S4" else FFTConvS4(4, kernel_type="s4d", d_state=8)).eval()

    m, other = make(0), make(1)
    x = torch.randn(2, 4)
    m.setup_step()
    with torch.no_grad():
        m.step(x, m.default_state(2))
        REPLACE[how](m, other)
        with pytest.raises(RuntimeError, match="stale"):
            m.step(x, m.default_state(2))
        m.setup_step()
        other.setup_step()
        torch.testing.assert_close(m.step(x, m.default_state(2))[0], other.step(x, other.default_state(2))[0],
                                   rtol=0, atol=0)


# -- other weights through the same module -------------------------------------------------------
@pytest.mark.parametrize("name,kw", LAYERS, ids=IDS)
def test_functional_call_and_meta_loading_compute_with_the_given_weights(name, kw):
    """torch.func.functional_call with another model's weights, after the module's own forward
    filled its kernel cache, gives that model's output (not the cached kernel of the old weights),
    and leaves the module's own output as it was; a layer built on the meta device, given storage
    (to_empty) and loaded, computes what the original does."""
    from torch.func import functional_call
    m, other = layer(name, kw), layer(name, kw, seed=1)
    x = torch.randn(2, 16, 4)
    with torch.no_grad():
        y, y_other = m(x), other(x)
        weights = {**dict(other.named_parameters()), **dict(other.named_buffers())}
        # the same weights through the same code: equal to the last bit
        torch.testing.assert_close(functional_call(m, weights, (x,)), y_other, rtol=0, atol=0)
        torch.testing.assert_close(m(x), y, rtol=0, atol=0)
        with torch.device("meta"):
            empty = create_layer(name, 4, d_state=8, **kw)
        empty.to_empty(device="cpu").load_state_dict(m.state_dict())
        torch.testing.assert_close(empty.eval()(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("name,kw", LAYERS[::2], ids=IDS[::2])
def test_state_dict_round_trip_reports_keys_as_pytorch_does(name, kw):
    """No cache in the state_dict, no tensor registered twice, and strict=False reports the missing
    and unexpected keys (strict=True raises on them)."""
    m = layer(name, kw)
    with torch.no_grad():
        m(torch.randn(1, 8, 4))
    sd = m.state_dict()
    names = [n for n, _ in m.named_parameters(remove_duplicate=False)] + \
        [n for n, _ in m.named_buffers(remove_duplicate=False)]
    assert sorted(sd) == sorted(names) and len(set(map(id, sd.values()))) == len(sd)
    first = next(iter(sd))
    broken = {**{k: v for k, v in sd.items() if k != first}, "bogus": torch.zeros(1)}
    result = layer(name, kw, seed=1).load_state_dict(broken, strict=False)
    assert (result.missing_keys, result.unexpected_keys) == ([first], ["bogus"])
    with pytest.raises(RuntimeError, match=r"(?s)Missing key.*Unexpected key"):
        layer(name, kw, seed=1).load_state_dict(broken)


def test_seed_step_form_edited_then_moved_is_still_stale():
    """A device move or cast keeps the S4 step form current only if it was current before: weights
    edited in place and then moved (here a cast to the dtype they have) are still refused."""
    from lrnnx_zoo.plugins.s4 import S4
    torch.manual_seed(0)
    m = S4(4, d_state=8).eval()
    m.setup_step()
    with torch.no_grad():
        m.kernel.log_dt.add_(0.5)
        m.float()
        with pytest.raises(RuntimeError, match="stale"):
            m.step(torch.randn(2, 4), m.default_state(2))
