"""Transfer learning and model surgery on a checkpoint: a new head (from_pretrained(..., d_output=5),
SequenceModel.reconfigure), a frozen backbone, dropout for fine-tuning, saving, exporting and
evaluating the result, and ``init_from`` with a checkpoint of another head.

Weights are compared bit for bit (torch.equal): every comparison is of tensors copied or loaded, never
recomputed, so no tolerance applies. Models are one- or two-block S4D of width 8 (each test < 3 s)."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo import cli, training
from lrnnx_zoo.hub import CheckpointError
from lrnnx_zoo.models import ReinitializedWeightsWarning
from lrnnx_zoo.recipes import get_recipe
from lrnnx_zoo.training import param_groups, train

TINY = dict(layer="s4d", d_input=1, d_output=10, d_model=8, n_layers=1, layer_kwargs={"d_state": 8},
            norm="layer", post="linear", dropout=0.1, pooling="mean")
DIGITS = {"name": "digits", "spec": {"name": "digits", "params": {"seed": 0, "n_test": 360}}}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A 10-class checkpoint with a task, a data spec and metrics, as a trained one has."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base") / "base"
    lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(**TINY)).save_pretrained(
        folder, task="sequence-classification", dataset=DIGITS, metrics={"test_accuracy": 0.5})
    return folder


def _state(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _backbone(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(("encoder.", "decoder."))}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_refuses_a_head_replaced_by_hand_before_writing_anything(source, tmp_path):
    # The reported case: the save succeeded and wrote a checkpoint its own loader refused
    # ("decoder.weight: file (5, 8) vs config (10, 8)").
    model = lrnnx_zoo.from_pretrained(source)
    model.decoder = torch.nn.Linear(model.config.d_model, 5)
    with pytest.raises(CheckpointError, match=r"decoder is Linear\(8 -> 5\), the config's model has Linear\(8 -> 10\)"
                                              r".*Nothing was written\. Change a head with "
                                              r"model\.reconfigure\(d_output=5\)"):
        model.save_pretrained(tmp_path / "ft")
    assert not (tmp_path / "ft").exists()
    # over an existing checkpoint: it stays as it was
    before = (source / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="Nothing was written"):
        model.save_pretrained(source)
    assert (source / "model.safetensors").read_bytes() == before
    # the other way the message offers: the config brought in step with the module
    model.config = dataclasses.replace(model.config, d_output=5)
    model.save_pretrained(tmp_path / "ft")
    assert lrnnx_zoo.from_pretrained(tmp_path / "ft").config.d_output == 5


def test_from_pretrained_with_another_d_output_loads_the_backbone_and_names_the_fresh_head(source, tmp_path):
    base = lrnnx_zoo.from_pretrained(source)
    with pytest.warns(ReinitializedWeightsWarning, match=r"decoder\.weight, decoder\.bias were not loaded from the "
                                                         r"checkpoint but initialised afresh \(d_output 10 -> 5\)"):
        model = lrnnx_zoo.SequenceModel.from_pretrained(source, d_output=5)
    assert model.config == dataclasses.replace(base.config, d_output=5)
    assert _same(_backbone(_state(model)), _backbone(_state(base)))
    assert torch.equal(model.encoder.weight, base.encoder.weight)
    assert model(torch.randn(2, 12, 1)).shape == (2, 5)
    info = model.checkpoint_info
    # the base model's task, data and metrics describe a 10-class model: none of them is this one's
    assert (info["task"], info["dataset"], info["metrics"]) == (None, None, None)
    assert info["base_model"] == {"from": str(source), "from_metrics": {"test_accuracy": 0.5},
                                  "changes": {"d_output": [10, 5]}, "reinitialized": ["decoder.weight", "decoder.bias"]}
    out = model.save_pretrained(tmp_path / "ft")
    again = lrnnx_zoo.from_pretrained(out)
    assert _same(_state(again), _state(model))
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["d_output"] == 5 and config["base_model"]["changes"] == {"d_output": [10, 5]}
    card = (out / "README.md").read_text()
    assert "## Base model" in card and "`decoder.weight`, `decoder.bias` were initialised afresh" in card
    assert "test_accuracy" not in card.split("## Base model")[0]       # no claim of the base model's metric
    # d_input too: a new encoder
    with pytest.warns(ReinitializedWeightsWarning, match=r"encoder\.weight, encoder\.bias"):
        wide = lrnnx_zoo.from_pretrained(source, d_input=3)
    assert wide(torch.randn(2, 12, 3)).shape == (2, 10)
    assert _same(_backbone(_state(wide)), _backbone(_state(base)))


def test_changes_of_the_backbone_are_refused_before_anything_is_read(source, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was read")
    monkeypatch.setattr("lrnnx_zoo.hub.resolve_checkpoint", never)
    with pytest.raises(ValueError, match=r"from_pretrained cannot change d_model, n_layers: they shape the backbone"
                                         r".*nothing was loaded or changed"):
        lrnnx_zoo.from_pretrained(source, n_layers=2, d_model=16)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['d_ouptut'\]"):
        lrnnx_zoo.from_pretrained(source, d_ouptut=5)


def test_load_state_dict_into_a_model_of_another_backbone_loads_nothing(source):
    small = lrnnx_zoo.from_pretrained(source)
    for change in ({"n_layers": 2}, {"d_model": 16}):
        big = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(**{**TINY, **change}))
        before = _state(big)
        # torch copied every tensor that fitted (the encoder, block 0) before raising about the rest
        with pytest.raises(RuntimeError, match="Nothing was loaded"):
            big.load_state_dict(small.state_dict())
        assert _same(_state(big), before)
    # strict=False still loads the keys it can, as torch's does, when every shape fits
    two = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(**{**TINY, "n_layers": 2}))
    result = two.load_state_dict(small.state_dict(), strict=False)
    assert result.missing_keys and torch.equal(two.blocks[0].layer.kernel.C, small.blocks[0].layer.kernel.C)


def test_load_state_dict_lets_through_what_torch_itself_accepts():
    # The check before the copy refused state dicts torch loads: a batch norm's num_batches_tracked missing
    # from one without version metadata (a plain dict, as safetensors gives; torch fills it in), keys a
    # load post-hook forgives, and a (1,) tensor for a 0-d one. Each still raises where torch raises.
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(**{**TINY, "norm": "batch"}))
    full = model.state_dict()
    tracked = [k for k in full if k.endswith("num_batches_tracked")]
    assert tracked
    model.load_state_dict({k: v for k, v in full.items() if k not in tracked})          # torch fills them in
    with pytest.raises(RuntimeError, match=r"missing keys .*num_batches_tracked.*Nothing was loaded"):
        versioned = full.copy()
        versioned._metadata = full._metadata                   # what state_dict() records: batch norm version 2
        for k in tracked:
            del versioned[k]
        model.load_state_dict(versioned)
    handle = model.register_load_state_dict_post_hook(lambda module, keys: keys.missing_keys.clear())
    model.load_state_dict({k: v for k, v in full.items() if k != "decoder.bias"})
    handle.remove()
    with pytest.raises(RuntimeError, match=r"missing keys decoder\.bias\. Nothing was loaded"):
        model.load_state_dict({k: v for k, v in full.items() if k != "decoder.bias"})
    model.scale = torch.nn.Parameter(torch.tensor(1.0))
    model.load_state_dict({**model.state_dict(), "scale": torch.tensor([2.0])})
    assert model.scale.item() == 2.0
    with pytest.raises(RuntimeError, match=r"shapes that differ: scale: given \(2,\), model \(\)\. Nothing was loaded"):
        model.load_state_dict({**model.state_dict(), "scale": torch.tensor([2.0, 3.0])})


def test_dropout_for_fine_tuning_is_a_config_change_and_a_hand_set_one_is_refused(source, tmp_path):
    model = lrnnx_zoo.from_pretrained(source)
    assert model.reconfigure(dropout=0.3) == []
    assert all(b.dropout.p == 0.3 for b in model.blocks) and model.config.dropout == 0.3
    assert model.checkpoint_info["metrics"] == {"test_accuracy": 0.5}     # same weights, same eval-mode model
    assert json.loads((model.save_pretrained(tmp_path / "a") / "config.json").read_text())["model"]["dropout"] == 0.3
    by_hand = lrnnx_zoo.from_pretrained(source)
    for block in by_hand.blocks:
        block.dropout.p = 0.3
    with pytest.raises(CheckpointError, match=r"blocks with dropout 0\.3, config dropout=0\.1.*reconfigure\(dropout=0\.3\)"):
        by_hand.save_pretrained(tmp_path / "b")
    # another pooling: no new weights, but the base model's metrics were measured with the old one
    pooled = lrnnx_zoo.from_pretrained(source, pooling="last")
    info = pooled.checkpoint_info
    assert info["metrics"] is None and info["dataset"] == DIGITS and info["base_model"]["changes"] == {
        "pooling": ["mean", "last"]}


def test_a_frozen_backbone_trains_only_the_head_and_round_trips(source, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReinitializedWeightsWarning)
        model = lrnnx_zoo.from_pretrained(source, d_output=3)
    model.requires_grad_(False)
    model.decoder.requires_grad_(True)
    groups = param_groups(model, lr=1e-2, weight_decay=0.01, ssm_lr=1e-3)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.decoder.parameters()}
    backbone = _backbone(_state(model))
    head = _state(model)["decoder.weight"]
    optimizer = torch.optim.AdamW(groups)
    model.train()
    x, y = torch.randn(16, 20, 1), torch.randint(0, 3, (16,))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert _same(_backbone(_state(model)), backbone) and not torch.equal(model.decoder.weight, head)
    out = model.save_pretrained(tmp_path / "ft", task="sequence-classification", metrics={"val_accuracy": 0.7})
    again = lrnnx_zoo.from_pretrained(out)
    with torch.no_grad():     # both on the inference path (a differentiated kernel rounds 1 ulp apart)
        assert torch.equal(again(x), model(x))
    assert again.checkpoint_info["metrics"] == {"val_accuracy": 0.7}
    assert again.checkpoint_info["base_model"]["from"] == str(source)


def test_export_refuses_a_hand_replaced_head_and_writes_a_reconfigured_one(source, tmp_path):
    pytest.importorskip("onnxruntime")
    from lrnnx_zoo.export import ExportError, to_onnx
    model = lrnnx_zoo.from_pretrained(source)
    model.reconfigure(pooling=None)        # a per-step model, as a forecaster is
    model.decoder = torch.nn.Linear(8, 3)
    # it failed in ONNX's shape inference: "Inferred shape and existing shape differ in dimension 1: (3) vs (10)"
    with pytest.raises(ExportError, match=r"decoder is Linear\(8 -> 3\).*reconfigure\(d_output=\.\.\.\)"):
        to_onnx(model, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReinitializedWeightsWarning)
        model = lrnnx_zoo.from_pretrained(source, d_output=3, pooling=None)
    # validated before it is written: the graph streams the reconfigured model's outputs (to_onnx's tolerance)
    result = to_onnx(model, tmp_path / "ok.onnx", validation_input=torch.randn(2, 16, 1))
    meta = result.metadata
    assert result.d_output == 3 and meta["lrnnx_zoo.d_output"] == "3" and result.validation is not None
    assert meta["lrnnx_zoo.source"] == f"in-memory model adapted from {source} (d_output 10 -> 3, pooling 'mean' -> None)"


def test_an_encoder_under_weight_norm_exports_but_is_not_saved_as_a_plain_linear(tmp_path):
    # The exporters read only the sizes from the config; the check made for a head replaced by hand refused
    # a ParametrizedLinear of the right sizes ("encoder is a ParametrizedLinear"), which streams as it runs.
    pytest.importorskip("onnxruntime")
    from lrnnx_zoo.export import to_onnx
    torch.manual_seed(0)
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(**{**TINY, "pooling": None})).eval()
    torch.nn.utils.parametrizations.weight_norm(model.encoder)
    result = to_onnx(model, tmp_path / "m.onnx", validation_input=torch.randn(1, 16, 1), opset=17)
    assert result.validation.passed               # streamed against forward within to_onnx's tolerance
    # a checkpoint rebuilds an nn.Linear with other state names: saving it is still refused
    with pytest.raises(CheckpointError, match=r"encoder is a ParametrizedLinear.*Nothing was written"):
        model.save_pretrained(tmp_path / "ckpt")


def test_a_model_on_the_meta_device_is_reconfigured_whole():
    # built on the meta device to be materialised later: reconfigure replaced the decoder and the config,
    # then failed fingerprinting the weights ("Cannot copy out of meta tensor"), leaving checkpoint_info behind
    with torch.device("meta"):
        model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(**TINY))
    assert model.reconfigure(d_output=3) == ["decoder.weight", "decoder.bias"]
    assert model.decoder.weight.is_meta and model.decoder.out_features == 3 and model.config.d_output == 3
    assert model.checkpoint_info["base_model"]["changes"] == {"d_output": [10, 3]}
    assert model.checkpoint_info["weights_digest"] is None and model.config_mismatches() == []


def test_a_reconfigured_model_does_not_claim_its_base_models_task_data_or_metrics(source, tmp_path, capsys):
    # evaluate re-measures the metrics of the data a checkpoint records: a 5-class model saved with
    # the base model's 10-class digits and accuracy would be evaluated (and carded) as that task
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReinitializedWeightsWarning)
        out = lrnnx_zoo.from_pretrained(source, d_output=5).save_pretrained(tmp_path / "ft")
    config = json.loads((out / "config.json").read_text())
    assert (config["task"], config["dataset"], config["metrics"]) == (None, None, None)
    assert cli.main(["evaluate", str(out)]) == 2
    assert "records no data spec" in capsys.readouterr().err


def test_init_from_a_checkpoint_of_another_head_loads_its_backbone_and_starts_the_head_from_the_seed(
        tmp_path, monkeypatch):
    recipe = dataclasses.replace(get_recipe("digits-tiny"), max_steps=1)
    torch.manual_seed(1)
    src = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(**{**recipe.model, "d_output": 3, "pooling": None}))
    src.save_pretrained(tmp_path / "src")
    seen = []
    real = training.batch_loss

    def first(net, *args):
        seen.append(_state(net))
        return real(net, *args)
    monkeypatch.setattr(training, "batch_loss", first)
    plain, _ = train(recipe, progress=False)             # the seed's initial weights
    with pytest.warns(ReinitializedWeightsWarning, match=r"decoder\.bias, decoder\.weight are not loaded but "
                                                         r"initialised from the recipe's seed \(d_output 3 -> 10"):
        model, _ = train(recipe, out_dir=str(tmp_path / "tuned"), progress=False, init_from=str(tmp_path / "src"))
    fresh, tuned = seen
    assert _same(_backbone(tuned), _backbone(_state(src)))
    assert torch.equal(tuned["decoder.weight"], fresh["decoder.weight"])
    assert "Its decoder.bias, decoder.weight did not fit this model" in model.checkpoint_info["notes"]
    # another backbone is still refused
    with pytest.raises(training.TrainingSetupError, match="holds another model than recipe"):
        train(recipe, init_from="digits-s4d")


def test_the_readmes_fine_tuning_snippet_runs(tmp_path, monkeypatch):
    from test_readme import code_blocks
    (code,) = [b for b in code_blocks("The zoo: checkpoints, loading, training", "python") if "d_output=5" in b]
    monkeypatch.chdir(tmp_path)
    names = {"lrnnx_zoo": lrnnx_zoo, "torch": torch, "param_groups": param_groups}
    with pytest.warns(ReinitializedWeightsWarning):
        exec(compile(code, "README.md", "exec"), names)
    # from_pretrained gives an eval-mode model: trained as the snippet left it, its dropout=0.2 did nothing
    assert names["model"].training and names["model"].blocks[0].dropout.training
    saved = lrnnx_zoo.from_pretrained(tmp_path / "my-5-class")
    assert (saved.config.d_output, saved.config.dropout) == (5, 0.2)
    assert saved.checkpoint_info["base_model"]["from"] == "digits-s4d"
