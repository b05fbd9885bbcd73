"""A user's script, after the README's usage, training, export and plugin guides: tests/test_typing.py
type-checks it with ``mypy --strict`` and never runs it. Each ``assert_type`` states what a checker must
read from lrnnx_zoo's hints; a line here failing the check is a hint that makes correct code fail (or
hides a mistake as ``Any``) for every user of the package's py.typed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

import lrnnx_zoo
from lrnnx_zoo import SequenceModel
from lrnnx_zoo.export import ExportResult, OnnxStreamer, ValidationReport, to_onnx, to_torch_export, to_torchscript
from lrnnx_zoo.plugins.fftconv import FFTConvS4
from lrnnx_zoo.plugins.lru import LRU
from lrnnx_zoo.plugins.s4 import S4
from lrnnx_zoo.training import param_groups, train

if sys.version_info >= (3, 11):
    from typing import assert_type
else:
    from typing_extensions import assert_type


# -- Usage --------------------------------------------------------------------------------------------
names: List[str] = lrnnx_zoo.list_layers()
layer = lrnnx_zoo.create_layer("s4d", 128, d_state=64, init="legs")
assert_type(layer(torch.randn(8, 1024, 128)), Tensor)
cache = layer.allocate_inference_cache(batch_size=8)
y_t, cache = layer.step(torch.randn(8, 128), cache)
assert_type(y_t, Tensor)
state_size: int = layer.step_form().state_size
layer_as_module: nn.Module = layer

model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(
    layer="lru", d_input=1, d_output=10, d_model=64, n_layers=4, layer_kwargs={"d_state": 64}, pooling="mean"))
assert_type(model(torch.randn(4, 64, 1)), Tensor)
logits, mcache = model.prefill(torch.randn(4, 64, 1))
logits, mcache = model.step(torch.randn(4, 1), mcache)
from_dict = SequenceModel({"layer": "s4d", "d_input": 1, "d_output": 2})      # "(or its dict)"

assert_type(LRU(64, 32)(torch.randn(2, 10, 64)), Tensor)
y4, next_state = S4(64, d_state=32)(torch.randn(2, 64, 100))
assert_type(next_state, Optional[Tensor])
yc, _ = FFTConvS4(64, l_max=100)(torch.randn(2, 64, 100))
assert_type(yc, Tensor)

# -- Checkpoints ----------------------------------------------------------------------------------------
loaded = lrnnx_zoo.from_pretrained("digits-s4d")
info = loaded.checkpoint_info              # None for a model built in code
assert info is not None
family: str = info["family"]
folder = loaded.save_pretrained("my-model", task="sequence-classification", metrics={"val_accuracy": 0.9})
config_file: Path = folder / "config.json"

# -- Training -------------------------------------------------------------------------------------------
optimizer = torch.optim.AdamW(param_groups(model, lr=3e-3, weight_decay=0.05, ssm_lr=1e-3))
trained, metrics = train("digits-tiny", out_dir="out", seed=0)
assert_type(trained, SequenceModel)
assert_type(metrics, Dict[str, float])

# -- Export ---------------------------------------------------------------------------------------------
result = to_onnx("digits-lru", "digits-lru.onnx")
assert_type(result, ExportResult)
report: Optional[ValidationReport] = result.validation
stream = OnnxStreamer("digits-lru.onnx")
stream.reset(batch=1)
y_np: np.ndarray = stream.step(np.zeros((1, 1), np.float32))
for_libtorch: Tuple[ExportResult, ExportResult] = (to_torchscript(model, "m.ts"), to_torch_export(model, "m.pt2"))


# -- Writing a plugin -----------------------------------------------------------------------------------
# the README's plugin module itself (examples/ema_plugin/lrnnx_ema.py, checked with this script)
import lrnnx_ema  # noqa: E402

plugin: lrnnx_zoo.PluginInfo = lrnnx_zoo.register_plugin(lrnnx_ema, name="ema")
ema_step: Tuple[Tensor, Dict[str, Any]] = lrnnx_zoo.create_layer("ema", 16).step(torch.zeros(1, 16), {})
