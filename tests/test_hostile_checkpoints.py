"""Checkpoints that are corrupt, hostile or just odd: what loading reads, allocates and says.

Each refusal is a CheckpointError naming the file and what is wrong; none may allocate what the
config asks for before the weights file has been checked against it.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrnnx_zoo import CheckpointError, ModelConfig, SequenceModel, from_pretrained


def _save(folder: Path, layer: str = "lru", **kw) -> Path:
    torch.manual_seed(0)
    cfg = dict(layer=layer, d_input=3, d_output=2, d_model=8, n_layers=2, layer_kwargs={"d_state": 4})
    return SequenceModel(ModelConfig(**{**cfg, **kw})).save_pretrained(folder)


@pytest.fixture
def saved(tmp_path) -> Path:
    return _save(tmp_path / "ckpt")


def _edit_model(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model"].update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _header(path: Path) -> tuple:
    """(header dict, tensor bytes) of a safetensors file."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write(path: Path, header: dict, data: bytes, size: int = 0) -> None:
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
        if size:
            f.truncate(8 + len(raw) + size)     # sparse: cheap on disk, costly only when read


_PEAK = """
import resource, sys
import lrnnx_zoo
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    lrnnx_zoo.from_pretrained(sys.argv[1])
    print("loaded")
except lrnnx_zoo.CheckpointError as exc:
    print("CheckpointError:", exc)
print("grew", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def _load_in_child(folder: Path) -> tuple:
    """Load ``folder`` in a fresh process with 4 GiB of address space at most (a regression then
    fails there instead of swapping the test machine): (its output, MiB its peak RSS grew by)."""
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
    done = subprocess.run([sys.executable, "-c", limit + _PEAK, str(folder)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, int(done.stdout.rsplit("grew", 1)[1])


# -- Q1: sizes in config.json that the weights file cannot match --------------------------------
def test_a_config_wider_than_its_weights_is_refused_before_the_model_is_built(saved):
    # d_model=7800 is within the parameter budget: the model (2 GB for an LRU) was built, and only
    # then compared with the 8-wide weights (peak RSS +1.9 GB, 5 s)
    _edit_model(saved, d_model=7800)
    out, grew = _load_in_child(saved)
    assert "CheckpointError:" in out and "d_model=7800" in out and "encoder.weight: file (8, 3)" in out, out
    assert grew < 200, f"peak RSS grew by {grew} MiB before refusing"  # the header and the config only


def test_more_layers_than_the_weights_hold_are_refused_before_building_them(saved):
    # n_layers=400: 400 blocks were built (50 s for S4D), then refused with a 30 000-character list
    # of every missing key
    _edit_model(saved, n_layers=400)
    with pytest.raises(CheckpointError, match=r"n_layers=400, but the file holds 2 blocks") as err:
        from_pretrained(saved)
    assert len(str(err.value)) < 1000


def test_a_wrong_input_or_output_width_is_named_by_its_field(saved):
    _edit_model(saved, d_input=5, d_output=9)
    with pytest.raises(CheckpointError, match=r"d_input=5.*encoder.weight: file \(8, 3\) vs config \(8, 5\).*"
                                              r"decoder.weight: file \(2, 8\) vs config \(9, 8\)"):
        from_pretrained(saved)


def test_a_config_too_big_to_build_is_a_checkpoint_error(tmp_path):
    # S4D's HiPPO initialisation needs a d_state x d_state matrix (6.5e12 bytes here) although the
    # parameters fit the budget: the allocator's RuntimeError came out of from_pretrained raw
    folder = _save(tmp_path / "s4d", layer="s4d")
    _edit_model(folder, layer_kwargs={"d_state": 900_000})
    with pytest.raises(CheckpointError, match=r"cannot build the model described by .*config.json \(.*"
                                              r"d_state=900000\)"):
        from_pretrained(folder)
