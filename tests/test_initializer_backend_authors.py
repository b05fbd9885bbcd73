"""A third party's journey adding an initializer or a kernel backend (no layer) to the built-in
families: what each mistake on the way reads like (tests/test_plugin_author_mistakes.py covers
plugins that add layers)."""

import sys

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo import PluginError, RegistryError, get_backend

from plugin_fixtures import hooks_registered

notes_needed = pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes need Python >= 3.11")


def _vandermonde(v, log_lam, L, conj=True):
    """A Vandermonde backend of the author's own (the built-in torch one, called through a lambda)."""
    return get_backend("vandermonde", "torch")(v, log_lam, L, conj)


@pytest.mark.parametrize("backend, got", [
    # 2 Re was due: the real part of the complex sum (half the kernel) went on, with a UserWarning at most
    (lambda v, log_lam, L, conj=True: _vandermonde(v, log_lam, L, False), "complex64"),
    # float16 lost precision, float64 was cast back, both without a word
    (lambda v, log_lam, L, conj=True: _vandermonde(v, log_lam, L, conj).half(), "float16"),
    (lambda v, log_lam, L, conj=True: _vandermonde(v, log_lam, L, conj).double(), "float64"),
])
def test_a_backend_answering_in_another_dtype_is_named(backend, got):
    with hooks_registered("tp_dtype", backends=[("vandermonde", "off", backend)]):
        layer = lrnnx_zoo.create_layer("s4d", 4, d_state=4, backend="off")
        with pytest.raises(PluginError, match=rf"^vandermonde backend 'off' of plugin 'tp_dtype' must be .*real of v's "
                                              rf"precision, if conj.*, here a torch.float32 tensor of shape "
                                              rf"\(1, 4, 9\); it returned a torch.{got} tensor of shape \(1, 4, 9\)$"):
            layer(torch.randn(2, 9, 4))


def test_a_modal_backend_answering_in_another_dtype_is_named():
    from lrnnx_zoo.modal import modal_scan
    with hooks_registered("tp_modal", backends=[("modal", "wide", lambda *a, **k: modal_scan(*a, **k).double())]):
        layer = lrnnx_zoo.create_layer("lru", 4, d_state=4, backend="wide")
        with pytest.raises(PluginError, match=r"^modal backend 'wide' of plugin 'tp_modal' must be .* of u's dtype "
                                              r".*, here a torch.float32 tensor of shape \(2, 9, 4\); it returned a "
                                              r"torch.float64 tensor"):
            layer(torch.randn(2, 9, 4))


def test_a_backend_cut_off_from_autograd_is_refused_in_training_only():
    # A detached kernel trained nothing: s4d's parameters got no gradient, and nothing said so.
    detached = lambda v, log_lam, L, conj=True: _vandermonde(v, log_lam, L, conj).detach()   # noqa: E731
    with hooks_registered("tp_detach", backends=[("vandermonde", "detached", detached)]):
        layer = lrnnx_zoo.create_layer("s4d", 4, d_state=4, backend="detached")
        x = torch.randn(2, 9, 4)
        with pytest.raises(PluginError, match=r"^vandermonde backend 'detached' of plugin 'tp_detach' returned a "
                                              r"tensor cut off from autograd: .* no gradient"):
            layer(x)
        with torch.no_grad():           # inference needs no gradient: such a backend is fine there
            assert layer(x).shape == x.shape
        params = {k: p.detach() for k, p in layer.named_parameters()}
        with pytest.raises(PluginError, match="cut off from autograd"):     # so under torch.func.grad
            torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).sum())(params)


@pytest.mark.parametrize("layer, kwargs, kind, dtype", [
    ("s4d", {}, "vandermonde", torch.float32), ("s4d", {}, "vandermonde", torch.float64),
    ("s4", {}, "cauchy", torch.float32), ("s4", {}, "cauchy", torch.float64),
    ("lru", {}, "modal", torch.float32), ("fftconv", {"kernel_type": "s4"}, "cauchy", torch.float64),
])
def test_a_backend_keeping_the_contract_trains_and_streams_in_either_precision(layer, kwargs, kind, dtype):
    # the checks hold a third party's backend to what the built-in ones give, and refuse no more
    builtin = get_backend(kind, "scan" if kind == "modal" else "torch")
    with hooks_registered("tp_good", backends=[(kind, "mine", lambda *a, **k: builtin(*a, **k))]):
        torch.manual_seed(0)
        mine = lrnnx_zoo.create_layer(layer, 4, d_state=4, backend="mine", **kwargs).to(dtype)
        torch.manual_seed(0)
        ref = lrnnx_zoo.create_layer(layer, 4, d_state=4, backend="scan" if kind == "modal" else "torch",
                                     **kwargs).to(dtype)
        x = torch.randn(2, 9, 4, dtype=dtype)
        mine(x).sum().backward()
        assert all(p.grad is not None for p in mine.parameters())
        with torch.no_grad():
            torch.testing.assert_close(mine(x), ref(x), rtol=0, atol=0)     # the same function, the same bits
        assert mine.step(x[:, 0], mine.allocate_inference_cache(2))[0].shape == (2, 4)


@notes_needed
def test_an_exception_in_a_backend_names_it_and_its_plugin():
    def buggy(v, log_lam, L, conj=True):
        return v @ log_lam      # (..., N) @ (..., N): a shape error deep in torch
    with hooks_registered("tp_buggy", backends=[("vandermonde", "buggy", buggy)]):
        layer = lrnnx_zoo.create_layer("s4d", 4, d_state=4, backend="buggy")
        with pytest.raises(RuntimeError) as caught:             # the backend's own error, unchanged
            layer(torch.randn(2, 9, 4))
    assert caught.value.__notes__ == ["(raised by the vandermonde backend 'buggy' of plugin 'tp_buggy', which must be "
                                      "fn(v, log_lam, L, conj=True) -> a tensor (..., L) for v (..., N): 2 Re(...), "
                                      "real of v's precision, if conj, else complex of v's dtype)"]


def _lin(H, M):
    return (torch.complex(torch.full((H, M), -0.5, dtype=torch.float64), torch.arange(M, dtype=torch.float64).expand(H, M)),
            torch.ones(H, M, dtype=torch.complex128))


@notes_needed
@pytest.mark.parametrize("family, init, call, shapes", [
    # "<lambda>() takes 1 positional argument but 2 were given", and nothing more
    ("s4d", lambda H: _lin(H, 2), "fn(4, 2) for d_model=4, d_state=4", "(A, B) tensors of shapes (4, 2), (4, 2)"),
    ("s4", lambda N: None, "fn(4, rank=1) for N=4, rank=1", "(w, P, B) tensors of shapes (2,), (1, 2), (2,)"),
])
def test_an_initializer_of_another_signature_is_told_the_call_it_must_take(family, init, call, shapes):
    with hooks_registered("tp_init", initializers=[(family, "narrow", init)]):
        option = {"init": "narrow"} if family == "s4d" else {"measure": "narrow"}
        with pytest.raises(TypeError) as caught:
            lrnnx_zoo.create_layer(family, 4, d_state=4, **option)
    assert caught.value.__notes__ == [f"(raised by the {family} initializer 'narrow' of plugin 'tp_init', called as "
                                      f"{call}; it must return {shapes})"]


def test_a_name_registered_under_a_mistyped_kind_or_layer_is_pointed_at():
    # the load only noted it in `lrnnx-zoo plugins`; the lookup said "unknown ... 'fast'" and no more
    with pytest.warns(UserWarning, match="a typo"):
        with hooks_registered("tp_typo", initializers=[("S4D", "slow", _lin)],
                              backends=[("vandermond", "fast", _vandermonde)]):
            with pytest.raises(RegistryError, match=r"^unknown vandermonde backend 'fast'; available: .*\. 'fast' is "
                                                    r"registered as 'vandermond.fast' by plugin 'tp_typo': a typo in "
                                                    r"its kind there\?$"):
                lrnnx_zoo.create_layer("s4d", 4, d_state=4, backend="fast")
            with pytest.raises(RegistryError, match=r"^unknown initializer for 's4d' 'slow'; .* 'slow' is registered "
                                                    r"as 'S4D.slow' by plugin 'tp_typo': a typo in its layer there\?$"):
                lrnnx_zoo.create_layer("s4d", 4, d_state=4, init="slow")
    # a name that is another built-in kind's is no typo: LRU's modal backends have no keops
    with pytest.raises(RegistryError) as caught:
        lrnnx_zoo.create_layer("lru", 4, d_state=4, backend="keops")
    assert "typo" not in str(caught.value)


def test_the_backends_listing_names_who_registered_a_third_partys_backend(capsys):
    # `lrnnx-zoo backends` listed a plugin's backends, and a clash with a built-in's name, as if the
    # built-in families had them (`lrnnx-zoo layers` names a plugin's initializers)
    from lrnnx_zoo.cli import main
    with pytest.warns(UserWarning, match="clash"):
        with hooks_registered("tp_list", backends=[("vandermonde", "fast", _vandermonde),
                                                   ("vandermonde", "torch", _vandermonde)]):
            assert main(["backends", "vandermonde"]) == 0
            listed = capsys.readouterr().out.splitlines()
    assert listed == ["vandermonde.auto", "vandermonde.fast (tp_list)", "vandermonde.keops",
                      "vandermonde.torch (s4d, tp_list)"]


def test_a_backend_keeping_the_contract_runs_under_autocast_and_vmap():
    # A pass-through of the built-in modal backend was refused: under CPU autocast its matmuls answer in
    # bfloat16 (as the built-in's do), and under torch.func.vmap a batched output reads requires_grad=False.
    builtin = get_backend("modal", "scan")
    with hooks_registered("tp_modal", backends=[("modal", "mine", lambda *a, **k: builtin(*a, **k))]):
        torch.manual_seed(0)
        layer = lrnnx_zoo.create_layer("lru", 4, d_state=4, backend="mine")
        x = torch.randn(2, 9, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).shape == x.shape
        out = torch.func.vmap(lambda xi: layer(xi[None])[0])(x)
        out.sum().backward()
        assert all(p.grad is not None for p in layer.parameters())
        with torch.no_grad():   # the same function as without vmap; 1e-5: float32 summation order may differ
            torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)
    half = lambda *a, **k: builtin(*a, **k).half()      # noqa: E731: float16 is not autocast's dtype here
    with hooks_registered("tp_half", backends=[("modal", "half", half)]):
        layer = lrnnx_zoo.create_layer("lru", 4, d_state=4, backend="half")
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(PluginError, match="returned a torch.float16"):
            layer(x)


def test_a_kind_a_plugins_own_layer_looks_up_is_not_called_a_typo():
    # A plugin with a layer of its own registered ("selective_scan", "triton") for it; asking s4d for a
    # "triton" vandermonde backend said "a typo in its kind there?" of a kind its layer does look up
    # (`lrnnx-zoo plugins` rightly noted nothing).
    import types
    from plugin_fixtures import LoopRecurrence
    module = types.SimpleNamespace()

    @lrnnx_zoo.hookimpl
    def lrnnx_zoo_register_layers(registry):
        registry.add_layer("looped", LoopRecurrence)

    @lrnnx_zoo.hookimpl
    def lrnnx_zoo_register_kernel_backends(registry):
        registry.add_backend("selective_scan", "triton", lambda u: u)
    module.lrnnx_zoo_register_layers = lrnnx_zoo_register_layers
    module.lrnnx_zoo_register_kernel_backends = lrnnx_zoo_register_kernel_backends
    info = lrnnx_zoo.register_plugin(module, name="tp_own_kind")
    try:
        assert info.notes == []
        with pytest.raises(RegistryError) as raised:
            get_backend("vandermonde", "triton")
        assert str(raised.value).startswith("unknown vandermonde backend 'triton'; available: "), raised.value
        assert "typo" not in str(raised.value), raised.value
    finally:
        lrnnx_zoo.unregister_plugin("tp_own_kind")
