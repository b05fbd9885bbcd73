"""torch.compile of SequenceModel and the built-in layers: graphs compiled and graph breaks, counted.

Every check compiles with a counting backend that runs dynamo's FX graph as it is (no AOT or
inductor work: seconds on a 2-core machine), so the results are the eager ops' own and are compared
with eager at 1e-6 (the same ATen ops in the same order; the margin is for nothing but safety).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, List

import pytest
import torch
from torch._dynamo.utils import counters

import lrnnx_zoo
from lrnnx_zoo import ModelConfig, SequenceModel

FAMILIES = ["fftconv", "lru", "s4", "s4d"]


class GraphCounter:
    """A torch.compile backend that counts the graphs dynamo hands it and runs them unchanged."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: List[Any]) -> Callable:
        self.graphs += 1
        return gm.forward


def model_for(layer: str, pooling: Any = "mean", n_layers: int = 2) -> SequenceModel:
    torch.manual_seed(0)
    return SequenceModel(ModelConfig(layer=layer, d_input=3, d_output=2, d_model=8, n_layers=n_layers,
                                     layer_kwargs={"d_state": 4}, pooling=pooling)).eval()


def keep_lengths(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every S4 kernel's C~ kept as stored in eager calls too
    (``extend_length_in_place = False``; a no-op for the other families). A compiled graph never
    rewrites C~ and differentiates the stored parameters; an eager call on a longer sequence would
    rewrite C~ for the new length (the same kernel, other parameters, so other gradients) and
    change what the compiled graphs are guarded on. With this, eager computes what the graphs do."""
    for module in model.modules():
        if hasattr(module, "extend_length_in_place"):
            module.extend_length_in_place = False
    return model


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("layer", FAMILIES)
@pytest.mark.parametrize("dynamic", [None, False])
def test_compiled_step_compiles_one_graph_for_a_whole_stream(layer, dynamic):
    # The step count was a Python int, which dynamo specialises on: with dynamic=False every step
    # retraced (8 graphs, then the recompile limit and eager for the rest of the stream), by default
    # the second step did. And each layer's stale-weights check (data pointers) broke the graph: the
    # loop over blocks ran eager around 5-6 compiled pieces. Now one graph, no break, eager's numbers.
    model, backend = model_for(layer), GraphCounter()
    step = torch.compile(model.step, backend=backend, dynamic=dynamic)
    x = torch.randn(2, 40, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        compiled, eager = model.allocate_inference_cache(2), model.allocate_inference_cache(2)
        for t in range(x.shape[1]):
            y, _ = step(x[:, t], compiled)
            torch.testing.assert_close(y, model.step(x[:, t], eager)[0], rtol=1e-6, atol=1e-6)
    assert (backend.graphs, graph_breaks()) == (1, 0)
    torch.testing.assert_close(compiled["pool_mean"], eager["pool_mean"], rtol=1e-6, atol=1e-6)
    assert torch.equal(compiled["t"], eager["t"]) and compiled["t"].flatten().tolist() == [40, 40]


def test_compiled_step_goes_on_from_prefills_and_over_a_long_stream_in_one_graph():
    # prefill left the count a Python int (x.shape[1]) without lengths and a (B, 1) tensor with them:
    # a compiled step retraced for each kind, then for each step. All three caches now hold a (B, 1)
    # long count, and 1000 steps at batch 1 (dynamic=False, where an int count hit the recompile
    # limit at step 8) stay in the first graph, the counts exact.
    model, backend = model_for("s4d"), GraphCounter()
    step = torch.compile(model.step, backend=backend, dynamic=False)
    g = torch.Generator().manual_seed(2)
    prompt, x = torch.randn(1, 6, 3, generator=g), torch.randn(1, 1000, 3, generator=g)
    with torch.no_grad():
        compiled = [model.prefill(prompt)[1], model.prefill(prompt, torch.tensor([4]))[1],
                    model.allocate_inference_cache(1)]
        eager = [model.prefill(prompt)[1], model.prefill(prompt, torch.tensor([4]))[1],
                 model.allocate_inference_cache(1)]
        for i, (cache, reference) in enumerate(zip(compiled, eager)):
            for t in range(x.shape[1] if i == 2 else 10):     # the prefills' caches: 10 steps each
                y, _ = step(x[:, t], cache)
                y_eager, _ = model.step(x[:, t], reference)
            torch.testing.assert_close(y, y_eager, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(cache["pool_mean"], reference["pool_mean"], rtol=1e-6, atol=1e-6)
    assert (backend.graphs, graph_breaks()) == (1, 0)
    assert [c["t"].item() for c in compiled] == [16, 14, 1000]


def test_s4_length_change_under_compile_does_not_break_at_the_prefill_memo():
    # A compiled S4 forward on a length its C~ does not cover yet traced the change of C~, which asked
    # for the prefill's per-thread shared work (threading.get_ident): a graph break per block and
    # length. That Python-side memo is now skipped while compiling, as the kernel cache is. The length
    # change itself broke the graph too (torch.equal for the weights digest): compiled graphs now
    # take C~ for a covering length functionally and write nothing, so nothing breaks; the outputs
    # are eager's (which still extends C~ in place: the same kernel).
    model = model_for("s4")
    compiled = torch.compile(model, backend=GraphCounter())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for L in (16, 24):
            x = torch.randn(2, L, 3, generator=g)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)
    assert graph_breaks() == 0


# ----------------------------------------------------------------------------------------------
# training and inference over varying lengths
# ----------------------------------------------------------------------------------------------

#: Lengths chosen so that a graph pinned to any property of L fails: 64 (the first, static graph),
#: 96 (the dynamic one), then lengths that are not multiples of 32 or 8 and that change every
#: block and chunk count.
LENGTHS = (64, 96, 100, 45)


def assert_same_gradients(module: torch.nn.Module, compiled: Any, eager: Any, x: torch.Tensor) -> None:
    """The parameter gradients of sum(compiled(x)^2) and sum(eager(x)^2) agree to 1e-4 relative
    (float32 rounding of other FFT sizes and of the scan as matrix products; see train_lengths)."""
    module.zero_grad()
    compiled(x).square().sum().backward()
    got = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    eager(x).square().sum().backward()
    for a, p in zip(got, module.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-4 * p.grad.abs().max().item())


def train_lengths(layer: str, dynamic: Any, lengths=LENGTHS) -> None:
    """Forward and backward of a compiled model (aot_eager: dynamo's graphs, and AOT autograd's
    traced backward, run by the eager kernels) at each length, against eager. The compiled graphs
    take other FFT sizes and the scan as matrix products, so results differ from eager by float32
    rounding (~1e-6 of their scale, measured); 1e-4 relative is the margin."""
    model = keep_lengths(model_for(layer, n_layers=1).train())
    compiled = torch.compile(model, backend="aot_eager", dynamic=dynamic)
    g = torch.Generator().manual_seed(4)
    for L in lengths:
        assert_same_gradients(model, compiled, model, torch.randn(2, L, 3, generator=g))


#: Graphs over LENGTHS from a cold start. S4 without an internal length takes C~ for the next power
#: of two >= L (A_bar^Ld is squared along Ld's bits: a Python int), one graph per range
#: (2^(k-1), 2^k]: 64 the static graph, 96 and 100 the dynamic one of (64, 128], 45 that of (32, 64].
#: Given a length (l_max, or one eager call) it compiles twice, as the others
#: (test_s4_with_an_internal_length_compiles_twice_over_varying_lengths).
COLD_START_GRAPHS = {"fftconv": 2, "lru": 2, "s4": 3, "s4d": 2}


@pytest.mark.parametrize("layer", FAMILIES)
def test_training_over_varying_lengths_compiles_twice_by_default(layer):
    # Every length compiled a new graph (5 lengths: 5 graphs, 15-40 s each with inductor): the FFT
    # size search, the copy loops, the Vandermonde block length and the scan's chunking each pinned
    # L. Now the second length gives the graph with L symbolic, and every later length reuses it.
    # S4 compiled a graph per length and broke 9 times over these lengths (C~ rewritten in place in
    # the graph; torch.equal in its weights-digest bookkeeping, then every resumed frame again).
    train_lengths(layer, None)
    assert (counters["stats"]["unique_graphs"], graph_breaks()) == (COLD_START_GRAPHS[layer], 0)


@pytest.mark.parametrize("layer", ["s4d", "fftconv"])
def test_short_and_long_lengths_share_the_dynamic_graph(layer):
    # The Vandermonde kernel's block count was 1 below 32 steps (a size-1 axis, another layout), so
    # every length under 32 compiled a graph of its own; now one dynamic graph serves them all.
    train_lengths(layer, None, (64, 96, 20, 5, 3, 1100))
    assert (counters["stats"]["unique_graphs"], graph_breaks()) == (2, 0)


@pytest.mark.parametrize("layer", FAMILIES)
def test_training_with_dynamic_shapes_compiles_once(layer):
    # dynamic=True: a float default argument (rate=1.0) is symbolic there, and check_rate's
    # math.isfinite broke the graph at every kernel; math.pi in the Vandermonde factors failed
    # inside dynamo (AssertionError: lift_tracked_freevar_to_input).
    train_lengths(layer, True, LENGTHS[1:3])
    assert (counters["stats"]["unique_graphs"], graph_breaks()) == (1, 0)


@pytest.mark.parametrize("layer", FAMILIES)
def test_inference_over_varying_lengths_compiles_twice(layer):
    # The blocked inference convolution's time tiles (a Python loop over L) pinned the length.
    model, backend = keep_lengths(model_for(layer)), GraphCounter()
    compiled = torch.compile(model, backend=backend)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for L in LENGTHS:
            x = torch.randn(2, L, 3, generator=g)
            # other FFT sizes than eager's: float32 rounding apart (see train_lengths)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    # Twice for every family: S4's kernel runs eagerly inside lrnnx_zoo::cached_spectrum, so its
    # power-of-two lengths (COLD_START_GRAPHS) no longer make graphs; they did, 3, until session 18.
    assert (backend.graphs, graph_breaks()) == (2, 0)


def s4_model(**layer_kwargs: Any) -> SequenceModel:
    torch.manual_seed(0)
    return SequenceModel(ModelConfig(layer="s4", d_input=3, d_output=2, d_model=8, n_layers=1,
                                     layer_kwargs={"d_state": 4, **layer_kwargs}, pooling="mean")).train()


def train_against(compiled: Callable, eager: torch.nn.Module, model: torch.nn.Module, lengths) -> None:
    """Forward and gradients of ``compiled`` (over ``model``'s parameters) against ``eager`` (over its
    own) at each length; tolerances of :func:`train_lengths`."""
    g = torch.Generator().manual_seed(4)
    for L in lengths:
        x = torch.randn(2, L, 3, generator=g)
        model.zero_grad()
        eager.zero_grad()
        y, y_eager = compiled(x), eager(x)
        torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-5)
        y.square().sum().backward()
        y_eager.square().sum().backward()
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4 * q.grad.abs().max().item(), msg=name)


@pytest.mark.parametrize("discretization", ["bilinear", "zoh"])
@pytest.mark.parametrize("given", ["l_max", "eager call"])
def test_s4_with_an_internal_length_compiles_twice_over_varying_lengths(given, discretization):
    # With C~ for a length covering the inputs (l_max, or one eager call at the longest length, the
    # advice in docs/semantics.md) every shorter length takes the stored C~ and the first L samples of its kernel,
    # as eager does: one graph with L symbolic after the static first, no break, no matrix power in the
    # graph. zoh's Krylov blocks are sized for that length too (from L itself: a graph per length).
    # Eager here is the default (C~ extended in place), which has nothing to extend below 128.
    model = s4_model(discretization=discretization, **({"l_max": 128} if given == "l_max" else {}))
    if given == "eager call":
        with torch.no_grad():
            model(torch.randn(1, max(LENGTHS), 3))
    kernel = model.blocks[0].layer.kernel
    stored = (kernel.C.detach().clone(), int(kernel.L))
    train_against(torch.compile(model, backend="aot_eager"), model, model, LENGTHS)
    assert (counters["stats"]["unique_graphs"], graph_breaks()) == (2, 0)
    assert torch.equal(kernel.C, stored[0]) and int(kernel.L) == stored[1] == kernel.length


@pytest.mark.parametrize("discretization", ["bilinear", "zoh"])
def test_s4_compiled_past_its_length_keeps_C_tilde_and_matches_eager(discretization):
    # Inputs longer than C~ covers (l_max=32; 45 and 100, cold starts for the compiled graphs): eager
    # rewrites C~ in place for 64, then 128, with a graph break at each in a compiled model before.
    # The graphs take C~ for the doubled length functionally (the same float64 factor
    # prod (I + A_bar^(2^i 32)), so the same kernel) and leave C and L as they were: one graph per
    # doubling, no break. Outputs against the default eager (in place: same kernel), gradients
    # against eager with C~ kept (keep_lengths: the same function of the same parameters).
    model = s4_model(discretization=discretization, l_max=32)
    in_place, kept = copy.deepcopy(model), keep_lengths(copy.deepcopy(model))
    kernel = model.blocks[0].layer.kernel
    stored = (kernel.C.detach().clone(), int(kernel.L))
    compiled = torch.compile(model, backend="aot_eager")
    train_against(compiled, kept, model, (45, 100, 90))
    assert (counters["stats"]["unique_graphs"], graph_breaks()) == (2, 0)
    assert torch.equal(kernel.C, stored[0]) and int(kernel.L) == stored[1] == 32
    with torch.no_grad():
        x = torch.randn(2, 100, 3, generator=torch.Generator().manual_seed(8))
        torch.testing.assert_close(compiled(x), in_place(x), rtol=1e-4, atol=1e-5)
    assert in_place.blocks[0].layer.kernel.length == 32 and kernel.length == 32    # inference extends none


@pytest.mark.parametrize("discretization", ["bilinear", "zoh"])
@pytest.mark.parametrize("l_max, L, extended_to", [(32, 100, 128), (None, 45, 45), (32, 20, 32)])
def test_s4_kernel_with_C_tilde_kept_equals_the_extended_one(discretization, l_max, L, extended_to):
    # extend_length_in_place=False (what compiled graphs do): C~ for the covering length is taken on
    # each call and the stored C and L stay. Past the length (32 -> 128) it is the float64 product eager
    # applies in place, rounded once as eager stores it: the same float32 kernel (0 measured); from a
    # cold start (no length: C~ for 64 against eager's 45) and for zoh only rounding apart (3e-7 and
    # 4e-8 of the largest sample measured); 1e-6 relative is the margin.
    from lrnnx_zoo.plugins.s4 import HippoSSKernel

    torch.manual_seed(0)
    extended = HippoSSKernel(8, N=8, L=l_max, discretization=discretization)
    kept = copy.deepcopy(extended)
    kept.extend_length_in_place = False
    stored = kept.C.detach().clone()
    K, K_kept = extended(L=L)[0], kept(L=L)[0]
    torch.testing.assert_close(K_kept, K, rtol=0, atol=1e-6 * K.abs().max().item())
    assert torch.equal(kept.C, stored) and kept.length == int(kept.L) == (l_max or 0)
    assert extended.length == extended_to


def test_s4_with_C_tilde_kept_one_graph_over_two_lengths_backpropagates():
    # m(x8) + m(x40) refuses its backward by default (the second forward rewrote C~; test_s4). With C~
    # kept, as the length-guard error suggests, it runs, and its gradients are the sum of the two
    # calls' own (float64: 1e-10, summation order apart).
    torch.manual_seed(0)
    layer = keep_lengths(lrnnx_zoo.create_layer("s4", 4, d_state=8, l_max=8).double())
    x8, x40 = torch.randn(2, 8, 4, dtype=torch.float64), torch.randn(2, 40, 4, dtype=torch.float64)
    (layer(x8).sum() + layer(x40).sum()).backward()
    together = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    layer(x8).sum().backward()
    layer(x40).sum().backward()
    for a, p in zip(together, layer.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-10, atol=1e-10 * p.grad.abs().max().item())
    assert layer.kernel.length == 8


def test_s4_compiled_at_another_rate_matches_eager():
    # At rate != 1 the kernel takes C~ for (dt / rate, Ld) from the plain C, which eager does at Ld = L
    # (A_bar^L squared along L's bits: a graph per length compiled); compiled graphs use the next
    # power of two >= L and truncate, so one graph per range (2^(k-1), 2^k]: 64 static, (64, 128]
    # for 96 and 100, (32, 64] for 45. Eager at rate != 1 never rewrites C~: plain eager is the reference.
    from lrnnx_zoo.plugins.s4 import S4

    torch.manual_seed(0)
    layer = S4(8, d_state=4, transposed=False)
    compiled = torch.compile(lambda u: layer(u, rate=0.5)[0], backend="aot_eager")
    g = torch.Generator().manual_seed(9)
    for L in LENGTHS:
        assert_same_gradients(layer, compiled, lambda u: layer(u, rate=0.5)[0], torch.randn(2, L, 8, generator=g))
    assert (counters["stats"]["unique_graphs"], graph_breaks()) == (3, 0)
    assert layer.kernel.length == 0


def test_compiled_scan_is_the_eager_scan_in_both_directions_with_a_state():
    # Compiled graphs run the eager chunked scan as one operator (lrnnx_zoo::chunked_scan, its
    # backward the reverse scan through the operator again), complex64 with a complex128 lam, and
    # one graph (L symbolic) serves every length, those below a chunk too. The states are the
    # eager ones bit for bit; the gradients within 1e-6 of their largest entry (measured 4.3e-8:
    # the compiled loss's own backward, decomposed by AOTAutograd, rounds its g differently).
    from lrnnx_zoo.scan import diagonal_scan

    g = torch.Generator().manual_seed(6)
    lam = torch.polar(torch.rand(4, dtype=torch.float64, generator=g) * 0.2 + 0.8,
                      torch.rand(4, dtype=torch.float64, generator=g) * 3).requires_grad_()

    def run(scan, x, s0):
        y = scan(lam, x, s0, reverse=True, lam_dtype=torch.complex128)
        return (y, *torch.autograd.grad(y.abs().square().sum(), (lam, x, s0)))

    compiled = torch.compile(diagonal_scan, backend="aot_eager", dynamic=True)
    for L in (5, 9, 32, 45, 70, 1100):
        x = torch.randn(2, L, 4, dtype=torch.complex64, generator=g).requires_grad_()
        s0 = torch.randn(2, 4, dtype=torch.complex64, generator=g).requires_grad_()
        got, want = run(compiled, x, s0), run(diagonal_scan, x, s0)
        assert torch.equal(got[0], want[0])
        for a, b in zip(got[1:], want[1:]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6 * b.abs().max().item())
    assert (counters["stats"]["unique_graphs"], graph_breaks()) == (1, 0)


@pytest.mark.parametrize("dtype", [torch.complex128, torch.float64])
def test_compiled_scan_gradients_stay_finite_where_powers_underflow(dtype):
    # An LRU's fast modes (|lam| < 0.5) next to slow ones over 1100 steps, real lams of both signs
    # too: a traced scan once built lam^32..lam^1024 for its second level, which underflowed, and
    # its cumprod backward gave NaN gradients (and NaN weights after the optimizer step). The
    # compiled graph's scan, its gradients included, must equal the eager scan's exactly.
    from lrnnx_zoo.scan import diagonal_scan

    g = torch.Generator().manual_seed(7)
    mag = torch.cat([torch.rand(3, dtype=torch.float64, generator=g) * 0.3 + 0.05,
                     torch.rand(3, dtype=torch.float64, generator=g) * 0.1 + 0.89])
    if dtype.is_complex:
        lam = torch.polar(mag, torch.rand(6, dtype=torch.float64, generator=g) * 3)
    else:
        lam = mag * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0], dtype=torch.float64)  # signs too
    lam.requires_grad_()
    x = torch.randn(2, 1100, 6, dtype=dtype, generator=g).requires_grad_()

    def run(scan):
        y = scan(lam, x)
        return (y, *torch.autograd.grad(y.abs().square().sum(), (lam, x)))

    got = run(torch.compile(diagonal_scan, backend="aot_eager"))
    want = run(diagonal_scan)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and torch.equal(a, b)


class OpRecorder(GraphCounter):
    """GraphCounter that also records the operators its graphs call."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: List[str] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: List[Any]) -> Callable:
        self.ops += [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]
        return super().__call__(gm, example_inputs)


@pytest.mark.parametrize("layer,operator", [("lru", "lrnnx_zoo.chunked_scan"), ("s4d", "lrnnx_zoo.blocked_conv"),
                                            ("fftconv", "lrnnx_zoo.blocked_conv"), ("s4", "lrnnx_zoo.blocked_conv"),
                                            ("s4", "lrnnx_zoo.shared_cauchy")])
def test_compiled_training_calls_the_eager_kernels_as_operators(layer, operator):
    # A compiled graph runs LRU's chunked scan, the blocked convolution (S4D, FFTConv, S4) and S4's
    # Cauchy sums as single operators (torch.library custom ops), not traced stand-ins that were
    # slower than eager.
    # Output and every gradient against eager, relative to each tensor's largest entry: 1e-5
    # (compiled graphs size their FFTs to multiples of 8, eager to 5-smooth numbers, and S4's
    # float64 refinement of ill-conditioned nodes is skipped in a graph; measured: lru 0, s4d and
    # fftconv 5.0e-7, s4 1.5e-6).
    torch.manual_seed(0)
    m = keep_lengths(lrnnx_zoo.create_layer(layer, 16, d_state=8))     # S4: eager differentiates what a graph does
    x = torch.randn(2, 75, 16, requires_grad=True)
    params = [p for p in m.parameters() if p.requires_grad]

    def run(f):
        y = f(x)
        return [y.detach(), *torch.autograd.grad((y * torch.linspace(-1, 1, 16)).sum(), [x] + params)]

    recorder = OpRecorder()
    got = run(torch.compile(m, backend=recorder, fullgraph=True))
    want = run(m)
    assert any(operator in op for op in recorder.ops), recorder.ops
    errs = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, want)]
    assert max(errs) <= 1e-5, errs


def test_the_kernel_operators_pass_torch_library_checks():
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch with dynamic
    # shapes (torch.library.opcheck), and float64 gradients against finite differences, for the
    # blocked convolution, the chunked scan and the shared-pole Cauchy sums.
    from lrnnx_zoo.convolution import _blocked_conv_op
    from lrnnx_zoo.scan import _chunked_scan_op

    torch.manual_seed(0)
    f64 = torch.float64
    K = torch.randn(2, 5, 12, dtype=f64, requires_grad=True)
    D = torch.randn(2, 5, dtype=f64, requires_grad=True)
    for channels_last in (True, False):
        x = torch.randn(2, 20, 5, dtype=f64) if channels_last else torch.randn(2, 5, 20, dtype=f64)
        x.requires_grad_()
        for skip in (D, None):
            torch.library.opcheck(_blocked_conv_op, (x, K, 32, skip, channels_last))
        assert torch.autograd.gradcheck(lambda x, K, D: _blocked_conv_op(x, K, 32, D, channels_last)[0], (x, K, D))
    lam = torch.polar(torch.rand(4, dtype=f64) * 0.5 + 0.4, torch.rand(4, dtype=f64) * 3).unsqueeze(0).requires_grad_()
    xs = torch.randn(2, 30, 4, dtype=torch.complex128, requires_grad=True)
    s0 = torch.randn(2, 4, dtype=torch.complex128, requires_grad=True)
    for args in ((lam, xs, s0, False, None), (lam, xs, None, True, 8)):
        torch.library.opcheck(_chunked_scan_op, args)
    assert torch.autograd.gradcheck(lambda lam, xs, s0: _chunked_scan_op(lam, xs, s0, True, 8), (lam, xs, s0))
    from lrnnx_zoo.kernels.cauchy_shared import _shared_cauchy_op
    c128 = torch.complex128
    w = torch.complex(-torch.rand(3, 5, dtype=f64), torch.randn(3, 5, dtype=f64))
    ab = torch.randn(3, 4, 5, dtype=f64, requires_grad=True)                       # real numerators
    c = (2 * w.real).unsqueeze(-1).to(c128).requires_grad_()
    d = w.abs().square().unsqueeze(-1).to(c128).requires_grad_()
    z = torch.complex(torch.zeros(7, dtype=f64), torch.tan(torch.linspace(0, 1.4, 7, dtype=f64)))
    torch.library.opcheck(_shared_cauchy_op, (ab, c, d, z, 3))                      # 3 node blocks, the last short
    assert torch.autograd.gradcheck(lambda ab, c, d: _shared_cauchy_op(ab, c, d, z, 3), (ab, c, d))


@pytest.mark.parametrize("layer", ["s4d", "fftconv", "s4"])
def test_compiled_inference_calls_the_blocked_channel_convolution(layer):
    # In inference a compiled graph convolves through blocked_channel_conv's blocks as one
    # operator (lrnnx_zoo::channel_conv). Against eager (which reuses its cached spectrum, the graph
    # recomputes it): 1e-5 of the largest output (FFT sizes and S4's refinement as above).
    torch.manual_seed(0)
    m = keep_lengths(lrnnx_zoo.create_layer(layer, 16, d_state=8).eval())
    x = torch.randn(2, 75, 16)
    recorder = OpRecorder()
    with torch.no_grad():
        got = torch.compile(m, backend=recorder, fullgraph=True)(x)
        want = m(x)
    assert any("lrnnx_zoo.channel_conv" in op for op in recorder.ops), recorder.ops
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
