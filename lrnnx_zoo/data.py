"""Real data sets that ship inside installed packages, so nothing is downloaded at run time.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images from UCI), read pixel
  by pixel in row-major order as a 64-step sequence of one feature in [0, 1]; 10 classes.
- ``sunspots``: NOAA's monthly mean sunspot numbers 1749-01..2009-06 (3,126 months, public
  domain), shipped as ``lrnnx_zoo/datasets/sunspots_monthly.csv``; split by time for causal
  next-step forecasting (``load_forecast_series``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor


@dataclass(frozen=True)
class Split:
    """A deterministic train/test split: which seed and sizes, recorded in configs and model cards."""

    seed: int = 0
    n_test: int = 360

    def indices(self, n: int) -> Tuple[Tensor, Tensor]:
        if not 0 < self.n_test < n:
            raise ValueError(f"n_test must lie in (0, {n}), got {self.n_test}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        return perm[self.n_test:], perm[: self.n_test]


def load_digits_sequences(split: Split = Split()) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits as sequences.  Returns x_train (n, 64, 1), y_train (n,), x_test, y_test (float32 / int64)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # scikit-learn is an extra: say which one
        raise ImportError("the digits data set ships with scikit-learn: pip install 'lrnnx-zoo[data]'") from exc
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 64, 1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    train, test = split.indices(len(y))
    return x[train], y[train], x[test], y[test]


def augment_digit_shifts(x: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Shift each 8x8 digit by a random whole number of pixels in [-max_shift, max_shift] per axis
    (zero fill), then read it out again as a sequence.  x: (B, 64, 1) -> (B, 64, 1)."""
    if x.shape[1:] != (64, 1):
        raise ValueError(f"augment_digit_shifts expects digit sequences of shape (batch, 64, 1), got {tuple(x.shape)}")
    B = x.shape[0]
    pad = max_shift
    img = torch.nn.functional.pad(x.reshape(B, 8, 8), (pad, pad, pad, pad))
    shifts = torch.randint(0, 2 * pad + 1, (B, 2), generator=generator)
    out = torch.stack([img[b, int(i):int(i) + 8, int(j):int(j) + 8] for b, (i, j) in enumerate(shifts)])
    return out.reshape(B, 64, 1)


# -- forecasting ---------------------------------------------------------------------------------
FORECAST_SERIES = {
    "sunspots": {
        "file": "sunspots_monthly.csv",
        "column": "sunspots",
        "source": "NOAA National Geophysical Data Center monthly mean sunspot numbers, as bundled in "
                  "statsmodels (datasets/sunspots/src/sunspots_monthly.dat)",
        "license": "public domain",
    },
}


FORECAST_TARGETS = ("next", "delta")


@dataclass(frozen=True)
class TimeSplit:
    """Split a series by time: the first ``n_train`` points, the next ``n_val``, the rest for test."""

    n_train: int = 2412  # sunspots: 1749-01 .. 1949-12
    n_val: int = 360  # 1950-01 .. 1979-12; test is 1980-01 .. 2009-06 (354 months)

    def bounds(self, n: int) -> Tuple[int, int]:
        """(start of val, start of test) as indices into a series of length n."""
        if self.n_train < 1 or self.n_val < 1 or self.n_train + self.n_val >= n:
            raise ValueError(f"TimeSplit needs n_train >= 1, n_val >= 1 and n_train + n_val < {n} "
                             f"(the series length), got n_train={self.n_train}, n_val={self.n_val}")
        return self.n_train, self.n_train + self.n_val


def read_series(name: str = "sunspots") -> Tuple[List[str], Tensor]:
    """The raw series shipped in ``lrnnx_zoo/datasets``: (dates as "YYYY-MM", values (T,) float64)."""
    if name not in FORECAST_SERIES:
        raise ValueError(f"unknown forecast series {name!r}; available: {', '.join(sorted(FORECAST_SERIES))}")
    from importlib import resources
    spec = FORECAST_SERIES[name]
    text = resources.files("lrnnx_zoo").joinpath("datasets").joinpath(spec["file"]).read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    header = lines[0].split(",")
    col = header.index(spec["column"])
    rows = [ln.split(",") for ln in lines[1:]]
    return [r[0] for r in rows], torch.tensor([float(r[col]) for r in rows], dtype=torch.float64)


@dataclass
class ForecastData:
    """Normalised windows for causal next-step forecasting from z_t of z_{t+1}.

    x_*, y_*: (n, window, 1) float32; mask_*: (n, window) bool, True where a prediction is scored.
    y is what the model is trained to output: z_{t+1} itself (``target="next"``) or the change
    z_{t+1} - z_t (``target="delta"``; the forecast is then x + output, see :meth:`to_level`).
    Training windows are every window (stride ``train_stride``) whose targets all lie in the
    training period; every position is scored.  Val/test windows may reach back into earlier
    periods for context (the past is known when forecasting), score only positions with at least
    ``warmup`` steps of context in the window, and score each target of their period exactly once.
    """

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    mask_val: Tensor
    x_test: Tensor
    y_test: Tensor
    mask_test: Tensor
    mean: float
    std: float
    target: str
    info: Dict[str, Any]

    def denormalise(self, z: Tensor) -> Tensor:
        """Normalised values back to the series' own units."""
        return z * self.std + self.mean

    def to_level(self, x: Tensor, out: Tensor) -> Tensor:
        """A model output (or a y_*) as the forecast level z_{t+1}, given the inputs x: (n, L, 1)."""
        return to_level(x, out, self.target)


def to_level(x: Tensor, out: Tensor, target: str) -> Tensor:
    """z_{t+1} from the input z_t and an output that is either z_{t+1} ("next") or z_{t+1} - z_t ("delta")."""
    if target not in FORECAST_TARGETS:
        raise ValueError(f"forecast target must be one of {FORECAST_TARGETS}, got {target!r}")
    return x + out if target == "delta" else out


def _windows(z: Tensor, starts: List[int], window: int) -> Tuple[Tensor, Tensor]:
    idx = torch.tensor(starts).unsqueeze(1) + torch.arange(window)
    return z[idx].unsqueeze(-1).float(), z[idx + 1].unsqueeze(-1).float()


def _eval_windows(z: Tensor, lo: int, hi: int, window: int, warmup: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Windows scoring every target index in [lo, hi) once, each with >= warmup steps of context."""
    if lo - 1 - warmup < 0:
        raise ValueError(f"the first scored target (index {lo}) needs {warmup} earlier points of context")
    starts, masks = [], []
    first = lo  # the next target index not yet scored
    while first < hi:
        a = min(first - 1 - warmup, hi - 1 - window)  # target of position j is a + j + 1
        j0, j1 = first - a - 1, min(window, hi - a - 1)
        mask = torch.zeros(window, dtype=torch.bool)
        mask[j0:j1] = True
        starts.append(a)
        masks.append(mask)
        first = a + j1 + 1
    x, y = _windows(z, starts, window)
    return x, y, torch.stack(masks)


def load_forecast_series(name: str = "sunspots", split: TimeSplit = TimeSplit(), window: int = 128,
                         warmup: int = 64, train_stride: int = 1, target: str = "next") -> ForecastData:
    """Load a shipped series, z-score it with the training period's mean and std, and cut windows.

    target: "next" (y = z_{t+1}) or "delta" (y = z_{t+1} - z_t: the model learns a correction to
    the last value, which keeps it close to the naive forecast where data are scarce, e.g. at
    levels above any seen in training).

    Returns a :class:`ForecastData` whose ``info`` records the split as indices and dates, the
    normalisation and the window layout (for model cards).
    """
    if not 0 <= warmup < window:
        raise ValueError(f"warmup must lie in [0, window={window}), got {warmup}")
    if target not in FORECAST_TARGETS:
        raise ValueError(f"target must be one of {FORECAST_TARGETS}, got {target!r}")
    if train_stride < 1:
        raise ValueError(f"train_stride must be >= 1, got {train_stride}")
    dates, raw = read_series(name)
    T = len(raw)
    val_start, test_start = split.bounds(T)
    if val_start < window + 1:
        raise ValueError(f"the training period ({val_start} points) must be longer than window + 1 = {window + 1}")
    mean, std = raw[:val_start].mean().item(), raw[:val_start].std().item()
    z = (raw - mean) / std
    x_tr, y_tr = _windows(z, list(range(0, val_start - window, train_stride)), window)
    x_va, y_va, m_va = _eval_windows(z, val_start, test_start, window, warmup)
    x_te, y_te, m_te = _eval_windows(z, test_start, T, window, warmup)
    if target == "delta":
        y_tr, y_va, y_te = y_tr - x_tr, y_va - x_va, y_te - x_te
    spec = FORECAST_SERIES[name]
    info = {
        "name": f"{name}-monthly" if name == "sunspots" else name,
        "source": spec["source"],
        "license": spec["license"],
        "split": {
            "train": {"indices": [0, val_start - 1], "dates": [dates[0], dates[val_start - 1]]},
            "val": {"indices": [val_start, test_start - 1], "dates": [dates[val_start], dates[test_start - 1]]},
            "test": {"indices": [test_start, T - 1], "dates": [dates[test_start], dates[T - 1]]},
            "scored": "targets x_{t+1} with t+1 in the period; inputs may come from earlier periods",
        },
        "normalisation": {"mean": mean, "std": std, "fitted_on": "train"},
        "window": window, "warmup": warmup, "train_stride": train_stride,
        "target": ("z_{t+1} - z_t (the forecast is input + output)" if target == "delta" else "z_{t+1}")
                  + ", z = (value - mean) / std",
    }
    return ForecastData(x_tr, y_tr, x_va, y_va, m_va, x_te, y_te, m_te, mean, std, target, info)


def forecast_errors(pred: Tensor, true: Tensor, mask: Optional[Tensor] = None) -> Dict[str, float]:
    """{"mse", "mae"} of forecast levels ``pred`` against ``true`` over the scored positions.

    pred, true: (n, L, 1); mask: (n, L) bool or None (score everything).  The naive last-value
    forecast is ``forecast_errors(x, true_level, mask)``.
    """
    err = (pred - true).squeeze(-1)
    if mask is not None:
        err = err[mask]
    return {"mse": err.pow(2).mean().item(), "mae": err.abs().mean().item()}
