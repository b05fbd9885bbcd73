"""Checkpoints: save_pretrained / from_pretrained / push_to_hub, shipped models, and every refusal.

Round trips compare with torch.equal (exact): loading copies the same float32 values into the same
modules, and the same CPU ops on the same inputs give bit-identical outputs.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lrnnx_zoo
from lrnnx_zoo import CheckpointError, ModelConfig, SequenceModel, from_pretrained, list_models
from lrnnx_zoo import hub
from lrnnx_zoo.cli import main as cli_main
from lrnnx_zoo.registry import PluginInfo, get_registry

# huggingface_hub streams LFS PUT bodies with httpx2 `data=`, which httpx2 flags as deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:Use .content=:DeprecationWarning")

DIGITS = {"name": "digits", "source": "scikit-learn bundled", "split": {"seed": 0, "n_train": 1437, "n_test": 360}}
META = dict(task="sequence-classification", dataset=DIGITS, metrics={"test_accuracy": 0.97, "test_loss": 0.12},
            command="lrnnx-zoo train digits --family s4d --seed 0")


def tiny(layer: str = "s4d", seed: int = 0, **kw) -> SequenceModel:
    """A small model on ``layer``; passes d_state / l_max only if the layer takes them."""
    params = inspect.signature(get_registry().get_layer(layer).__init__).parameters
    layer_kwargs = {k: v for k, v in (("d_state", 4), ("l_max", 16)) if k in params}
    torch.manual_seed(seed)
    cfg = dict(layer=layer, d_input=3, d_output=2, d_model=8, n_layers=2, layer_kwargs=layer_kwargs)
    return SequenceModel(ModelConfig(**{**cfg, **kw})).eval()


def assert_same_outputs(a: SequenceModel, b: SequenceModel, steps: bool = False) -> None:
    x = torch.randn(2, 12, a.config.d_input, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        if steps and not b.bidirectional:  # streaming reads the loaded parameters and buffers too
            ca, cb = a.allocate_inference_cache(2), b.allocate_inference_cache(2)
            for t in range(x.shape[1]):
                assert torch.equal(a.step(x[:, t], ca)[0], b.step(x[:, t], cb)[0])


# -- round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", lrnnx_zoo.list_layers())
def test_round_trip_every_registered_layer(layer, tmp_path):
    model = tiny(layer)
    folder = model.save_pretrained(tmp_path / layer, **META)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = from_pretrained(folder)
    assert isinstance(loaded, SequenceModel) and not loaded.training
    assert_same_outputs(model, loaded, steps=True)
    info = loaded.checkpoint_info
    assert info["family"] == layer and info["metrics"] == META["metrics"]
    assert info["source"] == {"type": "local", "path": str(folder.resolve())}


def test_round_trip_backbone_with_pooling_and_buffers(tmp_path):
    model = tiny("s4d", pooling="mean", norm="batch", post="linear")
    model.train()
    model(torch.randn(4, 16, 3))  # move BatchNorm running statistics away from their init
    model.eval()
    loaded = SequenceModel.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert torch.equal(loaded.blocks[0].norm.running_mean, model.blocks[0].norm.running_mean)
    assert_same_outputs(model, loaded, steps=True)


def test_config_json_and_model_card_layout(tmp_path):
    from huggingface_hub import ModelCard

    folder = tiny("s4d").save_pretrained(tmp_path / "digits-s4d", notes="tiny test model", **META)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["format_version"] == 1 and cfg["library"] == "lrnnx-zoo"
    assert cfg["library_version"] == lrnnx_zoo.__version__ and cfg["family"] == "s4d"
    assert cfg["plugin"] == {"name": "s4d", "distribution": "lrnnx-zoo", "version": lrnnx_zoo.__version__}
    assert cfg["model"] == tiny("s4d").config.to_dict()
    assert (cfg["task"], cfg["dataset"], cfg["metrics"]) == (META["task"], DIGITS, META["metrics"])
    assert load_file(folder / "model.safetensors").keys() == tiny("s4d").state_dict().keys()

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "lrnnx-zoo" and card.data.datasets == ["digits"]
    assert {"s4d", "state-space-model"} <= set(card.data.tags)
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == META["metrics"]
    for text in ("## Task", "## Data and split", "n_train = 1437", "## Metrics", "| test_accuracy | 0.9700 |",
                 META["command"], 'lrnnx_zoo.from_pretrained("digits-s4d")',
                 "lrnnx-zoo export digits-s4d --format onnx --out DIR", "tiny test model"):
        assert text in card.text, text


# -- the Hub, through the real huggingface_hub client against LocalHub -------------------------
def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_hub_download_revisions_offline_and_cache(local_hub, tmp_path):
    v1, v2 = tiny("s4d", seed=1), tiny("s4d", seed=2)
    old = local_hub.commit("acme/tiny-s4d", _files(v1.save_pretrained(tmp_path / "v1")), message="v1")
    new = local_hub.commit("acme/tiny-s4d", _files(v2.save_pretrained(tmp_path / "v2")), message="v2")

    latest = from_pretrained("acme/tiny-s4d")
    assert_same_outputs(v2, latest)
    assert latest.checkpoint_info["source"]["commit"] == new
    older = from_pretrained("acme/tiny-s4d", revision=old)
    assert_same_outputs(v1, older)
    assert older.checkpoint_info["source"] == {**older.checkpoint_info["source"], "type": "hub",
                                               "repo_id": "acme/tiny-s4d", "revision": old, "commit": old}

    local_hub.clear_requests()
    with local_hub.offline():  # HF_HUB_OFFLINE: served from the cache, no request
        assert_same_outputs(v2, from_pretrained("acme/tiny-s4d"))
        assert_same_outputs(v1, from_pretrained("acme/tiny-s4d", revision=old))
        with pytest.raises(CheckpointError, match=r"not in the Hub cache and offline mode \(HF_HUB_OFFLINE\)"):
            from_pretrained("acme/never-downloaded")
    assert_same_outputs(v2, from_pretrained("acme/tiny-s4d", local_files_only=True))
    assert local_hub.requests == []
    with pytest.raises(CheckpointError, match="local_files_only=True forbids"):
        from_pretrained("acme/tiny-s4d", revision="f" * 40, local_files_only=True)
    with pytest.raises(CheckpointError, match="has no revision 'nope'"):
        from_pretrained("acme/tiny-s4d", revision="nope")
    with pytest.raises(CheckpointError, match="has no such repo"):
        from_pretrained("acme/missing")


def test_push_to_hub_then_download(local_hub, tmp_path):
    """Exercises the real upload protocol (create_repo, preupload, LFS batch + PUT, commit) against
    LocalHub, then downloads through the normal client and compares outputs."""
    model = tiny("lru", pooling="last")
    commit = model.push_to_hub("acme/pushed", commit_message="first push")
    assert sorted(local_hub.list_files("acme/pushed")) == [".gitattributes", "README.md", "config.json",
                                                           "model.safetensors"]
    assert local_hub.file_entry("acme/pushed", "model.safetensors").lfs  # went through git-lfs
    assert commit.oid == local_hub.resolve("acme/pushed")
    loaded = from_pretrained("acme/pushed")
    assert_same_outputs(model, loaded)
    assert 'from_pretrained("acme/pushed")' in local_hub.read_file("acme/pushed", "README.md").decode()

    # metadata travels with save_pretrained(push_to_hub=True), and again when a loaded model is pushed
    model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="acme/pushed", **META)
    again = from_pretrained("acme/pushed")
    assert again.checkpoint_info["metrics"] == META["metrics"]
    again.push_to_hub("acme/pushed", revision="dev")
    dev = from_pretrained("acme/pushed", revision="dev")
    assert dev.checkpoint_info["metrics"] == META["metrics"]
    assert_same_outputs(model, dev)


# -- refusals ----------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path) -> Path:
    return tiny("s4d").save_pretrained(tmp_path / "ckpt", **META)


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_pickled_weights_are_refused(saved, name):
    (saved / "model.safetensors").rename(saved / name)
    with pytest.raises(CheckpointError, match=rf"refusing to load {name} in .*: pickled weights .*safetensors"):
        from_pretrained(saved)
    with pytest.raises(CheckpointError, match=rf"refusing to load .*/{name}: pickled weights"):
        from_pretrained(saved / name)


def test_pickled_only_hub_repo_is_refused(local_hub, saved):
    local_hub.commit("acme/pickled", {"config.json": (saved / "config.json").read_bytes(),
                                      "pytorch_model.bin": b"\x80\x04 not really a pickle"})
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin in Hub repo 'acme/pickled' .*pickled weights"
                                              r".*holds: .*config.json, pytorch_model.bin"):
        from_pretrained("acme/pickled")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupt_safetensors(saved, damage):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt"):
        from_pretrained(saved)


def test_missing_and_unexpected_keys_are_listed(saved):
    tensors = load_file(saved / "model.safetensors")
    tensors.pop("decoder.bias")
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \['decoder.bias'\]; unexpected keys \['extra.weight'\]"):
        from_pretrained(saved)


def test_shape_disagreeing_with_config_is_listed(saved):
    cfg = json.loads((saved / "config.json").read_text())
    _edit_config(saved, model={**cfg["model"], "d_output": 5})
    with pytest.raises(CheckpointError, match=r"decoder.bias: file \(2,\) vs config \(5,\)"):
        from_pretrained(saved)


def test_unknown_family_names_plugin_and_fix(saved, monkeypatch):
    cfg = json.loads((saved / "config.json").read_text())
    _edit_config(saved, family="s5", model={**cfg["model"], "layer": "s5"},
                 plugin={"name": "s5", "distribution": "lrnnx-s5", "version": "0.3"})
    with pytest.raises(CheckpointError, match=r"'s5' from plugin 's5' \(distribution lrnnx-s5 0.3\).*"
                                              r"pip install lrnnx-s5"):
        from_pretrained(saved)
    # an installed plugin of that name that failed to import is reported as such
    monkeypatch.setitem(get_registry().plugins, "s5", PluginInfo("s5", "s5_mod", error="ImportError: no module x"))
    with pytest.raises(CheckpointError, match=r"Plugin 's5' is installed but failed to load: ImportError: no module x"):
        from_pretrained(saved)


def test_newer_format_version_is_refused(saved):
    _edit_config(saved, format_version=2, library_version="9.0")
    with pytest.raises(CheckpointError, match=r"format_version 2 .*reads format_version <= 1.*pip install -U"):
        from_pretrained(saved)


def test_missing_config_lists_files(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no config.json.*holds: README.md, model.safetensors"):
        from_pretrained(saved)


def test_unknown_name_and_file_paths(tmp_path):
    with pytest.raises(CheckpointError, match="not an existing folder, not a shipped model"):
        from_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="pass its folder"):
        from_pretrained(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="revision='v1' applies to Hub repos"):
        from_pretrained(tmp_path, revision="v1")


# -- atomic save -------------------------------------------------------------------------------
def test_interrupted_save_keeps_old_checkpoint(saved, monkeypatch):
    import safetensors.torch

    before = _files(saved)
    (saved / "notes.txt").write_text("mine")  # a user's file in the folder survives saves

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        tiny("s4d", seed=5).save_pretrained(saved)
    assert _files(saved) == {**before, "notes.txt": b"mine"}
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"]  # no temporary folders left
    assert_same_outputs(tiny("s4d"), from_pretrained(saved))

    monkeypatch.undo()
    new = tiny("s4d", seed=5)
    new.save_pretrained(saved)
    assert_same_outputs(new, from_pretrained(saved))
    assert (saved / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"]


# -- shipped checkpoints, list_models, CLI -----------------------------------------------------
@pytest.fixture
def fake_shipped(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "shipped"
    for name, layer in (("digits-s4d", "s4d"), ("digits-lru", "lru"), ("sine-lru", "lru")):
        tiny(layer).save_pretrained(root / name, **META)
    (root / "__pycache__").mkdir()
    monkeypatch.setattr(hub, "checkpoints_root", lambda: root)
    return root


def test_list_models_wildcards(fake_shipped):
    assert list_models() == ["digits-lru", "digits-s4d", "sine-lru"]
    assert list_models("digits-*") == ["digits-lru", "digits-s4d"]
    assert list_models("*lru") == ["digits-lru", "sine-lru"]
    assert list_models("s4d") == [] and list_models("*-s4?") == ["digits-s4d"]
    loaded = from_pretrained("digits-s4d")
    assert loaded.checkpoint_info["source"]["type"] == "shipped"
    assert_same_outputs(tiny("s4d"), loaded)


def test_cli_models_and_info(fake_shipped, capsys):
    assert cli_main(["models", "digits-*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].split() == ["digits-s4d", "s4d", "sequence-classification",
                                                    "test_accuracy=0.97"]
    assert cli_main(["info", "digits-lru"]) == 0
    out = capsys.readouterr().out
    assert '"family": "lru"' in out and "test_accuracy: 0.97" in out
    assert cli_main(["info", "digits-lru", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["card_metrics"] == META["metrics"]
    assert cli_main(["info", "no/such/thing"]) == 2
    assert "not a valid Hub repo id" in capsys.readouterr().err


def test_checkpoints_package_is_installed():
    root = hub.checkpoints_root()
    assert root is not None and (root / "__init__.py").is_file()


@pytest.mark.parametrize("name", list_models() or [pytest.param("none", marks=pytest.mark.skip("none shipped yet"))])
def test_every_shipped_checkpoint_loads_strictly(name):
    model = from_pretrained(name)
    info = model.checkpoint_info
    assert info["source"]["type"] == "shipped" and info["family"] in lrnnx_zoo.list_layers()
    assert info["metrics"], f"shipped checkpoint {name} records no metrics"
    x = torch.zeros(1, 8, model.config.d_input)
    assert torch.isfinite(model(x)).all()


def test_saved_weights_are_as_readable_as_the_other_files(tmp_path):
    folder = tiny("lru").save_pretrained(tmp_path / "ckpt", **META)
    modes = {f: (Path(folder) / f).stat().st_mode & 0o777 for f in ("config.json", "model.safetensors", "README.md")}
    assert len(set(modes.values())) == 1, modes
