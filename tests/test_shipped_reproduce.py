"""A shipped checkpoint's card says which command made it: that command gives its weights again.

Training is deterministic for a seed on one setup (torch version, device, CPU thread count), and
the shipped checkpoints were trained with one CPU thread, so the command rerun the same way must
give the same bits, not just close ones: a code change that moves training's rounding (a kernel's
backward, an initialiser, the data split) shows up here and calls for retraining the checkpoints.
Only forecast-sunspots-s4d runs here (8 s of training); the digits checkpoints take about a minute
each and are rerun by hand (README, "The zoo").
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import torch
from safetensors.torch import load_file

from lrnnx_zoo.hub import shipped_checkpoints


def test_the_forecast_checkpoints_card_command_gives_its_weights_bit_for_bit(tmp_path):
    shipped = shipped_checkpoints()["forecast-sunspots-s4d"]
    config = json.loads((shipped / "config.json").read_text(encoding="utf-8"))
    argv = shlex.split(config["command"])
    assert argv[:2] == ["lrnnx-zoo", "train"] and "--out" in argv, config["command"]
    argv[argv.index("--out") + 1] = str(tmp_path / "again")
    assert "(1 thread)" in config["notes"]              # the setup the card records
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LRNNX_ZOO_DISABLE_KEOPS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lrnnx_zoo", *argv[1:]], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = load_file(shipped / "model.safetensors")
    got = load_file(tmp_path / "again" / "model.safetensors")
    assert want.keys() == got.keys()
    differ = {k: float((want[k].double() - got[k].double()).abs().max()) for k in want
              if not torch.equal(want[k], got[k])}
    assert not differ, f"retrained weights differ from the shipped ones (max abs per tensor): {differ}"
    # the same weights save to the same bytes (safetensors' header is written with sorted keys)
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (shipped / "model.safetensors").read_bytes()
    again = json.loads((tmp_path / "again" / "config.json").read_text(encoding="utf-8"))
    assert again["weights_file_digest"] == config["weights_file_digest"]
