"""SequenceModel: forward vs step over every registered layer, pooling, lengths, config checks.
Tolerance 1e-4 relative (float32, modes round differently; see test_layer_contract)."""

from __future__ import annotations

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo import ModelConfig, SequenceModel


def model_for(layer, **kw):
    torch.manual_seed(0)
    cfg = dict(layer=layer, d_input=3, d_output=5, d_model=16, n_layers=2, layer_kwargs={"d_state": 8})
    cfg.update(kw)
    return SequenceModel(ModelConfig(**cfg)).eval()


def stream(model, x):
    cache = model.allocate_inference_cache(x.shape[0])
    return torch.stack([model.step(x[:, t], cache)[0] for t in range(x.shape[1])], 1)


# The default norm and post ("layer", "glu") at these sizes is the contract kit's sequence_model check
# (lrnnx_zoo.testing), which tests/test_layer_contract.py runs over every registered layer.
@pytest.mark.parametrize("layer", lrnnx_zoo.list_layers())
@pytest.mark.parametrize("norm,post", [("batch", "linear"), ("none", "none")])
def test_step_reproduces_forward(layer, norm, post):
    model = model_for(layer, norm=norm, post=post)
    x = torch.randn(2, 200, 3)
    with torch.no_grad():
        y, ys = model(x), stream(model, x)
    assert float((ys - y).abs().max() / y.abs().max()) < 1e-4


@pytest.mark.parametrize("layer", lrnnx_zoo.list_layers())
def test_mean_pooling_step_gives_prefix_logits(layer):
    model = model_for(layer, pooling="mean")
    x = torch.randn(2, 40, 3)
    with torch.no_grad():
        ys = stream(model, x)
        for t in (0, 17, 39):
            torch.testing.assert_close(ys[:, t], model(x[:, : t + 1]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pooling", [None, "mean", "last"])
def test_lengths_match_unpadded_runs(pooling):
    model = model_for("s4d", pooling=pooling)
    x = torch.randn(3, 30, 3)
    lengths = torch.tensor([30, 11, 1])
    with torch.no_grad():
        y = model(x, lengths=lengths)
        for b, n in enumerate(lengths.tolist()):
            alone = model(x[b:b + 1, :n])[0]
            got = y[b] if pooling else y[b, :n]
            torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


def test_config_round_trip_and_validation():
    cfg = ModelConfig(layer="lru", d_input=1, d_output=2, pooling="mean", layer_kwargs={"d_state": 4})
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="pooling must be one of"):
        ModelConfig(layer="lru", d_input=1, d_output=2, pooling="max")
    with pytest.raises(ValueError, match=r"unknown ModelConfig keys \['depth'\]"):
        ModelConfig.from_dict({**cfg.to_dict(), "depth": 3})
    with pytest.raises(ValueError, match="d_model must be a positive int"):
        ModelConfig(layer="lru", d_input=1, d_output=2, d_model=0)


def test_wrong_shapes_are_explained():
    model = model_for("lru")
    with pytest.raises(ValueError, match=r"\(batch, length, d_input=3\), got \(2, 10, 4\)"):
        model(torch.randn(2, 10, 4))
    cache = model.allocate_inference_cache(2)
    with pytest.raises(ValueError, match=r"\(batch, d_input=3\)"):
        model.step(torch.randn(2, 10, 3), cache)
    with pytest.raises(TypeError, match="floating-point input.*torch.int64"):
        model(torch.ones(2, 10, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="floating-point input.*torch.int64"):
        model.step(torch.ones(2, 3, dtype=torch.long), cache)


def test_model_trains():
    model = model_for("s4d", pooling="mean").train()
    x, y = torch.randn(32, 20, 3), torch.randint(0, 5, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


# -- found by a bug bash -------------------------------------------------------------------------
@pytest.mark.parametrize("layer", lrnnx_zoo.list_layers())
@pytest.mark.parametrize("pooling", [None, "mean", "last"])
def test_nan_padding_never_reaches_valid_outputs(layer, pooling):
    model = model_for(layer, pooling=pooling)
    x = torch.randn(2, 20, 3)
    x[0, 10:] = 0.0
    lengths = torch.tensor([10, 20])
    with torch.no_grad():
        y0 = model(x, lengths=lengths)
        x[0, 10:] = float("nan")
        y = model(x, lengths=lengths)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
    if pooling is None:
        assert torch.all(y[0, 10:] == 0)             # zeros after each length, like a single layer


def test_batch_norm_statistics_ignore_padding_in_training():
    x = torch.randn(3, 16, 3)
    lengths = torch.tensor([16, 9, 4])
    outs = []
    for fill in (0.0, 5.0):
        xp = x.clone()
        for b, n in enumerate(lengths.tolist()):
            xp[b, n:] = fill
        m = model_for("s4d", norm="batch").train()       # fresh running statistics each time
        outs.append(m(xp, lengths=lengths))
    mask = torch.arange(16)[None] < lengths[:, None]
    torch.testing.assert_close(outs[0][mask], outs[1][mask], rtol=1e-5, atol=1e-5)


def test_step_cache_and_dtype_mismatches_are_explained():
    a, b = model_for("lru"), model_for("lru", n_layers=1)
    with pytest.raises(ValueError, match="cache from this model's allocate_inference_cache"):
        a.step(torch.randn(2, 3), b.allocate_inference_cache(2))
    with pytest.raises(TypeError, match="float32 parameters; a torch.float64 cache"):
        a.allocate_inference_cache(2, dtype=torch.float64)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            a.allocate_inference_cache(bad)
    with pytest.raises(TypeError, match="holds torch.float32 parameters, got a torch.float64 input"):
        a(torch.randn(2, 5, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="holds torch.float32 parameters, got a torch.float64 input"):
        a.step(torch.randn(2, 3, dtype=torch.float64), a.allocate_inference_cache(2))


@pytest.mark.parametrize("layer", ["fftconv", "lru", "s4", "s4d"])
def test_torch_compile_traces_whole_model_without_graph_breaks(layer):
    # fullgraph=True fails on any graph break: the S4 kernel's length buffer read with int(), and
    # the registry's lock taken at each backend lookup, used to break the graph. aot_eager runs
    # dynamo and AOT autograd without inductor's C++ compile (minutes on a 2-core machine).
    torch.manual_seed(0)
    model = SequenceModel(ModelConfig(layer=layer, d_input=3, d_output=2, d_model=8, n_layers=1,
                                      layer_kwargs={"d_state": 4}, pooling="mean"))
    x = torch.randn(2, 32, 3)
    model(x).sum().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.reset()
    y = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    y.sum().backward()
    torch.testing.assert_close(y, model(x), rtol=1e-6, atol=1e-6)   # aot_eager runs the same ATen ops
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[n], rtol=1e-5, atol=1e-6, msg=n)
    # inference: the kernel cache (a data-dependent comparison) is skipped while compiling
    model.eval()
    torch._dynamo.reset()
    with torch.inference_mode():
        torch.testing.assert_close(torch.compile(model, backend="aot_eager", fullgraph=True)(x), model(x),
                                   rtol=1e-6, atol=1e-6)


def test_plain_torch_compile_of_a_pooled_model_has_no_graph_break():
    # Without fullgraph=True (plain torch.compile(model), as in benchmarks/bench_compile.py) dynamo
    # broke the graph at the empty-sequence check, bool((steps == 0).any()) on a tensor built from
    # x.shape[1], and printed a Tensor.item() warning; fullgraph=True happened to trace it.
    torch._dynamo.reset()
    model = SequenceModel(ModelConfig(layer="s4d", d_input=3, d_output=2, d_model=8, n_layers=1,
                                      layer_kwargs={"d_state": 4}, pooling="mean"))
    explained = torch._dynamo.explain(model)(torch.randn(2, 32, 3))
    assert explained.graph_break_count == 0, explained.break_reasons


def test_step_refuses_training_mode_batch_norm_and_keeps_running_statistics():
    # Training-mode batch norm normalises with whole-(batch, length) statistics: a step would use one
    # step's batch statistics instead (and overwrite the running ones; at batch 1 torch raised
    # "Expected more than 1 value per channel"). Eval mode steps reproduce forward.
    model = model_for("s4d", norm="batch", n_layers=1, d_model=8).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for batch in (1, 3):
        cache = model.allocate_inference_cache(batch)
        with pytest.raises(RuntimeError, match=r"batch norm in training mode .*model\.eval\(\)"):
            model.step(torch.randn(batch, 3), cache)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.eval()
    x = torch.randn(2, 12, 3)
    with torch.no_grad():
        torch.testing.assert_close(stream(model, x), model(x), rtol=1e-4, atol=1e-5)
    # dropout alone still steps in training mode (a fresh mask per step, as forward per element)
    dropping = model_for("lru", dropout=0.5, n_layers=1, d_model=8).train()
    with torch.no_grad():
        assert stream(dropping, x).shape == (2, 12, 5)


@pytest.mark.parametrize("layer", ["lru", "s4d"])
def test_step_refuses_a_cache_of_another_dtype(layer):
    # A cache made before model.double() holds float32 step forms: an S4D model silently stepped
    # in float32 matrices, an LRU failed inside matmul ("expected m1 and m2 to have the same dtype").
    model = model_for(layer, n_layers=1, d_model=8, layer_kwargs={"d_state": 4})
    cache = model.allocate_inference_cache(2)
    model.double()
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"cache made for torch.float32 .* call allocate_inference_cache"):
        model.step(x, cache)
    y, _ = model.step(x, model.allocate_inference_cache(2))
    assert y.dtype == torch.float64


@pytest.mark.parametrize("layer", lrnnx_zoo.list_layers())
def test_whole_model_pickles(layer):
    # torch.save(model) pickles the module: a lambda hook on the S4 kernel once made that fail.
    import io
    torch.manual_seed(0)
    model = SequenceModel(ModelConfig(layer=layer, d_input=2, d_output=2, d_model=8, n_layers=1,
                                      layer_kwargs={"d_state": 4}, pooling=None))
    x = torch.randn(1, 40, 2)
    y = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("layer", lrnnx_zoo.list_layers())
def test_cpu_autocast_bfloat16_trains(layer):
    # Under torch.autocast the layers receive nn.Linear's bfloat16 output; they refused it ("on
    # the CPU computes in float32 or float64"). They now compute in float32, as autocast does for
    # FFTs. Tolerance: bfloat16 keeps 8 bits (4e-3 relative per rounding), two blocks deep.
    torch.manual_seed(0)
    model = SequenceModel(ModelConfig(layer=layer, d_input=3, d_output=2, d_model=16, n_layers=2,
                                      layer_kwargs={"d_state": 8}, pooling="mean"))
    x = torch.randn(2, 64, 3)
    ref = model(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        z = model.blocks[0].layer(torch.randn(2, 64, 16).bfloat16())
    assert z.dtype == torch.float32
    assert float((y.detach().float() - ref).abs().max() / ref.abs().max()) < 2e-2
    y.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    with pytest.raises(TypeError, match=r"torch.autocast\('cpu'"):
        model.blocks[0].layer(torch.randn(2, 64, 16).bfloat16())      # outside autocast: refused, with the way out


@pytest.mark.parametrize("layer", lrnnx_zoo.list_layers())
def test_cpu_autocast_streams_as_it_runs_forward(layer):
    # Inference code run under torch.autocast: forward worked, but a stream failed at its first
    # layer step ("LRU.step on the CPU computes in float32 or float64, got torch.bfloat16: convert
    # the input" -- the input was float32; nn.Linear's output was not), and once that passed, the step
    # forms' matmuls ran in bfloat16 and stored a bfloat16 state. Now the recurrence runs in float32.
    # Tolerance: the outputs are bfloat16 (8 bits: 4e-3 relative), and forward's projections are too.
    torch.manual_seed(0)
    model = SequenceModel(ModelConfig(layer=layer, d_input=3, d_output=4, d_model=16, n_layers=2,
                                      layer_kwargs={"d_state": 8})).eval()
    x = torch.randn(2, 48, 3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x).float()
        cache = model.allocate_inference_cache(2)
        steps = torch.stack([model.step(x[:, t], cache)[0] for t in range(48)], 1).float()
        _, prompt = model.prefill(x[:, :24])
        continued = torch.stack([model.step(x[:, t], prompt)[0] for t in range(24, 48)], 1).float()
    states = [c["lrnn_state"] for c in cache["layers"] + prompt["layers"] if "lrnn_state" in c]
    assert states and all(s.dtype == torch.float32 for s in states)
    scale = float(y.abs().max())
    assert float((steps - y).abs().max()) < 2e-2 * scale
    assert float((continued - y[:, 24:]).abs().max()) < 2e-2 * scale


@pytest.mark.parametrize("layer", lrnnx_zoo.list_layers())
def test_a_mean_pooled_prompt_read_under_autocast_streams_on(layer):
    # prefill under autocast kept the running mean in bfloat16 (the features were), and every later
    # step refused the cache as "made for torch.bfloat16 ... converted or moved since" (a dtype audit).
    # The mean is kept in the model's dtype. Tolerance as above (bfloat16 features: 2e-2 of max|y|).
    torch.manual_seed(0)
    model = SequenceModel(ModelConfig(layer=layer, d_input=3, d_output=4, d_model=16, n_layers=2, pooling="mean",
                                      layer_kwargs={"d_state": 8})).eval()
    x = torch.randn(2, 40, 3)
    with torch.no_grad():
        want = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, cache = model.prefill(x[:, :30])
        assert cache["pool_mean"].dtype == torch.float32
        for t in range(30, 40):
            y, cache = model.step(x[:, t], cache)
    assert float((y - want).abs().max()) < 2e-2 * float(want.abs().max())


def test_half_input_under_autocast_is_what_the_refusal_promises():
    # Outside autocast a bfloat16 input is refused with "or run under torch.autocast('cpu', ...)";
    # a SequenceModel refused it there too (its own dtype check ran before the layers' autocast
    # handling). Under autocast the encoder casts its input anyway: bfloat16 in gives what float32 in gives.
    torch.manual_seed(0)
    model = model_for("s4d", n_layers=1, d_model=8).eval()
    x = torch.randn(2, 16, 3).bfloat16()
    with pytest.raises(TypeError, match=r"run under torch.autocast\('cpu', dtype=torch.bfloat16\)") as refused:
        model(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(model(x), model(x.float()), rtol=0, atol=0)
    # step takes no half input under autocast, so its refusal does not offer autocast
    with pytest.raises(TypeError, match=r"convert the input \(x.float\(\)\)$"):
        model.step(x[:, 0], model.allocate_inference_cache(2))
    assert "autocast" in str(refused.value)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_a_half_model_is_told_to_convert_itself(half):
    # A .half() model checked its input first: a half x was told "convert the input (x.float())", then
    # that float32 x "x.to(torch.float16) or model.to(torch.float32)", in a circle (a dtype audit)
    model = model_for("s4d", n_layers=1, d_model=8).eval().to(half)
    message = rf"SequenceModel.* holds {half} parameters: convert it \(.float\(\)\)"
    for x in (torch.randn(2, 16, 3).to(half), torch.randn(2, 16, 3)):
        with pytest.raises(TypeError, match=message):
            model(x)
        with pytest.raises(TypeError, match=message):
            model.prefill(x)
    model.float()(torch.randn(2, 16, 3))       # as advised


@pytest.mark.parametrize("rank, error", [(10**8, ValueError), (0, ValueError), ("2", TypeError)])
def test_s4_rank_is_checked_before_anything_is_allocated(rank, error):
    # rank is a size like d_state: 10**8 went past the parameter budget and tried to allocate 6.4 GB
    # (a config.json saying so failed with a RuntimeError from the allocator, or took the machine's memory)
    message = r"rank=100000000.* parameters, more than" if rank == 10**8 else r"layer_kwargs\['rank'\] must be a positive int"
    with pytest.raises(error, match=message):
        ModelConfig(layer="s4", d_input=3, d_output=2, d_model=8, n_layers=1, layer_kwargs={"d_state": 4, "rank": rank})


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8, torch.int32])
def test_last_pooling_takes_lengths_of_any_integer_dtype(dtype):
    # "last" pooling indexed with lengths - 1 as given: int8 / int16 failed in torch's indexing
    # ("tensors used as indices must be long, int, byte or bool"), uint8 was read as a mask; "mean"
    # and unpooled models took them (a fuzzing audit)
    torch.manual_seed(0)
    model = model_for("s4d", n_layers=1, d_model=8, pooling="last").eval()
    x = torch.randn(3, 5, 3)
    want = model(x, torch.tensor([5, 2, 4]))
    lengths = torch.tensor([5, 2, 4], dtype=dtype)
    torch.testing.assert_close(model(x, lengths), want, rtol=0, atol=0)
    torch.testing.assert_close(model.prefill(x, lengths)[0], want, rtol=0, atol=0)
