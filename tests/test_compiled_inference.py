"""Compiled inference graphs reuse the kernel cache through the ``lrnnx_zoo::cached_spectrum`` operator.

The graphs are compiled with ``aot_eager`` (AOT autograd, no code generation: seconds here), which
runs a graph's first call under a ``__torch_dispatch__`` check of its custom operators, as inductor
does; that first call is where an operator's body once ran with conjugate views unresolved.
Tolerances: a compiled graph sizes its FFTs differently from eager at lengths like 75 (multiples of 8
against 5-smooth numbers), so outputs agree to float32 rounding, 1e-5 of the largest output
(measured 0 to 5e-7); where eager and the graph use one FFT size they agree bit for bit.
"""

from __future__ import annotations

import copy
import threading
from typing import Any, Callable, List

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lrnnx_zoo
from lrnnx_zoo.ssm_kernel import SSMKernel, _cached_spectrum_op
from test_compile_audit import GraphCounter

LAYERS = [("s4d", {}), ("s4", {}), ("s4", {"bidirectional": True}), ("fftconv", {}),
          ("fftconv", {"bidirectional": True, "channels": 2}), ("fftconv", {"kernel_type": "lru"}),
          ("fftconv", {"kernel_type": "s4"})]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def layer_for(name: str, kwargs: dict, H: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    return lrnnx_zoo.create_layer(name, H, d_state=8, **kwargs).eval()


def kernels(module: torch.nn.Module) -> List[SSMKernel]:
    return [m for m in module.modules() if isinstance(m, SSMKernel)]


class KernelCalls:
    """Counts the kernels' generations (``forward`` calls) while installed."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.count = 0
        self.handles = [k.register_forward_hook(self._hook) for k in kernels(module)]

    def _hook(self, *args: Any) -> None:
        self.count += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func: Callable, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool((got - want).abs().max() <= 1e-5 * want.abs().max())


@pytest.mark.parametrize("name,kwargs", LAYERS, ids=lambda v: str(v))
def test_compiled_inference_generates_the_kernel_once_and_matches_eager_from_the_first_call(name, kwargs):
    # Traced, the graph generated the kernel and its spectrum at every call (S4D's compiled forward
    # 8.5 ms against eager's 6.0 at (8, 1024, 128)). Now the operator runs SSMKernel.spectrum eagerly,
    # cache included. Its first call runs under AOT's operator check, a dispatch mode, where S4's
    # conjugate views were read as their plain data: 3.5 off where the output's largest entry was 5.4.
    layer = layer_for(name, kwargs)
    compiled = torch.compile(copy.deepcopy(layer), backend="aot_eager")
    x = torch.randn(2, 75, 16, generator=torch.Generator().manual_seed(1))
    calls = KernelCalls(compiled)
    with torch.no_grad():
        first = compiled(x)
        generated = calls.count
        again = compiled(x)
        want = layer(x)
    calls.remove()
    assert generated >= 1 and calls.count == generated        # the second call generated nothing
    assert close(first, want) and torch.equal(again, first)


@pytest.mark.parametrize("name", ["s4d", "s4"])
def test_compiled_inference_at_eager_fft_size_is_bit_identical(name):
    # L = 64: the graph's transform size (a multiple of 8) is eager's (5-smooth), so the cached
    # spectrum, the convolution and everything around it are the same bits.
    layer = layer_for(name, {})
    x = torch.randn(2, 64, 16)
    with torch.no_grad():
        assert torch.equal(torch.compile(copy.deepcopy(layer), backend="aot_eager")(x), layer(x))


def test_a_compiled_graph_sees_weights_changed_in_place():
    # The operator hands the graph the cache's answer for the weights now (compared by content),
    # as eager does: an optimiser step or an edit under no_grad is seen at the next call.
    layer = layer_for("s4d", {})
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(2, 75, 16)
    with torch.no_grad():
        before = compiled(x)
        layer.kernel.log_dt.add_(0.5)
        after = compiled(x)
        layer.kernel.cache_inference_kernel = False
        want = layer(x)
    assert not close(after, before) and close(after, want)


def test_copies_and_layers_of_one_code_share_graphs_and_answer_from_their_own_kernels():
    # The operator finds its kernel by the tensors the graph passes (the kernel's own storages), not
    # by a number: an integer attribute made every layer of a model compile its own graph (dynamo
    # guards on module integers), up to its recompile limit of 8, past which layers ran eagerly.
    a = layer_for("s4d", {})
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.kernel.log_dt.mul_(0.5)
    backend = GraphCounter()
    forward = torch.compile(type(a).forward, backend=backend)     # one code object, as a model's blocks
    x = torch.randn(2, 75, 16)
    with torch.no_grad():
        ya, yb = forward(a, x), forward(b, x)
        assert close(ya, a(x)) and close(yb, b(x)) and not close(ya, yb)
    assert backend.graphs == 1


def test_a_compiled_s4_graph_does_not_extend_its_stored_length():
    # A graph never writes parameters (the operator declares none), so its eager kernel takes C~ for
    # the longer length without storing it; eager inference now does the same (eager training extends).
    layer = layer_for("s4", {"l_max": 32})
    eager = copy.deepcopy(layer)
    kernel = layer.kernel
    stored = kernel.C.detach().clone()
    x = torch.randn(2, 100, 16)
    with torch.no_grad():
        got = torch.compile(layer, backend="aot_eager")(x)
        want = eager(x)
    assert torch.equal(kernel.C, stored) and kernel.length == 32
    assert eager.kernel.length == 32 and close(got, want)


def test_the_operator_body_resolves_conjugate_views_inside_a_dispatch_mode():
    # Inside a __torch_dispatch__ mode an operator's body runs with the Conjugate and Negative keys
    # excluded; base.operator_body restores them for the eager kernel it runs.
    layer = layer_for("s4", {})
    kernel = layer.kernel
    args = ([t for _, t in kernel._tensors()], 75, 160, 1.0, kernel.channels, kernel.d_model, kernel.state_dtype)
    with torch.no_grad():
        want = kernel.spectrum(75, 160)
        kernel.cache_inference_kernel = False         # generated inside the mode, not taken from the cache
        with Passthrough():
            got = _cached_spectrum_op(*args)
    assert torch.equal(got, want) and got.data_ptr() != want.data_ptr()


def test_the_operator_names_a_kernel_that_does_not_describe_its_spectrum():
    # The graph's placeholder for the spectrum is (channels, d_model, n // 2 + 1) in the kernel's
    # state_dtype; a third-party kernel whose attributes say otherwise gets an error naming them
    # (since SSMKernel.checked_forward, as soon as its kernel disagrees with them).
    layer = layer_for("s4d", {})
    compiled = torch.compile(layer, backend="aot_eager")
    layer.kernel.channels = 3
    with torch.no_grad(), pytest.raises(TypeError, match=r"S4DKernel.forward\(L=75, rate, state\) must return \(K \(C=3, "
                                                         r"H=16, L=75\) \(its channels, d_model\).*; it returned "
                                                         r"\(1, 16, 75\), NoneType"):
        compiled(torch.randn(2, 75, 16))


def test_torch_export_traces_the_kernel_into_a_program_that_stands_alone():
    # The operator finds its kernel among this process's live kernels; an exported program outlives both.
    layer = layer_for("s4d", {})
    x = torch.randn(2, 64, 16)
    with torch.no_grad():
        program = torch.export.export(layer, (x,))
        ops = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
        assert not any("cached_spectrum" in op for op in ops), ops
        assert close(program.module()(x), layer(x))      # the traced kernel: float32 rounding apart


@pytest.mark.parametrize("name,kwargs", [("s4d", {}), ("fftconv", {}), ("fftconv", {"channels": 2, "bidirectional": True}),
                                         ("lru", {}), ("s4", {"l_max": 256})], ids=lambda v: str(v))
def test_torch_export_with_a_dynamic_length_serves_short_and_long_inputs(name, kwargs):
    # The Vandermonde kernel's block count J = L // 32 + 1 was 1 below 32 steps, and a size-1 axis
    # has its own layout: export pinned S4D and FFTConv to L >= 32 (a 3-step input was refused by
    # the program's guard). J = L // 32 + 2 is >= 2 for every L. S4 needs an l_max: without one its
    # C~ covers the next power of two, a range per program.
    layer = layer_for(name, kwargs)
    with torch.no_grad():
        program = torch.export.export(layer, (torch.randn(2, 64, 16),),
                                      dynamic_shapes=({1: torch.export.Dim.AUTO},))
        assert [r.lower for r in program.range_constraints.values()] == [2], program.range_constraints
        for L in (2, 3, 31, 100, 256):
            x = torch.randn(2, L, 16)
            got, want = program.module()(x), layer(x)
            got, want = (got[0], want[0]) if isinstance(want, tuple) else (got, want)
            assert close(got, want), (L, (got - want).abs().max())


@pytest.mark.parametrize("name,kwargs", [("s4d", {}), ("fftconv", {}), ("lru", {}), ("s4", {"l_max": 256})],
                         ids=lambda v: str(v))
def test_torch_export_outside_no_grad_with_a_dynamic_length_serves_two_steps(name, kwargs):
    # docs/semantics.md: a plain torch.export.export(model, ...) with a dynamic length serves every length
    # from 2. Outside no_grad the layers take their training path, where S4D folded D into tap 0 as
    # cat(K[:, :1] + D, K[:, 1:]): the slice's size-1 layout at L = 2 put a guard L != 2 into the program
    # ("Guard failed: -1 + x.size()[1] != 1") while its range constraint still claimed [2, oo).
    layer = layer_for(name, kwargs)
    program = torch.export.export(layer, (torch.randn(2, 64, 16),), dynamic_shapes=({1: torch.export.Dim.AUTO},))
    assert [r.lower for r in program.range_constraints.values()] == [2], program.range_constraints
    for L in (2, 3):
        x = torch.randn(2, L, 16)
        with torch.no_grad():
            got, want = program.module()(x), layer(x)
        assert close(got, want), (L, (got - want).abs().max())


def test_a_graph_whose_weights_no_kernel_holds_says_what_to_do():
    layer = layer_for("s4d", {})
    tensors = [t.clone() for _, t in layer.kernel._tensors()]
    with torch.no_grad(), pytest.raises(RuntimeError, match="no SSM kernel holds the tensors .* cache_inference_kernel"):
        _cached_spectrum_op(tensors, 75, 160, 1.0, 1, 16, torch.complex64)


def test_inductor_freezing_folds_the_spectrum_into_the_graph():
    # With freezing (weights promised constant) inductor runs the operator at compile time to fold
    # it, while compiling: the spectrum it asks for must not call the operator again (it recursed
    # until Python's limit). 1e-5 of the largest output: inductor's own rounding (4.8e-7 measured).
    import torch._inductor.config as inductor_config
    torch.manual_seed(0)
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer="s4d", d_input=3, d_output=2, d_model=16, n_layers=1,
                                                          layer_kwargs={"d_state": 8})).eval()
    x = torch.randn(2, 64, 3)
    with torch.no_grad(), inductor_config.patch(freezing=True):
        got = torch.compile(model)(x)
        assert close(got, model(x))


def test_a_graph_finds_its_kernel_after_the_weights_are_replaced():
    # The operator looks its kernel up by the storages it was last found with; weights loaded with
    # assign=True are new storages, found again by a search of the live kernels.
    layer = layer_for("s4d", {})
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(2, 75, 16)
    other = {k: v * 0.5 if k.endswith("log_dt") else v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        before = compiled(x)
        layer.load_state_dict(other, assign=True)
        after = compiled(x)
        assert close(after, layer(x)) and not close(after, before)


@pytest.mark.parametrize("name,kwargs", LAYERS, ids=lambda v: str(v))
def test_a_compiled_layer_compiles_once(name, kwargs):
    # The graph's check that it does not run inside the operator read a thread-local flag that the
    # operator's first run created: dynamo guarded on its absence, and every compiled layer and model
    # compiled again at its second call (guard failure "not hasattr(_OPERATOR, 'active')").
    # In a fresh thread: the flag is per thread, and this one's may be left by earlier tests.
    layer = layer_for(name, kwargs)
    backend = GraphCounter()
    compiled = torch.compile(layer, backend=backend)
    x = torch.randn(2, 75, 16)
    outputs: List[torch.Tensor] = []

    def serve() -> None:
        with torch.no_grad():
            outputs.extend(compiled(x) for _ in range(3))

    thread = threading.Thread(target=serve)
    thread.start()
    thread.join()
    assert backend.graphs == 1 and len(outputs) == 3
    assert all(torch.equal(y, outputs[0]) for y in outputs)


def test_the_channel_operator_runs_its_blocks_while_another_thread_compiles(monkeypatch):
    # torch.compiler.is_compiling() reads one flag for the whole process, set while any thread traces a
    # graph: the operator's eager body, run meanwhile by a graph in another thread, took the compiled
    # branch of blocked_channel_conv and called the operator again, until a RecursionError.
    from lrnnx_zoo.convolution import _channel_conv_op, blocked_channel_conv
    g = torch.Generator().manual_seed(2)
    u = torch.randn(2, 40, 16, generator=g)
    Kf = torch.fft.rfft(torch.randn(1, 16, 40, generator=g), n=80)
    skip = torch.randn(1, 16, generator=g)
    want = blocked_channel_conv(u, Kf, 80, 1, skip)
    monkeypatch.setattr(torch.compiler, "_is_compiling_flag", True)     # another thread is tracing
    assert torch.equal(_channel_conv_op(u, Kf, 80, 1, skip), want)


@pytest.mark.parametrize("name", ["s4d", "s4", "fftconv"])
def test_threads_share_one_compiled_model(name):
    # Two threads, each calling one compiled model (warmed by one call): every thread recompiled at its
    # second call (above), and a thread compiling while the other ran the channel operator sent that one
    # into a RecursionError. Each thread's outputs against eager, to float32 rounding.
    torch.manual_seed(0)
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer=name, d_input=3, d_output=2, d_model=16, n_layers=2,
                                                          layer_kwargs={"d_state": 8})).eval()
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager")
    xs = [torch.randn(2, 75, 3, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        wants = [model(x) for x in xs]
        compiled(xs[0])
    got, errors = {}, []

    def serve(i: int) -> None:
        try:
            with torch.no_grad():
                for _ in range(3):
                    got[i] = compiled(xs[i])
        except Exception as exc:      # reported below, with the thread's error
            errors.append(repr(exc))

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(close(got[i], wants[i]) for i in range(2))
