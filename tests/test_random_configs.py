"""Modes agree over randomly drawn configurations: the option matrix's fixed grid misses odd sizes
(d_model=1, one mode, prime lengths, a pole at zero) and the combinations between them. Session 27's
fuzzer drew 41,824 configurations and found three bugs this way (NaN from a bilinear pole at exactly
zero, a model of one channel and one mode that could not be saved, a float64 step form sharing its
skip with the parameter); this keeps a small seeded sample of the same draws in the suite.

Float64 throughout, so every comparison holds to 1e-9 relative to max |y| (float64 rounding over a
few hundred steps, amplified by the layer norms of narrow models; the float32 modes are compared
in the other test files at their own tolerances)."""

from __future__ import annotations

import math
import random

import pytest
import torch

import lrnnx_zoo

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DRAWS = 160
TOL = 1e-9


def draw_layer_kwargs(rng: random.Random, layer: str) -> dict:
    """Valid arguments of ``layer``, drawn at the edges as often as in the middle."""
    if layer == "lru":
        r_max = rng.choice([0.5, 0.9, 0.99, 1.0])
        return {"d_state": rng.choice([1, 2, 3, 8]), "r_min": rng.choice([0.0, r_max / 2]), "r_max": r_max,
                "max_phase": rng.choice([0.01, math.pi, 2 * math.pi])}
    kw: dict = {"d_state": rng.choice([2, 4, 6, 16])}
    dt_min = rng.choice([1e-3, 0.1, 1.0])
    kw.update(dt_min=dt_min, dt_max=rng.choice([dt_min, 10 * dt_min]))
    if layer == "s4d":
        kw.update(init=rng.choice(["lin", "inv", "legs", "real", "random"]),
                  discretization=rng.choice(["zoh", "bilinear"]))
    elif layer == "s4":
        kw.update(measure=rng.choice(["legs", "fourier", "lagt"]), discretization=rng.choice(["zoh", "bilinear"]))
    else:
        kw.update(kernel_type=rng.choice(["s4d", "s4", "lru"]), channels=rng.choice([1, 2]))
        if kw["kernel_type"] == "lru":
            kw = {k: v for k, v in kw.items() if k not in ("dt_min", "dt_max")}
    return kw


def draw(seed: int) -> tuple:
    rng = random.Random(seed)
    layer = lrnnx_zoo.list_layers()[seed % len(lrnnx_zoo.list_layers())]
    d_model = rng.choice([1, 2, 5, 8])
    config = lrnnx_zoo.ModelConfig(
        layer=layer, d_input=rng.choice([1, 3]), d_output=rng.choice([1, 2]), d_model=d_model,
        n_layers=rng.choice([1, 2]), layer_kwargs=draw_layer_kwargs(rng, layer),
        norm=rng.choice(["layer", "none"] if d_model > 1 else ["none"]),   # a norm of one feature is refused
        post=rng.choice(["glu", "linear", "none"]), activation=rng.choice(["gelu", "identity"]), pooling=None)
    return config, rng.choice([1, 2, 3]), rng.choice([1, 2, 17, 64, 127])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


@pytest.mark.parametrize("seed", range(DRAWS))
def test_a_drawn_model_agrees_with_itself_in_every_mode(seed, tmp_path, float64_default):
    config, B, L = draw(seed)
    torch.manual_seed(seed)
    model = lrnnx_zoo.SequenceModel(config).eval()
    x = torch.randn(B, L, config.d_input)
    with torch.no_grad():
        y = model(x)
        assert torch.isfinite(y).all(), config
        cache = model.allocate_inference_cache(batch_size=B)
        steps = torch.stack([model.step(x[:, t], cache)[0] for t in range(L)], 1)
        assert rel(steps, y) < TOL, ("step", config)
        k = L // 2
        if k:
            prefix, cache = model.prefill(x[:, :k])
            rest = torch.stack([model.step(x[:, t], cache)[0] for t in range(k, L)], 1) if L > k else y[:, :0]
            assert rel(torch.cat([prefix, rest], 1), y) < TOL, ("prefill", config)
        lengths = torch.tensor([max(1, L - 3 * i) for i in range(B)])
        padded = model(x, lengths=lengths)
        for i, n in enumerate(lengths.tolist()):
            assert rel(padded[i, :n], model(x[i:i + 1, :n])[0]) < TOL, ("lengths", config)
    model.save_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(lrnnx_zoo.from_pretrained(tmp_path / "m").double().eval()(x), y)
        cache = model.allocate_inference_cache(batch_size=B)
        model.step(x[:, 0], cache)
        next(p for n, p in model.blocks[0].layer.named_parameters() if n.split(".")[-1] == "D").add_(0.5)
        with pytest.raises(RuntimeError):        # a stream made with other weights is refused
            model.step(x[:, 0], cache)
    model.train()
    x.requires_grad_(True)
    model(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                                 if p.grad is not None), ("gradients", config)
