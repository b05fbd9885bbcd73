"""SequenceModel.at_rate: the same continuous-time systems sampled at another rate (dt / rate),
through forward, step, prefill, save_pretrained and export, with honest provenance."""

import json
import math

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo.models import ModelConfig, SequenceModel

RATES = (0.5, 2.0, 3.0)
#: families with a timescale, as (layer, layer_kwargs); l_max even so that a window of round(l_max * r)
#: samples maps back to l_max at 1 / r
TIMED = [("s4d", {"d_state": 8}), ("s4", {"d_state": 8}), ("s4", {"d_state": 8, "discretization": "zoh"}),
         ("fftconv", {"d_state": 8, "l_max": 8}), ("fftconv", {"d_state": 8, "kernel_type": "s4", "channels": 2})]
STREAMING = [c for c in TIMED if "l_max" not in c[1]]
#: LRU's poles read as the ZOH sampling of a continuous system (principal logarithm): tests/test_lru_rate.py
LRU_CASES = [("lru", {"d_state": 8}), ("fftconv", {"d_state": 8, "kernel_type": "lru"}),
             ("fftconv", {"d_state": 8, "kernel_type": "lru", "l_max": 8, "channels": 2})]
LRU_STREAMING = [c for c in LRU_CASES if "l_max" not in c[1]]


def _model(layer, kw, dtype=torch.float32, n_layers=2, d_model=4, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(layer=layer, d_input=2, d_output=3, d_model=d_model, n_layers=n_layers, layer_kwargs=kw)
    return SequenceModel(cfg).to(dtype).eval()


def _ids(cases):
    return [f"{layer}-{'-'.join(f'{k}={v}' for k, v in kw.items() if k != 'd_state')}" for layer, kw in cases]


KERNEL_CASES = TIMED + [c for c in LRU_CASES if c[0] == "fftconv"]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 5e-6)])
@pytest.mark.parametrize("layer,kw", KERNEL_CASES, ids=_ids(KERNEL_CASES))
def test_resampled_kernel_is_the_kernel_at_that_rate(layer, kw, dtype, tol):
    """The at_rate(r) layer's kernel at rate 1 equals the original's kernel at rate r (its own rate
    argument). float64: measured <= 3.4e-15 relative (S4's C~ is rebuilt in float64, the same code as
    the kernel's own rate path), tolerance 1e-12. float32: log_dt - log r is rounded once to float32
    (half an ulp of |log dt| ~ 5, 2.4e-7 relative in dt), measured <= 8.9e-7, tolerance 5e-6; the lru
    kernel's nu_log, theta_log and B rounded once, measured <= 1.3e-7."""
    m = _model(layer, kw, dtype, n_layers=1)
    m(torch.randn(2, 40, 2, dtype=dtype))           # S4: an internal length (C~) to resample
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for r in RATES:
        K0 = m.blocks[0].layer.compute_kernel(64, rate=r)
        K1 = m.at_rate(r).blocks[0].layer.compute_kernel(64)
        assert ((K1 - K0).abs().max() / K0.abs().max()).item() < tol
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())   # the original is unchanged


@pytest.mark.parametrize("layer,kw", TIMED + LRU_CASES, ids=_ids(TIMED + LRU_CASES))
def test_at_rate_and_back_gives_the_original(layer, kw):
    """at_rate(r).at_rate(1/r): log dt shifted there and back (two float32 roundings), S4's C~ rebuilt
    twice in float64. Measured <= 9e-7 on outputs of size ~1 (float32), tolerance 1e-5. LRU: its
    parameters transformed there and back, each rounded to float32 (measured <= 1.3e-6); rates
    >= 1 only, as a mode above the new Nyquist frequency at r < 1 folds back (tests/test_lru_rate.py)."""
    m = _model(layer, kw)
    x = torch.randn(2, 40, 2)
    y = m(x)
    for r in RATES if kw.get("kernel_type", layer) != "lru" else [r for r in RATES if r >= 1]:
        back = m.at_rate(r).at_rate(1 / r)
        assert back.config == m.config
        assert (back(x) - y).abs().max().item() < 1e-5


def test_rate_one_is_an_equal_copy():
    m = lrnnx_zoo.from_pretrained("digits-s4d")
    same = m.at_rate(1)
    assert same is not m and same.checkpoint_info == m.checkpoint_info      # nothing resampled: metrics hold
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), same.state_dict().values()))


@pytest.mark.parametrize("layer,kw", STREAMING + LRU_STREAMING, ids=_ids(STREAMING + LRU_STREAMING))
def test_step_prefill_and_forward_agree_at_the_new_rate(layer, kw):
    """Convolution (FFT) and recurrence (step form) of the resampled system: float32, 40 steps,
    measured <= 1e-6 (lru and the lru kernel: <= 1.7e-6), tolerance 1e-4 (the suite's float32
    step-vs-forward bound)."""
    m = _model(layer, kw).at_rate(2.0)
    x = torch.randn(2, 40, 2)
    y = m(x)
    cache = m.allocate_inference_cache(2)
    steps = []
    for t in range(40):
        y_t, cache = m.step(x[:, t], cache)
        steps.append(y_t)
    assert (torch.stack(steps, 1) - y).abs().max().item() < 1e-4
    y_pre, cache = m.prefill(x[:, :25])
    assert (y_pre - y[:, :25]).abs().max().item() < 1e-4
    for t in range(25, 40):
        y_t, cache = m.step(x[:, t], cache)
        assert (y_t - y[:, t]).abs().max().item() < 1e-4


@pytest.mark.parametrize("layer,kw", [("s4d", {"d_state": 8}), ("s4", {"d_state": 8}),
                                      ("fftconv", {"d_state": 8, "kernel_type": "s4"})], ids=["s4d", "s4", "fftconv"])
def test_denser_samples_track_the_same_continuous_system(layer, kw):
    """A smooth input sampled r times as densely, through at_rate(r), read at the coarse times. The
    discretisations (zoh / bilinear of a held input) are first order in dt, so against the r=16 run
    as reference the error halves with each doubling: measured (relative to the output's max)
    0.056, 0.027, 0.012 at r = 1, 2, 4 (s4d; s4 and fftconv alike); asserted < 0.1 at r=1 and a
    ratio < 0.6 per doubling. The original model on the dense samples (no resampling: time runs
    twice as fast) is off by 0.3-0.9: asserted > 5x the resampled error."""
    m = _model(layer, kw, torch.float64, d_model=8)
    L = 100

    def u(r):
        t = torch.arange(r * L, dtype=torch.float64) / r
        return torch.stack([torch.sin(2 * math.pi * t / 40),
                            torch.cos(2 * math.pi * t / 27) + 0.5 * torch.sin(2 * math.pi * t / 60)], -1)[None]

    ys = {r: m.at_rate(r)(u(r))[:, ::r] for r in (1, 2, 4, 16)}
    scale = ys[16].abs().max()
    err = {r: ((ys[r] - ys[16]).abs().max() / scale).item() for r in (1, 2, 4)}
    assert err[1] < 0.1 and err[2] < 0.6 * err[1] and err[4] < 0.6 * err[2]
    naive = ((m(u(2))[:, ::2] - ys[16]).abs().max() / scale).item()
    assert naive > 5 * err[2]


def test_fftconv_window_keeps_its_duration_and_reloads(tmp_path):
    m = _model("fftconv", {"d_state": 8, "l_max": 9})
    x = torch.randn(2, 40, 2)
    fast = m.at_rate(2.0)
    assert fast.config.layer_kwargs["l_max"] == 18 and m.config.layer_kwargs["l_max"] == 9
    assert m.at_rate(0.5).config.layer_kwargs["l_max"] == 4          # round(4.5), half to even
    fast.save_pretrained(tmp_path / "ck")
    assert torch.equal(lrnnx_zoo.from_pretrained(tmp_path / "ck")(x), fast(x))


def test_s4_internal_length_follows_the_rate_and_reloads(tmp_path):
    """S4's C~ holds (I - A_bar^L)^T C: rebuilt for dt / r and the length of the same duration."""
    m = _model("s4", {"d_state": 8, "l_max": 32})
    fast = m.at_rate(2.0)
    assert [b.layer.kernel.length for b in fast.blocks] == [64, 64]
    assert [b.layer.kernel.length for b in m.blocks] == [32, 32]
    x = torch.randn(2, 50, 2)
    fast.save_pretrained(tmp_path / "ck")
    assert torch.equal(lrnnx_zoo.from_pretrained(tmp_path / "ck")(x), fast(x))


@pytest.mark.parametrize("rate", [0, -1.0, float("nan"), float("inf"), True, "2", None, torch.tensor([1.0, 2.0])],
                         ids=["zero", "negative", "nan", "inf", "bool", "str", "none", "tensor"])
def test_invalid_rates_are_refused(rate):
    m = _model("s4d", {"d_state": 8}, n_layers=1)
    with pytest.raises(ValueError, match=r"SequenceModel\.at_rate needs rate.*finite number > 0, got"):
        m.at_rate(rate)


def test_layers_without_a_timescale_refuse():
    """A layer the zoo cannot resample (a third-party layer without resample_ nor an SSM kernel; a
    kernel without log_dt nor its own resample_): NotImplementedError, nothing changed."""
    from lrnnx_zoo.base import LTI_LRNN
    from lrnnx_zoo.ssm_kernel import SSMKernel

    class PerSample(LTI_LRNN):
        def __init__(self):
            super().__init__("no_discretization")
            self.lam = torch.nn.Parameter(torch.tensor([0.5]))

        def discretize(self):
            return self.lam, None, None

        def compute_kernel(self, L):
            return self.lam ** torch.arange(L)

        def forward(self, x):
            return x

    class PerSampleKernel(SSMKernel):
        def __init__(self):
            super().__init__()
            self.lam = torch.nn.Parameter(torch.tensor([0.5]))

        forward = default_state = forward_state = step_form = None

    layer = PerSample()
    with pytest.raises(NotImplementedError, match=r"PerSample has no timescale the zoo can resample.*retrain it"):
        layer.resample_(2.0)
    with pytest.raises(NotImplementedError, match=r"PerSampleKernel has no timescale to resample.*Retrain it"):
        PerSampleKernel().resample_(2.0)
    assert layer.lam.item() == 0.5


@pytest.mark.parametrize("layer,kw", LRU_CASES, ids=_ids(LRU_CASES))
def test_lru_at_rate_saves_and_reloads(layer, kw, tmp_path):
    m = _model(layer, kw)
    fast = m.at_rate(2.0)
    x = torch.randn(2, 30, 2)
    assert (fast(x) - m(x)).abs().max().item() > 1e-3          # another system: rate 2 is not rate 1
    fast.save_pretrained(tmp_path / "ck")
    assert torch.equal(lrnnx_zoo.from_pretrained(tmp_path / "ck")(x), fast(x))
    assert fast.checkpoint_info["resampled"]["rate"] == 2.0


def test_resampled_checkpoint_drops_its_metrics_and_says_so(tmp_path):
    m = lrnnx_zoo.from_pretrained("digits-s4d")
    metrics = m.checkpoint_info["metrics"]
    assert metrics
    fast = m.at_rate(2)
    info = fast.checkpoint_info
    assert info["metrics"] is None and info["command"] is None
    assert info["task"] == m.checkpoint_info["task"] and info["dataset"] == m.checkpoint_info["dataset"]
    assert info["resampled"] == {"rate": 2.0, "from": "digits-s4d", "from_metrics": metrics}
    fast.save_pretrained(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["metrics"] is None and cfg["resampled"]["rate"] == 2.0 and cfg["resampled"]["from"] == "digits-s4d"
    card = (tmp_path / "ck" / "README.md").read_text()
    assert "Resampled from `digits-s4d` at rate 2" in card and "model-index" not in card
    # loaded again and resampled further: the record composes (rates multiply), from the same origin
    again = lrnnx_zoo.from_pretrained(tmp_path / "ck").at_rate(1.5)
    assert again.checkpoint_info["resampled"]["rate"] == 3.0
    assert again.checkpoint_info["resampled"]["from"] == "digits-s4d"
    # fine-tuned, then resampled: no checkpoint holds those weights, and their metrics are not the origin's
    tuned = lrnnx_zoo.from_pretrained("digits-s4d")
    with torch.no_grad():
        tuned.decoder.bias.add_(0.1)
    assert tuned.at_rate(2).checkpoint_info["resampled"] == {"rate": 2.0, "from": None, "from_metrics": None}


def test_export_of_a_resampled_model_validates(tmp_path):
    """The ONNX step graph of an at_rate copy is validated against that copy (to_onnx's float64
    reference, its float32 tolerance) and records the resampling."""
    from lrnnx_zoo.export import to_onnx
    pytest.importorskip("onnxruntime")
    fast = _model("s4", {"d_state": 8}).at_rate(2.0)
    result = to_onnx(fast, tmp_path / "m.onnx", validation_input=torch.randn(1, 64, 2))
    assert result.validation is not None and result.validation.passed
    import onnx
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert meta["lrnnx_zoo.source"].endswith("(resampled at rate 2)")


@pytest.mark.parametrize("name", ["digits-s4d", "digits-lru"])
def test_export_command_with_rate(tmp_path, name):
    # digits-lru was a usage error (LRU "has no timescale"); its poles now read as the ZOH sampling of
    # a continuous system, resampled like S4D's
    from lrnnx_zoo.cli import main
    pytest.importorskip("onnxruntime")
    out = tmp_path / "o"
    assert main(["export", name, "--out", str(out), "--rate", "2", "--latency-steps", "0",
                 "--validation-length", "64"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resampled"]["rate"] == 2.0 and cfg["resampled"]["from"] == name and cfg["metrics"] is None
    assert cfg["source"] == f"shipped:{name} (resampled at rate 2)"
    assert cfg["validation"]["max_abs_error"] <= cfg["validation"]["tolerance"]
    card = (out / "README.md").read_text()
    assert f"Resampled from `{name}` at rate 2" in card
    assert f"lrnnx-zoo export {name} --format onnx --out out --validation-length 64 --rate 2.0" in card


@pytest.mark.parametrize("rate", ["0", "nan", "-2"])
def test_export_command_refuses_bad_rates(tmp_path, capsys, rate):
    from lrnnx_zoo.cli import main
    assert main(["export", "digits-s4d", "--out", str(tmp_path / "o"), "--rate", rate]) == 2
    err = capsys.readouterr().err
    assert "--rate must be a finite number > 0" in err and f"got {float(rate)!r}" in err
    assert not (tmp_path / "o").exists()
