"""Forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad) through every family.

Each hand-written autograd Function has a jvp; torch.autograd.gradcheck(check_forward_ad=True)
compares it with finite differences in float64 (its default tolerances: atol 1e-5, rtol 1e-3).
Through whole layers, torch.func.jvp against central differences in float64 (eps 1e-6: truncation
~1e-12, rounding ~1e-10 of the largest tangent; measured 4e-11 to 4e-10), to 1e-7 of the largest
tangent; dual tensors (torch.autograd.forward_ad) against torch.func.jvp to 1e-12 (measured: equal).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, jacfwd, jacrev, jvp

import lrnnx_zoo
from lrnnx_zoo.convolution import causal_conv, channels_first_conv, channels_last_conv, swap_time_and_channels
from lrnnx_zoo.kernels.cauchy import cauchy_conj_torch, cauchy_torch
from lrnnx_zoo.kernels.cauchy_shared import cauchy_conj_shared
from lrnnx_zoo.kernels.vandermonde import vandermonde_torch
from lrnnx_zoo.scan import diagonal_scan

f64, c128 = torch.float64, torch.complex128
LAYERS = [("s4d", {}), ("s4", {}), ("s4", {"bidirectional": True}), ("fftconv", {}),
          ("fftconv", {"bidirectional": True, "channels": 2}), ("fftconv", {"kernel_type": "s4"}),
          ("fftconv", {"kernel_type": "lru"}), ("lru", {}), ("lru", {"backend": "fft"})]


def forward_check(fn, *inputs) -> bool:
    return torch.autograd.gradcheck(fn, inputs, check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_grad=False)


def cplx(*shape, g):
    return torch.complex(torch.randn(*shape, generator=g, dtype=f64), torch.randn(*shape, generator=g, dtype=f64))


# -- the Functions ----------------------------------------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True])
def test_scan_jvp(reverse):
    g = torch.Generator().manual_seed(0)
    lam = (0.9 * cplx(2, 3, g=g) / cplx(2, 3, g=g).abs()).requires_grad_()
    x, s0 = cplx(2, 7, 3, g=g).requires_grad_(), cplx(2, 3, g=g).requires_grad_()
    assert forward_check(lambda lam, x, s0: diagonal_scan(lam, x, s0, reverse=reverse, chunk_size=3), lam, x, s0)


def test_convolution_jvps():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 4, dtype=f64, generator=g, requires_grad=True)
    K = torch.randn(2, 4, 9, dtype=f64, generator=g, requires_grad=True)
    skip = torch.randn(2, 4, dtype=f64, generator=g, requires_grad=True)
    assert forward_check(lambda x, K, skip: channels_last_conv(x, K, 18, skip), x, K, skip)        # blocked
    assert forward_check(lambda x, K, skip: channels_first_conv(x.transpose(1, 2), K, 18, skip), x, K, skip)
    assert forward_check(lambda x, K: causal_conv(x.transpose(1, 2), K), x, K)                   # whole tensor
    assert forward_check(lambda x: swap_time_and_channels(x, pad_to=16), x)


def test_kernel_jvps():
    g = torch.Generator().manual_seed(2)
    v, w = cplx(3, 4, g=g).requires_grad_(), (cplx(3, 4, g=g) - 2).requires_grad_()
    z = cplx(6, g=g).requires_grad_()
    log_lam = (cplx(3, 4, g=g) * 0.1 - 0.2).requires_grad_()
    assert forward_check(lambda v, z, w: cauchy_torch(v, z, w, chunk_size=4), v, z, w)
    assert forward_check(lambda v, z, w: cauchy_conj_torch(v, z, w, chunk_size=4), v, z, w)
    # shared poles (w broadcast over a row of v), the S4 kernel's form
    w1 = (cplx(1, 4, g=g) - 2).requires_grad_()
    assert forward_check(lambda v, z, w: cauchy_conj_shared(v, z, w, chunk_size=4), v, z, w1)
    assert forward_check(lambda v, a: vandermonde_torch(v, a, 11, conj=True, chunk_size=4), v, log_lam)
    assert forward_check(lambda v, a: vandermonde_torch(v, a, 11, conj=False, chunk_size=4), v, log_lam)


# -- whole layers -------------------------------------------------------------------------------------

def layer_for(name: str, kwargs: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer(name, 8, d_state=4, **kwargs).to(f64)
    for module in layer.modules():       # the finite differences must not rewrite S4's C~ in place
        if hasattr(module, "extend_length_in_place"):
            module.extend_length_in_place = False
    return layer


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,kwargs", LAYERS, ids=lambda v: str(v))
def test_layer_jvp_against_finite_differences_and_dual_tensors(name, kwargs, train):
    layer = layer_for(name, kwargs).train(train)
    if train:                            # no dropout draws: the same function at every call
        for module in layer.modules():
            for attr in ("dropout", "drop_kernel"):
                if isinstance(getattr(module, attr, None), float):
                    setattr(module, attr, 0.0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 20, 8, dtype=f64, generator=g)
    params = {k: p.detach() for k, p in layer.named_parameters()}
    primals = (params, x)
    tangents = ({k: torch.randn(p.shape, dtype=p.dtype, generator=g) for k, p in params.items()},
                torch.randn(x.shape, dtype=f64, generator=g))

    def f(p, x):
        return functional_call(layer, p, (x,))

    _, t = jvp(f, primals, tangents)
    eps = 1e-6
    with torch.no_grad():
        shifted = [f({k: params[k] + s * eps * tangents[0][k] for k in params}, x + s * eps * tangents[1])
                   for s in (1, -1)]
    fd = (shifted[0] - shifted[1]) / (2 * eps)
    assert (t - fd).abs().max() <= 1e-7 * t.abs().max()
    with fwAD.dual_level():
        duals = {k: fwAD.make_dual(params[k], tangents[0][k]) for k in params}
        t_dual = fwAD.unpack_dual(f(duals, fwAD.make_dual(x, tangents[1]))).tangent
    assert (t_dual - t).abs().max() <= 1e-12 * t.abs().max()


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")   # torch's GLU under vmap
@pytest.mark.parametrize("layer", ["s4d", "s4", "fftconv", "lru"])
def test_jacfwd_equals_jacrev_through_a_model(layer):
    # norms, GLU, pooling and the layers together: forward- and reverse-mode Jacobians in float64
    torch.manual_seed(0)
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer=layer, d_input=2, d_output=3, d_model=8, n_layers=2,
                                                          layer_kwargs={"d_state": 4}, pooling="mean")).to(f64).eval()
    x = torch.randn(1, 12, 2, dtype=f64)
    forward_jac, reverse_jac = jacfwd(model)(x), jacrev(model)(x)
    assert (forward_jac - reverse_jac).abs().max() <= 1e-10 * reverse_jac.abs().max()


def test_dual_tensors_leave_no_tangent_in_the_kernel_cache():
    # Duals on the weights do not require grad: the inference paths and the kernel cache took them,
    # and a kernel carrying a tangent would be reused by later plain calls.
    layer = layer_for("s4d", {}).eval()
    x = torch.randn(2, 20, 8, dtype=f64)
    fresh = copy.deepcopy(layer)
    params = {k: p.detach() for k, p in layer.named_parameters()}
    with fwAD.dual_level():
        duals = {k: fwAD.make_dual(p, torch.ones_like(p)) for k, p in params.items()}
        functional_call(layer, duals, (x,))
    assert layer.kernel.__dict__.get("_kernel_cache") is None
    with torch.no_grad():
        assert torch.equal(layer(x), fresh(x))


def test_forward_ad_does_not_extend_s4_lengths_in_place():
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer("s4", 8, d_state=4, l_max=8).to(f64)
    stored = layer.kernel.C.detach().clone()
    x = torch.randn(1, 20, 8, dtype=f64)
    with fwAD.dual_level():
        y = layer(fwAD.make_dual(x, torch.ones_like(x)))
        assert fwAD.unpack_dual(y).tangent is not None
    assert torch.equal(layer.kernel.C, stored) and layer.kernel.length == 8


@pytest.mark.parametrize("name", ["lru", "s4d", "fftconv", "s4"])
def test_hessian_forward_over_reverse_equals_reverse_over_reverse(name):
    # torch.func.hessian is jacfwd(jacrev): the jvps run over the backward's own Functions (measured
    # 1e-16 apart from jacrev(jacrev) at |H| ~ 3).
    layer = layer_for(name, {})
    x = torch.randn(1, 6, 8, dtype=f64, generator=torch.Generator().manual_seed(5))

    def f(x):
        return layer(x).square().sum()

    forward_over_reverse, reverse_over_reverse = torch.func.hessian(f)(x), jacrev(jacrev(f))(x)
    assert (forward_over_reverse - reverse_over_reverse).abs().max() <= 1e-12 * reverse_over_reverse.abs().max()


@pytest.mark.parametrize("name,kwargs", [("lru", {}), ("lru", {"backend": "fft"}), ("s4d", {}), ("fftconv", {}), ("s4", {})],
                         ids=lambda v: str(v))
def test_hessian_vector_product_as_jvp_of_grad(name, kwargs):
    # jvp(grad(f)) runs forward-mode AD through the backward's Functions; LRU's scan backward called
    # its Function without the jvp variant ("You must implement the jvp function"). Against
    # reverse-over-reverse, 1e-10 of the product (measured ~1e-16).
    layer = layer_for(name, kwargs)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 40, 8, dtype=f64, generator=g)
    v = torch.randn(x.shape, dtype=f64, generator=g)

    def f(x):
        return torch.tanh(layer(x)).pow(3).sum()

    _, hv = torch.func.jvp(torch.func.grad(f), (x,), (v,))
    want = (jacrev(jacrev(f))(x).reshape(x.numel(), -1) @ v.reshape(-1)).reshape(x.shape)
    assert (hv - want).abs().max() <= 1e-10 * want.abs().max()
    if name != "lru":       # the FFT convolutions refuse create_graph (their message names torch.func.grad)
        return
    with fwAD.dual_level():                     # the same product by dual numbers through create_graph
        xd = fwAD.make_dual(x.clone().requires_grad_(), v)
        (gx,) = torch.autograd.grad(f(xd), xd, create_graph=True)
        assert (fwAD.unpack_dual(gx).tangent - want).abs().max() <= 1e-10 * want.abs().max()


@pytest.mark.parametrize("name,kwargs", [("lru", {}), ("s4d", {}), ("s4", {}), ("fftconv", {"channels": 2}),
                                         ("fftconv", {"bidirectional": True})], ids=lambda v: str(v))
def test_batched_backward_gives_the_jacobian_of_input_and_weights(name, kwargs):
    # autograd.grad(..., is_grads_batched=True) and jacobian(..., vectorize=True) vmap the backward,
    # and the blocked convolution's backward wrote into its buffers ("vmap: aten::copy_ ... not
    # possible"). Against one backward per output row: 1e-12 of the largest entry (measured 2e-16).
    layer = layer_for(name, kwargs)
    x = torch.randn(1, 6, 8, dtype=f64, generator=torch.Generator().manual_seed(8), requires_grad=True)
    y = layer(x)
    y = y[0] if isinstance(y, tuple) else y
    inputs = [x, *(p for p in layer.parameters() if p.requires_grad)]
    rows = torch.eye(y.numel(), dtype=f64)[:12].reshape(12, *y.shape)
    batched = torch.autograd.grad(y, inputs, rows, is_grads_batched=True, retain_graph=True)
    for i, row in enumerate(rows):
        one = torch.autograd.grad(y, inputs, row, retain_graph=True)
        for got, want in zip(batched, one):
            assert (got[i] - want).abs().max() <= 1e-12 * max(want.abs().max(), 1e-300)
    jac = torch.autograd.functional.jacobian(lambda x: layer(x)[0] if name == "s4" else layer(x), x.detach(),
                                             vectorize=True)
    assert (jac.reshape(y.numel(), -1)[:12] - batched[0].reshape(12, -1)).abs().max() <= 1e-12 * jac.abs().max()


def central_difference_check(f, primals) -> None:
    """torch.func.jvp of f at primals against central differences (float64, eps 1e-6), 1e-7 of the
    largest tangent."""
    g = torch.Generator().manual_seed(6)
    tangents = tuple(torch.randn(p.shape, dtype=p.dtype, generator=g) for p in primals)
    _, t = jvp(f, primals, tangents)
    eps = 1e-6
    with torch.no_grad():
        fd = (f(*[p + eps * q for p, q in zip(primals, tangents)])
              - f(*[p - eps * q for p, q in zip(primals, tangents)])) / (2 * eps)
    assert (t - fd).abs().max() <= 1e-7 * t.abs().max()


@pytest.mark.parametrize("name", ["s4d", "s4", "fftconv", "lru"])
def test_padded_batches_and_prefill_under_jvp(name):
    # measured 1.2e-10 to 2.6e-10 of the largest tangent
    layer = layer_for(name, {})
    lengths = torch.tensor([20, 13])
    central_difference_check(lambda x: layer(x, lengths=lengths), (torch.randn(2, 20, 8, dtype=f64),))
    torch.manual_seed(0)
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer=name, d_input=2, d_output=3, d_model=8, n_layers=2,
                                                          layer_kwargs={"d_state": 4})).to(f64).eval()
    central_difference_check(lambda x: model.prefill(x)[0], (torch.randn(1, 12, 2, dtype=f64),))


def test_state_passing_under_jvp():
    # FFTConvS4 forward(u, state): the output and the next state (measured 5e-11 and 1e-10)
    from lrnnx_zoo.plugins.fftconv import FFTConvS4
    torch.manual_seed(0)
    block = FFTConvS4(8, d_state=4).to(f64)
    state = torch.randn(2, 8, 2, dtype=torch.complex128)
    u = torch.randn(2, 8, 20, dtype=f64)
    central_difference_check(lambda u: block(u, state=state)[0], (u,))
    central_difference_check(lambda u: torch.view_as_real(block(u, state=state)[1]), (u,))


def model_for(name: str, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = lrnnx_zoo.ModelConfig(layer=name, d_input=2, d_output=3, d_model=8, n_layers=2, layer_kwargs={"d_state": 4},
                                **config)
    return lrnnx_zoo.SequenceModel(cfg).to(f64).eval()


@pytest.mark.parametrize("pooling", [None, "mean"])
@pytest.mark.parametrize("name", ["s4d", "s4", "fftconv", "lru"])
def test_model_steps_carry_dual_tangents_from_step_to_step(name, pooling):
    # A stream of dual inputs: each step's tangent includes what the earlier steps' tangents did to the
    # state. The caches keep values without autograd history (detach()), which dropped the forward-mode
    # tangent too where the state required grad (the encoder's weights do): 1.5e-2 to 3.7e-1 off from
    # the second step on, while torch.func.jvp over the same steps was right. Measured 1e-16 after.
    model = model_for(name, pooling=pooling)
    g = torch.Generator().manual_seed(7)
    x, tx = torch.randn(1, 6, 2, dtype=f64, generator=g), torch.randn(1, 6, 2, dtype=f64, generator=g)
    _, want = jvp(model, (x,), (tx,))
    tangents = []
    with fwAD.dual_level():
        y, cache = model.prefill(fwAD.make_dual(x[:, :2], tx[:, :2]))
        if pooling is None:
            tangents += list(fwAD.unpack_dual(y).tangent.unbind(1))
        for k in range(2, 6):
            y, cache = model.step(fwAD.make_dual(x[:, k], tx[:, k]), cache)
            tangents.append(fwAD.unpack_dual(y).tangent)
    got = torch.stack(tangents, 1) if pooling is None else tangents[-1]
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-10 * want.abs().max()


@pytest.mark.parametrize("name,kwargs", [("s4d", {}), ("s4d", {"discretization": "bilinear"}), ("fftconv", {}),
                                         ("fftconv", {"kernel_type": "lru"}), ("s4", {}), ("lru", {})],
                         ids=lambda v: str(v))
def test_hessian_with_respect_to_the_weights(name, kwargs):
    # Second derivatives in the weights through the Vandermonde kernel (S4D's, the LRU kernel's): its
    # backward, differentiated, recomputed the kernel and called autograd.grad, which under torch.func
    # finds no graph ("element 0 of tensors does not require grad" under hessian, "appears to not have
    # been used in the graph" under jacrev(jacrev)). Forward over reverse against reverse over reverse
    # (measured 1e-15 apart) and, along one direction, against central differences of the gradient
    # (eps 1e-6 in float64: ~1e-10 of the largest entry; measured below 1e-9).
    layer = layer_for(name, kwargs)
    x = torch.randn(1, 6, 8, dtype=f64, generator=torch.Generator().manual_seed(8))
    params = {k: p.detach() for k, p in layer.named_parameters()}

    def loss(p):
        return functional_call(layer, p, (x,)).square().sum()

    forward_over_reverse, reverse_over_reverse = torch.func.hessian(loss)(params), jacrev(jacrev(loss))(params)
    scale = max(float(h.abs().max()) for row in reverse_over_reverse.values() for h in row.values())
    for a in params:
        for b in params:
            assert (forward_over_reverse[a][b] - reverse_over_reverse[a][b]).abs().max() <= 1e-10 * scale, (a, b)
    g = torch.Generator().manual_seed(9)
    direction = {k: torch.randn(p.shape, dtype=f64, generator=g) for k, p in params.items()}
    eps = 1e-6
    grad = torch.func.grad(loss)
    up, down = (grad({k: params[k] + s * eps * direction[k] for k in params}) for s in (1, -1))
    for a in params:
        hv = sum((forward_over_reverse[a][b].reshape(params[a].numel(), -1) @ direction[b].reshape(-1))
                 for b in params).reshape(params[a].shape)
        fd = (up[a] - down[a]) / (2 * eps)
        assert (hv - fd).abs().max() <= 1e-7 * scale, a
