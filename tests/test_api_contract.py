"""The public API against its contract (DESIGN.md, seeds/): names, signatures, argument checks, reprs.

Each argument test here was a defect: a wrong-typed constructor argument was read for its truth
(bidirectional="no" built a non-causal layer) or failed deep in a comparison or in torch, with
no word of which argument was wrong.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo.convolution import FFTConvS4
from lrnnx_zoo.plugins.fftconv import FFTConvLayer
from lrnnx_zoo.plugins.lru import LRU, LRUKernel
from lrnnx_zoo.plugins.s4 import S4, HippoSSKernel, S4Layer
from lrnnx_zoo.plugins.s4d import S4D, S4DKernel

#: (constructor, its minimal arguments) for every public layer / kernel class built with d_model.
CONSTRUCTORS = {
    "LRU": (LRU, {"d_model": 4, "d_state": 4}),
    "LRUKernel": (LRUKernel, {"d_model": 4, "d_state": 4}),
    "S4D": (S4D, {"d_model": 4, "d_state": 4}),
    "S4DKernel": (S4DKernel, {"d_model": 4, "d_state": 4}),
    "S4Layer": (S4Layer, {"d_model": 4, "d_state": 4}),
    "S4": (S4, {"d_model": 4, "d_state": 4}),
    "HippoSSKernel": (HippoSSKernel, {"H": 4, "N": 4}),
    "FFTConvS4": (FFTConvS4, {"d_model": 4}),
    "FFTConvLayer": (FFTConvLayer, {"d_model": 4, "d_state": 4}),
}

#: (class, flag) for every bool argument of a public constructor.
FLAGS = [("S4", "bidirectional"), ("S4", "transposed"), ("S4", "tie_dropout"), ("S4", "weight_norm"),
         ("S4Layer", "bidirectional"), ("FFTConvS4", "bidirectional"), ("FFTConvS4", "transposed"),
         ("FFTConvS4", "tie_dropout"), ("FFTConvS4", "swap_channels"), ("FFTConvLayer", "bidirectional")]


#: the name a class's messages use, where it is not the class name
WHO = {"FFTConvLayer": "fftconv"}


def build(name: str, **overrides):
    cls, args = CONSTRUCTORS[name]
    return cls(**{**args, **overrides})


@pytest.mark.parametrize("name, flag", FLAGS)
@pytest.mark.parametrize("value", ["no", "False", 1, None])
def test_bool_arguments_refuse_other_types(name, flag, value):
    want = (f"{WHO.get(name, name)} needs {flag} to be a bool (True or False), got {value!r} ({type(value).__name__}); "
            f"pass {flag}=True or {flag}=False")
    with pytest.raises(TypeError, match="^" + re.escape(want)):
        build(name, **{flag: value})


@pytest.mark.parametrize("name, flag", FLAGS)
def test_bool_arguments_take_bools(name, flag):
    build(name, **{flag: True})


#: (class, argument) for every real-valued argument of a public constructor.
REALS = [("LRU", "r_min"), ("LRU", "r_max"), ("LRU", "max_phase"),
         ("LRUKernel", "r_min"), ("LRUKernel", "r_max"), ("LRUKernel", "max_phase"),
         ("S4D", "dt_min"), ("S4D", "dt_max"), ("S4DKernel", "dt_min"), ("S4DKernel", "dt_max"),
         ("S4Layer", "dt_min"), ("S4Layer", "dt_max"), ("HippoSSKernel", "dt_min"), ("HippoSSKernel", "dt_max"),
         ("S4", "dropout"), ("FFTConvS4", "dropout"), ("FFTConvS4", "drop_kernel")]


@pytest.mark.parametrize("name, arg", REALS)
@pytest.mark.parametrize("value", ["0.1", True, None])
def test_real_arguments_refuse_other_types(name, arg, value):
    with pytest.raises(TypeError, match=rf"^{name} needs {arg} to be a real number, got "):
        build(name, **{arg: value})


@pytest.mark.parametrize("name, arg", [r for r in REALS if r[1] in ("max_phase", "dt_max")])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_real_arguments_refuse_non_finite_values(name, arg, value):
    # max_phase or dt_max = inf was accepted and every output was NaN
    with pytest.raises(ValueError, match=rf"^{name} needs {arg} to be a finite number, got {value!r}"):
        build(name, **{arg: value})


@pytest.mark.parametrize("name", ["S4", "FFTConvS4"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 2])
def test_dropout_outside_0_1_is_refused(name, value):
    # S4 took dropout=-0.1 silently and named no argument for dropout=2 (torch's nn.Dropout message)
    with pytest.raises(ValueError, match=rf"^{name} needs dropout to lie in \[0, 1\) \(a drop probability\), "
                                         rf"got {value!r}"):
        build(name, dropout=value)


@pytest.mark.parametrize("name", ["S4", "S4Layer", "HippoSSKernel"])
@pytest.mark.parametrize("value", [1.5, 2.0, True, "1"])
def test_rank_must_be_an_int(name, value):
    # rank=1.5 failed inside torch.zeros ("zeros() takes 1 positional argument but 2 were given")
    with pytest.raises((TypeError, ValueError), match=r"needs rank to be an int"):
        build(name, rank=value)


@pytest.mark.parametrize("name", ["lru", "s4d", "s4", "fftconv"])
def test_create_layer_passes_the_argument_error_through(name):
    kw = {"dt_max": "0.1"} if name != "lru" else {"max_phase": "x"}
    with pytest.raises(TypeError, match=r"needs (dt_max|max_phase) to be a real number, got '(0\.1|x)' \(str\)"):
        lrnnx_zoo.create_layer(name, 4, d_state=4, **kw)


@pytest.mark.parametrize("fn, arg", [("transition", "N"), ("rank_correction", "rank"), ("nplr", "rank")])
@pytest.mark.parametrize("value", [2.0, "2", True])
def test_hippo_sizes_must_be_ints(fn, arg, value):
    # transition("legs", 64.0) was taken; a float rank failed inside torch.zeros
    from lrnnx_zoo import hippo
    args = {"N": 4, arg: value}
    with pytest.raises(TypeError, match=rf"^{arg} must be an int, got {re.escape(repr(value))}"):
        getattr(hippo, fn)("legs", **args)


#: what each class's repr must show (its main sizes): S4, S4DKernel, LRUKernel and
#: TransposedLinear printed as bare "S4DKernel()" or listed only their children.
REPR_SIZES = {"LRU": ["d_model=4", "d_state=4"], "LRUKernel": ["d_model=4", "d_state=4", "channels=1"],
              "S4D": ["d_model=4", "d_state=4"], "S4DKernel": ["d_model=4", "d_state=4", "channels=1"],
              "S4Layer": ["d_model=4", "d_state=4"], "S4": ["d_model=4", "d_state=4", "channels=1", "transposed=True"],
              "HippoSSKernel": ["H=4", "N=4"], "FFTConvS4": ["d_model=4", "channels=1"],
              "FFTConvLayer": ["d_model=4", "d_state=4"]}


@pytest.mark.parametrize("name", sorted(REPR_SIZES))
def test_repr_shows_the_main_sizes(name):
    m = build(name)
    own = m.extra_repr()                 # the module's own line of repr(m), before its children
    assert own in repr(m)
    missing = [size for size in REPR_SIZES[name] if size not in own]
    assert not missing, f"repr({name}) lacks {missing}: {repr(m)}"


def test_transposed_linear_repr_shows_its_sizes():
    from lrnnx_zoo.plugins.s4 import TransposedLinear
    assert repr(TransposedLinear(3, 5)) == "TransposedLinear(in_features=3, out_features=5, bias=True)"
    assert repr(TransposedLinear(3, 5, bias=False)) == "TransposedLinear(in_features=3, out_features=5, bias=False)"


# -- signatures DESIGN.md promises ----------------------------------------------------------------
def _api():
    import math

    from lrnnx_zoo import convolution, hippo, hookspecs
    from lrnnx_zoo.plugins.s4 import SSKernelNPLR
    from lrnnx_zoo.registry import Registry
    E = inspect.Parameter.empty
    # (object, the leading parameters DESIGN.md lists as (name, default); E: required).
    # An implementation may add parameters after these, never rename, reorder or re-default them.
    return {
        "LRNN.__init__": (lrnnx_zoo.LRNN.__init__, [("discretization", E)]),
        "LRNN.forward": (lrnnx_zoo.LRNN.forward, [("x", E), ("integration_timesteps", None), ("lengths", None)]),
        "LTI_LRNN.step": (lrnnx_zoo.LTI_LRNN.step, [("x", E), ("inference_cache", E)]),
        "LTI_LRNN.allocate_inference_cache": (lrnnx_zoo.LTI_LRNN.allocate_inference_cache,
                                              [("batch_size", E), ("max_seqlen", 1), ("dtype", None)]),
        "fft_conv": (convolution.fft_conv, [("equation", E), ("input", E)]),
        "opt_ssm_forward": (convolution.opt_ssm_forward, [("x", E), ("K", E), ("B_", E), ("C", E)]),
        "FFTConvS4": (convolution.FFTConvS4.__init__, [
            ("d_model", E), ("l_max", None), ("channels", 1), ("swap_channels", False), ("transposed", True),
            ("dropout", 0.0), ("tie_dropout", False), ("drop_kernel", 0.0), ("kernel_type", None),
            ("param_config", None), ("kernel", None)]),
        "FFTConvS4.forward": (convolution.FFTConvS4.forward, [("x", E), ("state", None), ("rate", 1.0)]),
        "FFTConvS4.step": (convolution.FFTConvS4.step, [("x", E), ("state", E)]),
        "LRU": (LRU.__init__, [("d_model", E), ("d_state", 64), ("r_min", 0), ("r_max", 1),
                               ("max_phase", 2 * math.pi)]),
        "S4": (S4.__init__, [("d_model", E), ("d_state", 64), ("l_max", None), ("channels", 1),
                             ("bidirectional", False), ("activation", "gelu"), ("postact", None),
                             ("dropout", 0.0), ("transposed", True)]),
        "S4.forward": (S4.forward, [("u", E), ("rate", 1.0)]),
        "SSKernelNPLR.double_length": (SSKernelNPLR.double_length, []),
        "SSKernelNPLR.register": (SSKernelNPLR.register, [("name", E), ("tensor", E), ("trainable", False),
                                                          ("lr", None), ("wd", None)]),
        "transition": (hippo.transition, [("measure", E), ("N", E)]),
        "bilinear": (hippo.bilinear, [("dt", E), ("A", E), ("B", None)]),
        "krylov": (hippo.krylov, [("L", E), ("A", E), ("b", E), ("c", None), ("return_power", False)]),
        "power": (hippo.power, [("L", E), ("A", E), ("v", None)]),
        "cauchy_conj": (hippo.cauchy_conj, [("v", E), ("z", E), ("w", E)]),
        "register_layers": (hookspecs.lrnnx_zoo_register_layers, [("registry", E)]),
        "register_initializers": (hookspecs.lrnnx_zoo_register_initializers, [("registry", E)]),
        "register_kernel_backends": (hookspecs.lrnnx_zoo_register_kernel_backends, [("registry", E)]),
        "Registry.add_layer": (Registry.add_layer, [("name", E), ("cls", E)]),
        "Registry.add_initializer": (Registry.add_initializer, [("layer", E), ("name", E), ("fn", E)]),
        "Registry.add_backend": (Registry.add_backend, [("kind", E), ("name", E), ("fn", E)]),
        "list_initializers": (lrnnx_zoo.list_initializers, [("layer", None)]),
        "list_backends": (lrnnx_zoo.list_backends, [("kind", None)]),
        "create_layer": (lrnnx_zoo.create_layer, [("name", E), ("d_model", E)]),
        "list_plugins": (lrnnx_zoo.list_plugins, []),
        "SequenceModel.allocate_inference_cache": (lrnnx_zoo.SequenceModel.allocate_inference_cache,
                                                   [("batch_size", E)]),
        "SequenceModel.step": (lrnnx_zoo.SequenceModel.step, [("x", E), ("cache", E)]),
        "SequenceModel.save_pretrained": (lrnnx_zoo.SequenceModel.save_pretrained, [("save_directory", E)]),
        "SequenceModel.push_to_hub": (lrnnx_zoo.SequenceModel.push_to_hub, [("repo_id", E)]),
        "from_pretrained": (lrnnx_zoo.from_pretrained, [("name_or_path", E), ("revision", None), ("cache_dir", None),
                                                        ("local_files_only", False), ("token", None)]),
    }


API = _api()


@pytest.mark.parametrize("name", sorted(API))
def test_signature_matches_design(name):
    fn, want = API[name]
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    got = [(p.name, p.default) for p in params[:len(want)]]
    assert got == want, f"{name}: DESIGN.md promises {want}, the code has {got}"


def test_seed_kernel_forward_takes_the_state_first():
    # DESIGN.md: SSKernelNPLR.forward(state=None, rate=1.0, L=None); the code's order is (L, rate, state)
    # and reads a seed-order positional call by its types
    k = HippoSSKernel(4, N=4)
    s = k.default_state(2)
    K, K_state = k(s, 1.0, 8)
    K2, K_state2 = k(L=8, state=s)
    torch.testing.assert_close(K, K2)
    torch.testing.assert_close(K_state, K_state2)
    assert k(state=None, rate=1.0, L=8)[0].shape == (1, 4, 8)


def test_hook_markers_use_the_project_name():
    assert lrnnx_zoo.hookimpl.project_name == lrnnx_zoo.hookspec.project_name == "lrnnx_zoo"


def test_dir_lists_the_public_api_only():
    # dir(lrnnx_zoo) listed the submodules the package imports for itself (folder_swap, wording,
    # hub_save, ...) beside the public names, as if they were API
    public = {n for n in dir(lrnnx_zoo) if not n.startswith("_")}
    modules = set(lrnnx_zoo._PUBLIC_MODULES)
    assert {"hippo", "export", "training"} <= modules and "wording" not in public
    assert public == {n for n in lrnnx_zoo.__all__ if not n.startswith("_")} | modules
    assert all(getattr(lrnnx_zoo, n).__name__ == f"lrnnx_zoo.{n}" for n in modules)   # imported on first use
    assert "__version__" in dir(lrnnx_zoo)
    assert lrnnx_zoo.wording is not None        # still importable, just not advertised
