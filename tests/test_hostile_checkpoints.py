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
    # parameters fit the budget: the allocator's RuntimeError came out of from_pretrained raw. The
    # file keeps no layer tensors, so no d_state-sized shape can be compared before building (a file
    # that has them is refused without building: test_a_wrong_d_state_is_refused_before_the_model_is_built);
    # since an audit the missing names are, from a small stand-in of the model
    from safetensors.torch import load_file, save_file
    folder = _save(tmp_path / "s4d", layer="s4d")
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".layer." not in k}, folder / "model.safetensors")
    _edit_model(folder, layer_kwargs={"d_state": 900_000})
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks.0.layer.D', .*\] \.\.\. and \d+ more"):
        from_pretrained(folder)


@pytest.mark.parametrize("model", [{"d_model": 9000, "n_layers": 1}, {"n_layers": 20000, "d_model": 2}])
def test_a_weights_file_without_the_configs_tensors_is_refused_before_building(tmp_path, model):
    # A 10-byte model.safetensors (no tensors) beside a config of 14000-wide LRU blocks built the model
    # (1.5 GB) before "missing keys"; 20000 blocks took 13-31 s (an audit). A stand-in of one small
    # block names what the file lacks, counted over every block.
    import resource
    from safetensors.torch import save_file
    folder = _save(tmp_path / "c", layer="lru")
    save_file({}, folder / "model.safetensors")
    _edit_model(folder, **model)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=r"missing keys \['encoder.weight', .*\] \.\.\. and \d+ more"):
        from_pretrained(folder)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000     # KiB: nothing was built


# -- Q2/Q4: a weights file that is something else -----------------------------------------------
@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy-pickle"])
def test_pickled_weights_named_model_safetensors_are_named_as_such_and_not_unpickled(saved, zipped, monkeypatch):
    # torch.save's output renamed to model.safetensors was "truncated or corrupt (header too large)"
    # and the advice was to re-download it
    path = saved / "model.safetensors"
    torch.save(SequenceModel(ModelConfig("lru", 3, 2, d_model=8, n_layers=2, layer_kwargs={"d_state": 4})).state_dict(),
               path, _use_new_zipfile_serialization=zipped)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called on a user file"))
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a safetensors file but pickled weights "
                                              r"\(torch.save\).*torch.load\(PATH, weights_only=True\)"):
        from_pretrained(saved)


def test_a_git_lfs_pointer_in_place_of_the_weights_says_to_fetch_them(saved):
    # a repo cloned without git-lfs holds 130-byte pointer files: "truncated or corrupt (header too large)"
    (saved / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:"
                                             + "ab" * 32 + "\nsize 123456\n")
    with pytest.raises(CheckpointError, match=r"model.safetensors is a Git LFS pointer .*not the weights.*"
                                              r"git lfs pull") as err:
        from_pretrained(saved)
    assert "corrupt" not in str(err.value)


# -- Q3: config.json that is odd ----------------------------------------------------------------
def test_a_config_json_with_a_byte_order_mark_loads(saved):
    # editors on Windows save UTF-8 with a BOM: "not valid JSON (Unexpected UTF-8 BOM ...)"
    path = saved / "config.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert from_pretrained(saved).config.d_model == 8


@pytest.mark.parametrize("where", ["top", "model"])
def test_duplicate_keys_in_config_json_are_refused(saved, where):
    # json keeps the last of two "layer" (or "d_model") entries, another reader the first: the
    # config loaded as whichever Python picked, silently
    path = saved / "config.json"
    text = path.read_text()
    if where == "model":
        text = text.replace('"d_model": 8,', '"d_model": 16, "d_model": 8,')
        key = "d_model"
    else:
        text = text.replace('"format_version": 1,', '"format_version": 1, "format_version": 1,')
        key = "format_version"
    assert text != path.read_text()
    path.write_text(text)
    with pytest.raises(CheckpointError, match=rf"config.json repeats the key '{key}'"):
        from_pretrained(saved)


@pytest.mark.parametrize("field, value", [("name", 5), ("distribution", ["lrnnx-zoo"]), ("version", {"v": 1})])
def test_a_plugin_record_of_the_wrong_types_is_a_checkpoint_error(saved, field, value):
    # "expected string or bytes-like object, got 'list'" (a TypeError) from deep in the registry
    cfg = json.loads((saved / "config.json").read_text())
    cfg["plugin"][field] = value
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"config.json: 'plugin.{field}' must be a str or null, got "):
        from_pretrained(saved)


def test_a_huge_config_json_is_refused_without_reading_it(saved):
    # a config.json of 256 MiB (valid JSON padded with spaces) was read whole before parsing: peak RSS
    # grew by 209 MiB, and a larger one (a hostile Hub repo's) could exhaust memory
    path = saved / "config.json"
    with open(path, "ab") as f:
        f.write(b" " * (256 << 20))
    out, grew = _load_in_child(saved)
    assert "CheckpointError:" in out and "config.json is 268" in out and "MB" in out, out
    assert grew < 100, f"peak RSS grew by {grew} MiB"


@pytest.mark.parametrize("key, literal", [("lr", "NaN"), ("dt_max", "Infinity"), ("wd", "-Infinity")])
def test_non_finite_numbers_in_the_model_config_are_refused(tmp_path, key, literal):
    # NaN / Infinity are no JSON, and save_pretrained never writes them, but json reads them: an S4
    # checkpoint with "lr": NaN loaded, its first fine-tuning step made the SSM parameters NaN, and
    # the loaded model could not be saved again ("must be a finite number to be saved in JSON")
    folder = _save(tmp_path / "s4", layer="s4")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model"]["layer_kwargs"][key] = 0.5
    (folder / "config.json").write_text(json.dumps(cfg).replace(f'"{key}": 0.5', f'"{key}": {literal}'))
    with pytest.raises(CheckpointError, match=rf"config.json: model.layer_kwargs.{key} is {literal}"
                                              r".*a finite number"):
        from_pretrained(folder)


def test_non_finite_metrics_do_not_stop_a_load(saved):
    # metrics are provenance: a NaN loss another tool wrote there says nothing about the weights
    text = (saved / "config.json").read_text().replace('"metrics": null', '"metrics": {"test_loss": NaN}')
    assert "NaN" in text
    (saved / "config.json").write_text(text)
    assert from_pretrained(saved).checkpoint_info["metrics"]["test_loss"] != 0


def test_a_mismatch_in_every_block_is_summarised_not_listed_in_full(tmp_path):
    # d_state differing in a 40-block LRU listed 280 shapes (14 800 characters) in one message
    folder = _save(tmp_path / "deep", n_layers=40, d_model=4)
    _edit_model(folder, layer_kwargs={"d_state": 6})
    with pytest.raises(CheckpointError, match=r"blocks.0.layer.B_im: file \(4, 4\) vs config \(6, 4\);.* and 272 "
                                              r"more") as err:
        from_pretrained(folder)
    assert len(str(err.value)) < 2000, len(str(err.value))


# -- a d_state whose initialisation is expensive -------------------------------------------------
STATE_LAYERS = [("s4d", {}), ("s4d", {"init": "legs"}), ("s4", {}), ("lru", {}), ("fftconv", {})]


@pytest.mark.parametrize("layer, extra", STATE_LAYERS, ids=lambda v: v if isinstance(v, str) else "-".join(v.values()))
def test_a_wrong_d_state_is_refused_before_the_model_is_built(tmp_path, monkeypatch, layer, extra):
    # config.json saying d_state=3000 beside weights of d_state=4 passed the parameter budget and was
    # built in full (S4's and S4D-LegS's HiPPO initialisation eigendecomposes a 3000 x 3000 matrix:
    # 64 s here; d_state=30000 would take hours) before the shapes were compared.
    from lrnnx_zoo import models
    folder = _save(tmp_path / "ckpt", layer=layer, layer_kwargs={"d_state": 4, **extra})
    _edit_model(folder, layer_kwargs={"d_state": 3000, **extra})
    monkeypatch.setattr(models, "SequenceModel", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(CheckpointError, match=r"model.safetensors does not match the model its config.json "
                                              r"describes: shapes that disagree with config.json \(.*d_state=3000\): "
                                              r"blocks.0.layer.\S+: file \(.*\) vs config \(.*\)"):
        from_pretrained(folder)


@pytest.mark.parametrize("layer, extra, d_state", [(layer, extra, n) for layer, extra in STATE_LAYERS for n in (34, 100)]
                         + [("lru", {}, 33)], ids=str)
def test_a_large_d_state_that_matches_loads(tmp_path, layer, extra, d_state):
    # the sizes compared before building are predicted from layers of a small d_state: a checkpoint
    # whose d_state is past them (an odd number of conjugate pairs, an odd LRU size) must load as before
    model = SequenceModel(ModelConfig(layer, 3, 2, d_model=4, n_layers=2, layer_kwargs={"d_state": d_state, **extra}))
    loaded = from_pretrained(model.save_pretrained(tmp_path / "ckpt"))
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("length", [-5, 10**12])
def test_an_s4_stored_length_out_of_range_is_a_checkpoint_error(tmp_path, length):
    # S4's stored length is read from the weights file: -5 and 10**12 loaded, and the first forward
    # failed in the kernel or in the allocator ("tried to allocate 4000000000000 bytes"; an audit)
    from safetensors.torch import load_file, save_file
    folder = _save(tmp_path / "s4", layer="s4", layer_kwargs={"d_state": 4, "l_max": 16})
    weights = load_file(folder / "model.safetensors")
    weights["blocks.0.layer.kernel.L"] = torch.tensor(length)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"holds weights the model refuses: blocks.0.layer.kernel.L \(the "
                                              rf"kernel's stored length.*must be in \[0, 2147483648\], got {length}"):
        from_pretrained(folder)


@pytest.mark.parametrize("field", ["d_model", "n_layers", "d_state"])
def test_a_size_past_floats_range_is_a_checkpoint_error(tmp_path, field):
    # JSON integers may have thousands of digits: 10**400 escaped the budget check as a raw
    # "OverflowError: int too large to convert to float" (an audit); it is refused, shortly written
    folder = _save(tmp_path / "c")
    if field == "d_state":
        _edit_model(folder, layer_kwargs={"d_state": 10**400})
    else:
        _edit_model(folder, **{field: 10**400})
    with pytest.raises(CheckpointError, match=rf"{field}=1e\+400\b.* describe about 1e\+\d+ parameters"):
        from_pretrained(folder)


def test_a_loaded_lone_surrogate_is_saved_again(tmp_path):
    # JSON may hold "\ud800", which is no UTF-8: such a config's notes loaded, and saving the model
    # failed with a bare UnicodeEncodeError (an audit). The card writes it escaped, as config.json does.
    folder = _save(tmp_path / "c")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "notes": "trained \ud800"}))
    model = from_pretrained(folder)
    model.save_pretrained(tmp_path / "again")
    assert "\\ud800" in (tmp_path / "again" / "README.md").read_text(encoding="utf-8")
    assert from_pretrained(tmp_path / "again").checkpoint_info["notes"] == "trained \ud800"


def test_a_plugin_layer_whose_names_follow_its_sizes_still_loads(tmp_path):
    # The name check before building (test_a_weights_file_without_the_configs_tensors_...) builds small
    # stand-ins; a layer whose state names follow d_model (one module per channel) would look as if
    # names were missing. Stand-ins of two sizes disagree for it, and the check stands aside.
    import types
    import lrnnx_zoo
    from lrnnx_zoo.base import LTI_LRNN

    class PerChannel(LTI_LRNN):
        def __init__(self, d_model, d_state=1):
            super().__init__(None)
            self.d_model = d_model
            self.gains = torch.nn.ModuleList(torch.nn.Linear(1, 1, bias=False) for _ in range(d_model))

        def forward(self, x, integration_timesteps=None, lengths=None):
            return torch.cat([g(x[..., i:i + 1]) for i, g in enumerate(self.gains)], -1)

    plugin = types.ModuleType("per_channel_names_plugin")
    plugin.lrnnx_zoo_register_layers = lrnnx_zoo.hookimpl(lambda registry: registry.add_layer("per_channel_names",
                                                                                                PerChannel))
    lrnnx_zoo.register_plugin(plugin, "per-channel-names")
    try:
        model = SequenceModel(ModelConfig(layer="per_channel_names", d_input=2, d_output=2, d_model=10, n_layers=2,
                                          layer_kwargs={"d_state": 1}))
        model.save_pretrained(tmp_path / "m")
        loaded = from_pretrained(tmp_path / "m")
        assert loaded.state_dict().keys() == model.state_dict().keys()
    finally:
        lrnnx_zoo.unregister_plugin("per-channel-names")
