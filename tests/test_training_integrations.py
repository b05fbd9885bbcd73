"""Training integrations a PyTorch user combines with the layers: activation checkpointing, mixed
precision (torch.autocast, GradScaler), gradient accumulation with evaluation between steps,
weight averaging, DistributedDataParallel. Small models throughout (d_model <= 16, L <= 128)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import lrnnx_zoo
from lrnnx_zoo import SequenceModel, create_layer
from lrnnx_zoo.convolution import FFTConvS4
from lrnnx_zoo.models import ModelConfig
from lrnnx_zoo.testing import run_steps   # steps a layer or a model over x from a new cache

FAMILIES = lrnnx_zoo.list_layers()

#: The layers whose kernel or convolution would contain a real matrix product (the Vandermonde
#: product, the state passing's block sums): (name, create_layer arguments).
KERNEL_LAYERS = [("s4d", {"d_state": 8}), ("s4", {"d_state": 8}), ("fftconv", {"d_state": 8}),
                 ("fftconv", {"d_state": 8, "kernel_type": "lru"})]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach()).norm() / b.detach().norm())


def small_model(layer: str, dtype: torch.dtype = torch.float32, **config) -> SequenceModel:
    torch.manual_seed(0)
    kwargs = {"d_state": 8}
    return SequenceModel(ModelConfig(layer=layer, d_input=3, d_output=2, d_model=8, n_layers=2,
                                     layer_kwargs=kwargs, **config)).to(dtype)


# -- mixed precision ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, kwargs", KERNEL_LAYERS, ids=lambda v: str(v))
@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
def test_kernel_and_convolution_stay_float32_under_autocast(name, kwargs, grad):
    # The layers promise that under torch.autocast their kernel and convolution compute in float32
    # (base.float32_under_autocast). The Vandermonde product (S4D's kernel, FFTConv's s4d and lru
    # kernels) is a real matmul, which autocast ran in bfloat16: a float32 input gave outputs 2.5e-3
    # (S4D, FFTConv's s4d kernel), 2.0e-3 (its lru kernel) off the float32 ones, gradients 7.5e-3
    # and 3.3e-3. Tolerance: the same float32 computation, rounding only (measured 0); bfloat16
    # keeps 8 bits (4e-3 relative per rounding).
    torch.manual_seed(0)
    layer = create_layer(name, 8, **kwargs)
    x = torch.randn(2, 128, 8)

    def run(amp: bool):
        torch.manual_seed(1)
        model = copy.deepcopy(layer)
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = model(x)
        if not grad:
            return y, []
        y.float().square().sum().backward()
        return y.detach(), [p.grad for p in model.parameters()]

    (y, grads), (ref, ref_grads) = run(True), run(False)
    assert y.dtype == torch.float32
    assert relative(y, ref) < 1e-5
    for (n, _), g, r in zip(layer.named_parameters(), grads, ref_grads):
        assert relative(g, r) < 1e-5, n


@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
def test_lru_skip_under_autocast_keeps_the_float32_output(grad):
    # The LRU's projections are autocast matmuls (bfloat16 products) and D x is float32, so y + D x
    # comes out float32. The inference forward adds D x in place into the projection's output: into a
    # bfloat16 one it rounded the sum to bfloat16 and returned that.
    layer = create_layer("lru", 8, d_state=8)
    x = torch.randn(2, 32, 8)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32


def test_lru_skip_leaves_a_plugin_backends_output_alone():
    # A plugin's modal backend may hand back a tensor it keeps (a cache, here); the in-place skip,
    # taken for the built-in backends' fresh outputs, added D x into it at every call.
    import types
    import lrnnx_zoo
    from lrnnx_zoo.modal import modal_scan
    kept = {}

    def caching(u, log_lam, B, C, initial_state=None):
        if "y" not in kept:
            kept["y"] = modal_scan(u, log_lam, B, C, initial_state)
        return kept["y"]
    plugin = types.ModuleType("caching_backend")
    plugin.lrnnx_zoo_register_kernel_backends = lrnnx_zoo.hookimpl(
        lambda registry: registry.add_backend("modal", "caching", caching))
    lrnnx_zoo.register_plugin(plugin, "caching_backend")
    try:
        layer = create_layer("lru", 8, d_state=8, backend="caching").eval()
        x = torch.randn(2, 16, 8)
        with torch.no_grad():
            first = layer(x).clone()
            kept_before = kept["y"].clone()
            second = layer(x)
        assert torch.equal(kept["y"], kept_before) and torch.equal(first, second)
    finally:
        lrnnx_zoo.unregister_plugin("caching_backend")


@pytest.mark.parametrize("backend", ["auto", "scan", "fft"])
def test_lru_skip_in_place_gives_the_bits_of_y_plus_skip(backend, monkeypatch):
    # The in-place skip is a speed-up only: outputs and every gradient bit for bit as y + D x. Into
    # the fft backend's output (a slice of the inverse transform's buffer) D's gradient came out
    # summed in another order, 7.6e-6 off (a review): fft adds out of place.
    from lrnnx_zoo.plugins import lru as lru_plugin
    x = torch.randn(3, 17, 8, requires_grad=True)

    def run():
        torch.manual_seed(0)
        layer = create_layer("lru", 8, d_state=4, backend=backend)
        y = layer(x)
        grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
        return [y.detach(), *grads]
    fast = run()
    monkeypatch.setattr(lru_plugin, "_FRESH_OUTPUT_BACKENDS", ())
    for a, b in zip(fast, run()):
        assert torch.equal(a, b)


def test_lru_skip_of_an_ensemble_of_skips_under_vmap():
    # vmap over D alone: D x is batched, the projection's output is not, so the in-place add failed
    # ("output with shape [2, 32, 8] doesn't match the broadcast shape [3, 2, 32, 8]").
    layer = create_layer("lru", 8, d_state=8).eval()
    x, Ds = torch.randn(2, 32, 8), torch.randn(3, 8)
    with torch.no_grad():
        y = torch.func.vmap(lambda D: torch.func.functional_call(layer, {"D": D}, (x,)))(Ds)
        for i in range(3):
            torch.testing.assert_close(y[i], layer(x) + (Ds[i] - layer.D) * x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, kwargs", KERNEL_LAYERS, ids=lambda v: str(v))
def test_backward_inside_an_autocast_region_stays_float32(name, kwargs):
    # The same promise when backward runs inside the region too (autocast is then on for the
    # hand-written backwards: S4's Cauchy backward makes a real matmul, which it would run in
    # bfloat16). Tolerance as above: measured 0.
    torch.manual_seed(0)
    layer = create_layer(name, 8, **kwargs)
    x = torch.randn(2, 128, 8)

    def grads(amp: bool):
        model = copy.deepcopy(layer)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            model(x).float().square().sum().backward()
        return [p.grad for p in model.parameters()]

    for (n, _), g, r in zip(layer.named_parameters(), grads(True), grads(False)):
        assert relative(g, r) < 1e-5, n


def test_state_passing_stays_float32_under_autocast():
    # FFTConvS4's state passing (truncated backpropagation through time over chunks) computes the
    # zero-input response through the Vandermonde product and the next state through a real matmul
    # of the input's blocks: both ran in bfloat16 under autocast (y 2.5e-3, next state 1.7e-3 off).
    # Tolerance as above.
    torch.manual_seed(0)
    conv = FFTConvS4(8, transposed=False, d_state=8)
    x, state = torch.randn(2, 64, 8), torch.randn(2, 8, 4, dtype=torch.complex64)
    ref_y, ref_state = conv(x, state=state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, next_state = conv(x, state=state)
    assert next_state.dtype == ref_state.dtype
    assert relative(y, ref_y) < 1e-5
    assert float((next_state - ref_state).detach().norm() / ref_state.detach().norm()) < 1e-5


@pytest.mark.parametrize("name", [n for n in lrnnx_zoo.list_backends("ssm_kernel")])
def test_inference_kernel_cached_under_autocast_is_float32(name):
    # A kernel cached by an evaluation under autocast was the one later float32 evaluations reused:
    # whatever autocast had done to its generation (S4D's: 2.5e-3 off) stayed in every no_grad
    # forward after the autocast region, until the weights changed. Cached kernels are computed
    # with autocast off, so one computed inside the region is the float32 one. The probe here is a
    # matmul, what any kernel (a third party's too) may contain. Tolerance: float32 rounding.
    torch.manual_seed(0)
    kernel = lrnnx_zoo.get_backend("ssm_kernel", name.split(".", 1)[1])(4, 8)
    a, b = torch.randn(16, 64), torch.randn(64, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        K = kernel.cached_kernel(("probe",), lambda: a @ b)
    with torch.no_grad():
        again = kernel.cached_kernel(("probe",), lambda: a @ b)
    assert again is K                                         # reused, so it must be right
    assert K.dtype == torch.float32
    torch.testing.assert_close(K, a @ b, rtol=1e-6, atol=1e-5)


# -- activation checkpointing ------------------------------------------------------------------

def checkpointed_forward(model: SequenceModel, x: torch.Tensor, mode: str) -> torch.Tensor:
    """model(x) with each block run through torch.utils.checkpoint in ``mode``."""
    h = model.encoder(x)
    if mode == "sequential":
        h = checkpoint_sequential(model.blocks, len(model.blocks), h, use_reentrant=False)
    else:
        for block in model.blocks:
            h = block(h) if mode == "none" else checkpoint(block, h, use_reentrant=(mode == "reentrant"))
    return model.decoder(model.norm(h))


@pytest.mark.parametrize("layer", FAMILIES)
def test_checkpointed_blocks_give_the_same_gradients(layer):
    # Recomputing a block in backward (checkpoint, checkpoint_sequential) must see what the first
    # forward saw: the same kernel (no stale inference cache: the reentrant forward runs under
    # no_grad, where kernels are cached) and the same dropout masks (preserve_rng_state), over two
    # optimiser steps. float64: tolerance 1e-10 relative (the reentrant forward's inference path
    # rounds differently, 1e-14 measured).
    model = small_model(layer, torch.float64, dropout=0.3)
    x = torch.randn(2, 32, 3, dtype=torch.float64)
    models = {mode: copy.deepcopy(model) for mode in ("none", "reentrant", "non_reentrant", "sequential")}
    optims = {mode: torch.optim.SGD(m.parameters(), lr=0.05) for mode, m in models.items()}
    for _ in range(2):
        grads = {}
        for mode, m in models.items():
            torch.manual_seed(1)
            checkpointed_forward(m, x, mode).square().mean().backward()
            grads[mode] = [p.grad.clone() for p in m.parameters()]
            optims[mode].step()
            optims[mode].zero_grad(set_to_none=True)
        for mode in ("reentrant", "non_reentrant", "sequential"):
            for g, r in zip(grads[mode], grads["none"]):
                assert float((g - r).norm()) <= 1e-10 * float(r.norm()), mode


# -- evaluation between training steps --------------------------------------------------------

@pytest.mark.parametrize("layer", FAMILIES)
def test_evaluation_between_steps_sees_every_weight_change(layer):
    # Kernels cached by no_grad evaluations must not outlive the weights they came from, whichever
    # way those change in place: accumulated gradients then optimizer.step() (same data_ptr),
    # clip_grad_norm_, load_state_dict, an EMA (AveragedModel) and copy_ into its parameters, a
    # cast to float64. Each evaluation is compared with a fresh copy's (no cache). Tolerance: the
    # same computation, exact.
    model = small_model(layer)
    x, target = torch.randn(2, 32, 3), torch.randn(2, 32, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.5))

    def check(m: torch.nn.Module, inp: torch.Tensor) -> None:
        m.eval()
        with torch.no_grad():
            torch.testing.assert_close(m(inp), copy.deepcopy(m)(inp), rtol=0, atol=0)
        m.train()

    for step in range(3):
        for _ in range(2):                                    # gradient accumulation
            torch.nn.functional.mse_loss(model(x), target).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        opt.zero_grad(set_to_none=step % 2 == 0)
        ema.update_parameters(model)
        check(model, x)
        check(ema, x)
    other = small_model(layer)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
        for p, q in zip(ema.module.parameters(), other.parameters()):
            p.copy_(q)
    check(ema, x)
    model.load_state_dict(other.state_dict())
    check(model, x)
    check(model.double(), x.double())


# -- distributed wrappers --------------------------------------------------------------------

@pytest.mark.parametrize("layer", FAMILIES)
def test_ddp_world_size_one_accumulates_like_the_plain_model(layer, tmp_path):
    # DistributedDataParallel (gloo, one process) with no_sync() gradient accumulation and each
    # block checkpointed: the gradients are the plain model's. Tolerance: float32 rounding of the
    # gradient bucket's sum (measured 0).
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = small_model(layer)
    plain = copy.deepcopy(model)
    x, target = torch.randn(2, 32, 3), torch.randn(2, 32, 2)

    class Checkpointed(torch.nn.Module):
        def __init__(self, inner: SequenceModel) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            return checkpointed_forward(self.inner, inp, "non_reentrant")

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(Checkpointed(model))
        with ddp.no_sync():
            torch.nn.functional.mse_loss(ddp(x), target).backward()
        torch.nn.functional.mse_loss(ddp(x), target).backward()
    finally:
        dist.destroy_process_group()
    for _ in range(2):
        torch.nn.functional.mse_loss(plain(x), target).backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


# -- weights changed where no version counter sees it ------------------------------------------

@pytest.mark.parametrize("layer", FAMILIES)
@pytest.mark.parametrize("how", ["data", "numpy"])
def test_a_new_stream_follows_weights_edited_without_a_version_change(layer, how):
    # An edit through p.data (the averaging / clipping idiom) or through a numpy view (as another
    # process's write to shared memory, Hogwild) moves no version counter: a new stream was handed
    # the memoised form of the old weights (LRU 0.2 off forward, S4D 1e-2; an audit).
    model = small_model(layer).eval()
    x = torch.randn(2, 12, 3)
    with torch.no_grad():
        model(x)                               # S4 stores C~ for this length first (a version change)
        run_steps(model, x)                      # the form of the current weights is memoised
        for p in model.parameters():
            if how == "data":
                p.data.mul_(0.5).add_(0.01)
            else:
                view = p.detach().numpy()      # shares p's memory, not its version counter
                view *= 0.5
        ref = model(x)
        assert relative(run_steps(model, x), ref) < 1e-5


@pytest.mark.parametrize("layer, param", [("lru", "B_re"), ("s4d", "B"), ("fftconv", "C")])
def test_a_pruned_ssm_parameter_streams_as_forward_after_a_forward(layer, param):
    # torch.nn.utils.prune keeps the weight a module applies as a plain attribute, recomputed by a
    # forward pre-hook: a form built before that forward was memoised against the unchanged
    # parameters and handed to later streams (S4D 2e-2 off forward; an audit).
    import torch.nn.utils.prune as prune
    model = small_model(layer)
    for block in model.blocks:
        owner = block.layer if layer == "lru" else block.layer.kernel if layer == "s4d" else block.layer.conv.kernel
        prune.l1_unstructured(owner, param, amount=0.3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(2, 12, 3)
    model(x).square().sum().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        run_steps(model, x)                      # before any forward: the hook has not run yet
        ref = model(x)
        assert relative(run_steps(model, x), ref) < 1e-5


class LowRankLinear(torch.nn.Linear):
    """A Linear with a trained low-rank update (as LoRA adds): its own forward, beyond its weight."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__(d_in, d_out)
        self.down, self.up = torch.nn.Linear(d_in, 2, bias=False), torch.nn.Linear(2, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.up(self.down(x))


@pytest.mark.parametrize("wrap", ["prune", "weight_norm", "low_rank"])
def test_a_reparametrised_channel_mix_streams(wrap):
    # fftconv's step form deep-copied its mix, which a pruned (or hook-based weight_norm) Linear
    # refuses once a forward has computed its weight ("Only Tensors created explicitly by the user");
    # a first fix built a plain Linear from mix.weight, dropping a subclass's own term (4.9 off).
    import torch.nn.utils.prune as prune
    torch.manual_seed(0)
    layer = create_layer("fftconv", 8, d_state=4, channels=2)
    if wrap == "prune":
        prune.l1_unstructured(layer.mix, "weight", amount=0.3)
    elif wrap == "weight_norm":
        torch.nn.utils.weight_norm(layer.mix)
    else:
        layer.mix = LowRankLinear(16, 8)
    layer(torch.randn(2, 16, 8)).sum().backward()
    layer.eval()
    x = torch.randn(2, 16, 8)
    with torch.no_grad():
        assert relative(run_steps(layer, x), layer(x)) < 1e-5


@pytest.mark.parametrize("layer, owner, name", [("lru", "blocks.0.layer", "B_re"), ("s4d", "blocks.0.layer.kernel", "B"),
                                                ("s4", "blocks.0.layer", "D"),
                                                ("fftconv", "blocks.0.layer.conv.kernel", "C")])
def test_param_groups_keep_a_parametrized_ssm_parameter_in_its_group(layer, owner, name):
    # torch.nn.utils.parametrize moves the tensor into a torch.nn ParametrizationList and swaps the
    # module's class for one torch defines: the parameter was trained like a network weight (the
    # network's lr, decayed if a matrix) instead of at ssm_lr without decay (an audit).
    import torch.nn.utils.parametrize as parametrize
    from lrnnx_zoo.training import param_groups

    class Identity(torch.nn.Module):
        def forward(self, X):
            return X

    def setting_of(model, param_name):
        param = model.get_parameter(param_name)
        [group] = [g for g in param_groups(model, lr=1e-3, weight_decay=0.1, ssm_lr=5e-4)
                   if any(p is param for p in g["params"])]
        return group["lr"], group.get("weight_decay")
    model = small_model(layer)
    before = setting_of(model, f"{owner}.{name}")
    parametrize.register_parametrization(model.get_submodule(owner), name, Identity())
    assert setting_of(model, f"{owner}.parametrizations.{name}.original") == before == (5e-4, 0.0)
    # a parametrized torch.nn building block still trains like the network
    parametrize.register_parametrization(model.encoder, "weight", Identity())
    assert setting_of(model, "encoder.parametrizations.weight.original") == (1e-3, 0.1)


def test_a_move_or_cast_drops_the_memoised_form_and_its_weight_copies():
    # The memo held a copy of every weight (and the form) in the old dtype or on the old device after
    # .double() / .cpu(), until the next cache (review).
    model = small_model("s4d").eval()
    model.allocate_inference_cache(1)
    assert all("_form_memo" in b.layer.__dict__ for b in model.blocks)
    model.double()
    assert not any("_form_memo" in b.layer.__dict__ for b in model.blocks)
    x = torch.randn(2, 12, 3, dtype=torch.float64)
    with torch.no_grad():     # float64 step and convolution agree to rounding (docs/semantics.md: 1e-13)
        assert (run_steps(model, x) - model(x)).abs().max() < 1e-12


@pytest.mark.parametrize("layer", FAMILIES)
def test_a_running_stream_refuses_to_go_on_after_a_fused_optimiser_step(layer):
    # torch's fused optimisers change parameters in place without moving their version counters: an
    # old cache stepped on with the old weights (1.08 off where outputs reach 1.25; global-modes audit).
    model = small_model(layer)
    x = torch.randn(2, 6, 3)
    with torch.no_grad():
        model(x)                                   # S4's C~ for this length, before the cache
        cache = model.eval().allocate_inference_cache(2)
        _, cache = model.step(x[:, 0], cache)
    other = torch.nn.Linear(2, 2)                  # another model's optimiser step changes nothing here
    torch.optim.SGD(other.parameters(), lr=0.1).step()
    with torch.no_grad():
        _, cache = model.step(x[:, 1], cache)
    model.train()
    model(x).square().sum().backward()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    versions = [p._version for p in model.parameters()]
    opt.step()
    assert [p._version for p in model.parameters()] == versions      # what made this case silent
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"weights changed since this cache was made"):
        model.eval().step(x[:, 2], cache)
