"""The main job: one small model per registered family, trained for a few seconds on the digits
(64-step pixel sequences), then convolution mode vs step mode compared on the test split."""

from __future__ import annotations

import argparse
import time

import torch

from . import ModelConfig, SequenceModel, list_layers
from .data import Split, load_digits_sequences


def train_briefly(model: SequenceModel, x: torch.Tensor, y: torch.Tensor, seconds: float,
                  batch_size: int = 64, lr: float = 3e-3) -> int:
    """Adam on cross-entropy for a wall-clock budget; returns the number of steps taken."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for idx in torch.randperm(len(y), generator=g).split(batch_size):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if time.perf_counter() - start >= seconds:
                break
    model.eval()
    return steps


@torch.no_grad()
def step_mode_outputs(model: SequenceModel, x: torch.Tensor) -> torch.Tensor:
    cache = model.allocate_inference_cache(x.shape[0])
    y = None
    for t in range(x.shape[1]):
        y, cache = model.step(x[:, t], cache)
    return y


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=8.0, help="training budget per family")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = load_digits_sequences(Split(seed=0, n_test=360))
    print(f"digits: {len(y_tr)} train / {len(y_te)} test sequences of 64 steps; {args.seconds:.0f} s of training each\n")
    print(f"{'layer':<8} {'params':>8} {'steps':>6} {'test acc':>9} {'conv vs step max|diff|':>24}")
    for name in list_layers():
        cfg = ModelConfig(layer=name, d_input=1, d_output=10, d_model=32, n_layers=2,
                          layer_kwargs={"d_state": 32}, pooling="mean")
        model = SequenceModel(cfg)
        steps = train_briefly(model, x_tr, y_tr, args.seconds)
        with torch.no_grad():
            logits = model(x_te)
        acc = (logits.argmax(-1) == y_te).float().mean().item()
        diff = (step_mode_outputs(model, x_te) - logits).abs().max().item()
        print(f"{name:<8} {model.num_parameters():>8} {steps:>6} {acc:>9.1%} {diff:>24.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
