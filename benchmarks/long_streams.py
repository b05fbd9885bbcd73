"""How far a shipped checkpoint's float32 ONNX step graph drifts from its float64 forward over long streams.

Each checkpoint's graph (``to_onnx``, validated on its default 256 steps first) streams one
standard-normal sequence (seed 0) through ONNX Runtime from a zero state. At each reported length
L, the error is max |streamed - float64 forward| over what the model emits for those L steps:
a mean-pooled classifier's logits after step L (its pooled output of the prefix), a per-step model's
outputs at every step up to L. A stable float32 system's error grows until the stream outlasts its
slowest mode's memory, then levels off (docs/semantics.md, "Long streams").

    python benchmarks/long_streams.py [--names digits-s4d ...] [--lengths 256 4096 16384 65536]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

import lrnnx_zoo
from lrnnx_zoo.export import OnnxStreamer, to_onnx
from lrnnx_zoo.export.validate import float64_copy
from lrnnx_zoo.training_cli import positive_int  # argparse type: 0 was a crash, not a usage error


def drift(name: str, lengths: Sequence[int], folder: Path) -> Dict[int, float]:
    """{L: max abs error of the float32 graph against the float64 forward after L steps}."""
    model = lrnnx_zoo.from_pretrained(name)
    result = to_onnx(model, folder / f"{name}.onnx")
    print(f"{name}: {result.validation}")
    exact = float64_copy(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, max(lengths), model.config.d_input, generator=g)
    streamed = OnnxStreamer(result.path).run(x.numpy()).astype(np.float64)      # (1, L, d_output)
    errors: Dict[int, float] = {}
    with torch.no_grad():
        if model.config.pooling is None:       # causal per-step outputs: one forward covers every prefix
            y64 = exact(x.double()).numpy()
            for L in lengths:
                errors[L] = float(np.abs(streamed[:, :L] - y64[:, :L]).max())
        else:                                  # pooled: the logits of each prefix need their own forward
            for L in lengths:
                y64 = exact(x[:, :L].double()).numpy()
                errors[L] = float(np.abs(streamed[:, L - 1] - y64).max())
    return errors


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names", nargs="+", default=lrnnx_zoo.list_models())
    ap.add_argument("--lengths", nargs="+", type=positive_int, default=[256, 4096, 16384, 65536])
    args = ap.parse_args(argv)
    lengths = sorted(set(args.lengths))
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(name, drift(name, lengths, Path(tmp))) for name in args.names]
    print("\n| checkpoint | " + " | ".join(f"L={L:,}" for L in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for name, errors in rows:
        print(f"| {name} | " + " | ".join(f"{errors[L]:.1e}" for L in lengths) + " |")


if __name__ == "__main__":
    main()
