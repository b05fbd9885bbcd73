"""Docstrings as contracts: what ``help(obj)`` tells a user is checked against what the code does.

- every ``>>>`` example in the public modules runs under doctest, and the literal examples of
  ``state_from_cache`` / ``cache_from_state`` and ``fft_conv`` run as written;
- every public function, class and method of the public modules has a docstring, and one that
  takes tensors states a shape;
- a table of the shapes the docstrings state, per registered layer family and per seed-style
  class, is held against real outputs;
- documented numbers and behaviours that once disagreed with the code (S4Layer's diagonal-form
  threshold, register_plugin's duplicate names) are checked by behaviour.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import math
import re
import warnings
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo import ModelConfig, SequenceModel, create_layer, list_layers

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: The modules whose public names (``__all__``, else the names defined there) users reach.
PUBLIC_MODULES = [
    "lrnnx_zoo", "lrnnx_zoo.export", "lrnnx_zoo.convolution", "lrnnx_zoo.discretization",
    "lrnnx_zoo.step_forms", "lrnnx_zoo.hippo", "lrnnx_zoo.plugins.lru", "lrnnx_zoo.plugins.s4d",
    "lrnnx_zoo.plugins.fftconv", "lrnnx_zoo.plugins.s4", "lrnnx_zoo.plugins.s4.layer",
    "lrnnx_zoo.plugins.s4.kernel", "lrnnx_zoo.plugins.s4.step", "lrnnx_zoo.plugins.s4.dense",
    "lrnnx_zoo.plugins.s4.generating", "lrnnx_zoo.plugins.s4.measures", "lrnnx_zoo.plugins.s4.modes",
    "lrnnx_zoo.plugins.s4.nn", "lrnnx_zoo.testing",
]

#: A shape as the docstrings write one: "(B, L, H)", "(batch, 2 * N * H)", "(..., N)", "(N,)".
SHAPE = re.compile(r"\((?:\.\.\.|\*?[A-Za-z_]\w*|\d+)(?:\s*[,*+/]\s*[^()]*)?\)")


def public_callables() -> Iterator[Tuple[str, Any]]:
    """(qualified name, object) for each public function and class of PUBLIC_MODULES and each public
    method a class defines itself (``extra_repr`` and dunders aside), once each."""
    seen = set()
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", [a for a in vars(module) if not a.startswith("_")]):
            obj = getattr(module, attr)
            if not callable(obj) or not getattr(obj, "__module__", "").startswith("lrnnx_zoo") or id(obj) in seen:
                continue
            seen.add(id(obj))
            yield f"{name}.{attr}", obj
            if inspect.isclass(obj):
                for member_name, member in vars(obj).items():
                    if isinstance(member, (staticmethod, classmethod)):
                        member = member.__func__
                    if member_name.startswith("_") or member_name == "extra_repr" or not inspect.isfunction(member):
                        continue
                    if id(member) not in seen:
                        seen.add(id(member))
                        yield f"{name}.{attr}.{member_name}", member


def takes_tensors(obj: Any) -> bool:
    try:
        parameters = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    return any("Tensor" in str(p.annotation) for p in parameters)


# -- 1. examples ----------------------------------------------------------------------------------

def defining_modules() -> List[str]:
    """The modules that define the public objects (doctest looks in a module's own objects only)."""
    return sorted({obj.__module__ for _, obj in public_callables() if hasattr(obj, "__module__")}
                  | set(PUBLIC_MODULES))


def test_every_docstring_example_runs():
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    examples = 0
    for name in defining_modules():
        for test in finder.find(importlib.import_module(name), name):
            examples += len(test.examples)
            torch.manual_seed(0)
            runner.run(test)
    assert runner.failures == 0, f"{runner.failures} docstring example(s) failed (doctest's report above)"
    assert examples >= 14, f"expected the LRU and S4D examples at least, found {examples} example lines"


def literal_blocks(doc: str) -> List[str]:
    """The indented blocks after a line ending in '::' (reST literal blocks), dedented."""
    blocks, lines = [], inspect.cleandoc(doc).splitlines()
    for i, line in enumerate(lines):
        if line.rstrip().endswith("::"):
            body = []
            for nxt in lines[i + 1:]:
                if nxt.strip() and not nxt.startswith(" "):
                    break
                body.append(nxt)
            blocks.append(inspect.cleandoc("\n".join(body)))
    return [b for b in blocks if b]


@pytest.fixture(scope="module")
def streaming_setup(tmp_path_factory):
    from lrnnx_zoo.export import OnnxStreamer, to_onnx
    torch.manual_seed(0)
    model = SequenceModel(ModelConfig(layer="s4d", d_input=3, d_output=2, d_model=8, n_layers=2,
                                      layer_kwargs={"d_state": 8}, pooling="mean")).eval()
    path = tmp_path_factory.mktemp("doc") / "m.onnx"
    to_onnx(model, path, exporter="legacy", opset=17)       # the fast exporter: the example is the stream
    return model, OnnxStreamer(path)


def test_state_from_cache_example_continues_a_prompt_in_onnx_runtime(streaming_setup):
    from lrnnx_zoo.export import state_from_cache
    model, streamer = streaming_setup
    (block,) = literal_blocks(state_from_cache.__doc__)
    ns = {"model": model, "prompt": torch.randn(2, 5, 3), "streamer": streamer, "state_from_cache": state_from_cache}
    exec(block, ns)
    x = torch.randn(2, 3)
    y_torch, _ = model.step(x, model.fork_cache(ns["cache"]))
    # float32 graph against the float32 eager step of one system: rounding only (measured 6e-8)
    assert abs(streamer.step(x.numpy()) - y_torch.detach().numpy()).max() < 1e-5


def test_cache_from_state_example_resumes_a_stream(streaming_setup):
    from lrnnx_zoo.export import cache_from_state, state_from_cache
    model, streamer = streaming_setup
    (block,) = literal_blocks(cache_from_state.__doc__)
    _, cache = model.prefill(torch.randn(2, 5, 3))
    x = torch.randn(2, 3)
    y_ref, _ = model.step(x, model.fork_cache(cache))
    ns = {"model": model, "cache": cache, "x": x, "state_from_cache": state_from_cache,
          "cache_from_state": cache_from_state}
    exec(block, ns)
    assert ns["saved"].shape == (2, streamer.state_size) and ns["saved"].dtype == torch.float32   # as commented
    torch.testing.assert_close(ns["y"], y_ref, rtol=0, atol=1e-6)   # a float32 model: the same state


def test_fft_conv_examples_compute_the_causal_convolution():
    from lrnnx_zoo.convolution import fft_conv
    calls = re.findall(r"``(fft_conv\([^`]*\))``", fft_conv.__doc__)
    assert len(calls) == 2, calls
    torch.manual_seed(0)
    B, L, H, N = 2, 9, 3, 4
    ns = {"fft_conv": fft_conv, "x": torch.randn(B, L, H, dtype=torch.float64)}
    x = ns["x"]
    # full kernel K: (L, H, H), as the docstring says
    ns["K"] = torch.randn(L, H, H, dtype=torch.float64)
    y = eval(calls[0], ns)
    ref = torch.stack([sum(x[:, t - j] @ ns["K"][j] for j in range(t + 1)) for t in range(L)], 1)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-10)          # float64 FFT rounding
    # diagonal SSM: powers K: (L, N), B: (N, H), C: (H_out, N), complex result
    ns.update(K=torch.randn(L, N, dtype=torch.complex128), B=torch.randn(N, H, dtype=torch.complex128),
              C=torch.randn(5, N, dtype=torch.complex128))
    y = eval(calls[1], ns)
    xc = x.to(torch.complex128)
    ref = torch.stack([sum((xc[:, t - j] @ ns["B"].T * ns["K"][j]) @ ns["C"].T for j in range(t + 1))
                       for t in range(L)], 1)
    assert y.is_complex()
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-10)


# -- 2. every public callable has a docstring, with shapes where it takes tensors ------------------

def test_every_public_callable_has_a_docstring_with_shapes():
    missing = [q for q, obj in public_callables() if not (obj.__doc__ or "").strip()]
    shapeless = [q for q, obj in public_callables()
                 if (obj.__doc__ or "").strip() and takes_tensors(obj) and not SHAPE.search(obj.__doc__)]
    assert not missing, f"public callables without a docstring: {missing}"
    assert not shapeless, f"docstrings of tensor-taking callables that state no shape: {shapeless}"


# -- 3. the documented shapes ---------------------------------------------------------------------

B, L, H, N = 2, 12, 4, 8


def shapes(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return tuple(shapes(v) for v in value)


#: Per built-in family: what its docstrings state for discretize() and compute_kernel(L).
FAMILY_SHAPES: Dict[str, Dict[str, Any]] = {
    # LRU.discretize: (lam (N,), gamma * B (N, H), C (H, N)); compute_kernel: powers (L, N), gamma * B (N, H)
    "lru": {"discretize": ((N,), (N, H), (H, N)), "compute_kernel": ((L, N), (N, H))},
    # S4D.discretize: (A_bar, B_bar) (H, N/2), C (H, N/2); compute_kernel: K (H, L)
    "s4d": {"discretize": ((H, N // 2),) * 3, "compute_kernel": (H, L)},
    # S4Layer.discretize: (A_bar (H, N, N), B_bar (H, N), C (C, H, N)); compute_kernel: (C, H, L)
    "s4": {"discretize": ((H, N, N), (H, N), (1, H, N)), "compute_kernel": (1, H, L)},
    # FFTConvLayer.compute_kernel: (C, H, L); discretize: the kernel's own (S4DKernel: 4 parts)
    "fftconv": {"discretize": ((H, N // 2), (H, N // 2), (1, H, N // 2), (H, N // 2)), "compute_kernel": (1, H, L)},
}


@pytest.mark.parametrize("name", list_layers())
def test_registered_layer_shapes_are_the_documented_ones(name):
    torch.manual_seed(0)
    layer = create_layer(name, d_model=H, d_state=N)
    x = torch.randn(B, L, H)
    assert shapes(layer(x)) == (B, L, H)                                    # (B, L, H) -> (B, L, H)
    form = layer.step_form()
    assert isinstance(form.state_size, int)
    cache = layer.allocate_inference_cache(B)
    assert shapes(cache["lrnn_state"]) == (B, form.state_size)             # a zero state (B, state_size)
    y_t, cache = layer.step(x[:, 0], cache)
    assert shapes(y_t) == (B, H)                                            # x: (B, H) -> y: (B, H)
    y, s = form(x[:, 0], torch.zeros(B, form.state_size))
    assert shapes((y, s)) == ((B, H), (B, form.state_size))                 # forward(u, s) -> (y, s_next)
    y, cache = layer.prefill(x)
    assert shapes((y, cache["lrnn_state"])) == ((B, L, H), (B, form.state_size))
    assert shapes(layer.final_step_state(x, None, form)) == (B, form.state_size)
    assert shapes(layer.fork_cache(cache, [0, 0, 1])["lrnn_state"]) == (3, form.state_size)
    expected = FAMILY_SHAPES.get(name)
    if expected is not None:              # a third-party layer: the uniform interface only
        assert shapes(layer.discretize()) == expected["discretize"]
        assert shapes(layer.compute_kernel(L)) == expected["compute_kernel"]


@pytest.mark.parametrize("kernel_type", ["s4d", "lru", "s4"])
def test_ssm_kernel_shapes_are_the_documented_ones(kernel_type):
    from lrnnx_zoo.plugins.fftconv import FFTConvS4
    torch.manual_seed(0)
    C = 3
    block = FFTConvS4(H, channels=C, kernel_type=kernel_type, d_state=N)
    kernel = block.kernel
    state = kernel.default_state(B)                                          # (*batch_shape, H, S)
    S = state.shape[-1]
    assert shapes(state) == (B, H, S) and state.is_complex()
    K, K_state = kernel(L=L, state=state)
    assert shapes((K, K_state)) == ((C, H, L), (B, C, H, L))                 # K: (C, H, L), K_state: (B, C, H, L)
    assert shapes(kernel.forward_state(torch.randn(B, H, L), state)) == (B, H, S)
    u = torch.randn(B, H, L)
    y, next_state = block(u, state=state)                                    # (B, H, L) -> (B, C*H, L)
    assert shapes((y, next_state)) == ((B, C * H, L), (B, H, S)) and block.d_output == C * H
    y_t, next_state = block.step(u[..., 0], state)                           # (B, H) -> (B, C*H)
    assert shapes((y_t, next_state)) == ((B, C * H), (B, H, S))


def test_seed_s4_shapes_are_the_documented_ones():
    from lrnnx_zoo.plugins.s4 import S4
    torch.manual_seed(0)
    layer = S4(H, N)
    u = torch.randn(B, H, L)
    y, next_state = layer(u)
    assert shapes(y) == (B, H, L) and next_state is None                     # transposed: (B, H, L)
    y, next_state = layer(u, state=layer.default_state(B))
    assert shapes(next_state) == (B, H, N // 2) and next_state.is_complex()  # (B, H, N/2) complex
    assert shapes(layer.default_state(3, B)) == (3, B, H, N // 2)
    layer.setup_step()
    y_t, next_state = layer.step(u[..., 0], layer.default_state(B))
    assert shapes((y_t, next_state)) == ((B, H), (B, H, N // 2))
    assert shapes(S4(H, N, transposed=False)(torch.randn(B, L, H))[0]) == (B, L, H)


@pytest.mark.parametrize("pooling", [None, "mean", "last"])
def test_sequence_model_shapes_are_the_documented_ones(pooling):
    torch.manual_seed(0)
    model = SequenceModel(ModelConfig(layer="s4d", d_input=3, d_output=5, d_model=H, n_layers=1,
                                      layer_kwargs={"d_state": N}, pooling=pooling)).eval()
    x = torch.randn(B, L, 3)
    assert shapes(model(x)) == ((B, L, 5) if pooling is None else (B, 5))
    y_t, _ = model.step(x[:, 0], model.allocate_inference_cache(B))
    assert shapes(y_t) == (B, 5)


# -- 4. documented numbers and behaviours, by behaviour --------------------------------------------

def documented_number(doc: str, pattern: str) -> float:
    match = re.search(pattern, " ".join(doc.split()))
    assert match, f"the docstring no longer states {pattern!r}"
    return float(match.group(1))


@pytest.mark.parametrize("measure, d_state, dt", [("legs", 4, 1e-2), ("legs", 4, 1e-3), ("fourier", 8, 1e-3),
                                                  ("legt", 8, 1e-1), ("legt", 8, 1e-2)])
def test_s4_layer_picks_the_diagonal_form_below_the_documented_error(measure, d_state, dt):
    """S4Layer's docstring said the diagonal form is taken below a predicted float32 error of 1e-5;
    the "auto" step form takes it below 5e-5. These systems' predicted errors (1.1e-5, 4.5e-5, 1.1e-5,
    2.7e-5, 7.1e-5) lie on either side of 5e-5 and mostly above 1e-5, so the old text misdescribed them."""
    from lrnnx_zoo.plugins.s4 import S4Layer
    from lrnnx_zoo.plugins.s4 import dense
    from lrnnx_zoo.plugins.s4.step import diagonal_form
    threshold = documented_number(S4Layer.__doc__, r"picks the diagonal form when its predicted float32 "
                                                    r"error is below ([0-9.e+-]+)")
    torch.manual_seed(0)
    layer = S4Layer(1, d_state, measure=measure, dt_min=dt, dt_max=dt)
    kernel = layer.kernel
    A_bar, b_bar = kernel.dense_system()
    _, predicted, _ = diagonal_form(A_bar, b_bar, dense.output_row(kernel.output_matrix()),
                                    None, tol=1e30, precision=torch.float32)
    chosen_diagonal = type(layer.step_form()).__name__ == "ChannelDiagonalStepForm"
    assert chosen_diagonal == (predicted < threshold), (predicted, threshold, type(layer.step_form()).__name__)


def test_register_plugin_keeps_a_plugin_whose_names_clash_as_documented():
    import types
    doc = " ".join(lrnnx_zoo.register_plugin.__doc__.split())
    module = types.SimpleNamespace()

    class Clashing(torch.nn.Identity):
        def __init__(self, d_model: int, **_: Any) -> None:
            super().__init__()

    @lrnnx_zoo.hookimpl
    def lrnnx_zoo_register_layers(registry):
        registry.add_layer("s4d", Clashing)
    module.lrnnx_zoo_register_layers = lrnnx_zoo_register_layers
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = lrnnx_zoo.register_plugin(module, name="doc-clash")     # no PluginError
    try:
        assert info.error and "s4d" in info.error
        assert any("clash" in str(w.message) for w in caught)
        assert isinstance(create_layer("doc-clash:s4d", d_model=4), Clashing)
        assert type(create_layer("s4d", d_model=4, d_state=4)).__name__ == "S4D"   # the built-in keeps it
    finally:
        lrnnx_zoo.unregister_plugin("doc-clash")
    # ... which the docstring says, beside "Raises PluginError if it fails"
    assert "<plugin>:<name>" in doc and "warning" in doc and "not a failure" in doc, doc
