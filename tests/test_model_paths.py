"""SequenceModel / ModelConfig paths a coverage run of the suite found unexercised: a layer swapped into a
block by hand (its state names differ from the config's model) refused by save_pretrained with a way out
that fits, a bidirectional model asked to stream, ModelConfig's refusals and its JSON round trip."""

from __future__ import annotations

import json

import pytest
import torch

from lrnnx_zoo import CheckpointError, ModelConfig, SequenceModel, create_layer

CONFIG = ModelConfig(layer="lru", d_input=2, d_model=4, n_layers=2, d_output=3, layer_kwargs={"d_state": 4})


def test_a_layer_swapped_in_by_hand_is_refused_with_its_state_names_and_no_head_advice(tmp_path):
    # The same sizes everywhere (encoder, decoder, block count): only the state names tell the
    # checkpoint would not load. The way out is not model.reconfigure(d_output=...): d_output is right.
    model = SequenceModel(CONFIG)
    model.blocks[1].layer = create_layer("s4d", CONFIG.d_model, d_state=4)
    found = model.config_mismatches()
    assert len(found) == 1 and found[0].startswith("state names differ from the config's model (not in it: ")
    assert "blocks.1.layer.kernel.log_dt" in found[0] and "missing: blocks.1.layer.B_im" in found[0]
    assert model.config_mismatches(sizes_only=True) == []       # an exporter streams the layer it finds
    with pytest.raises(CheckpointError) as err:
        model.save_pretrained(tmp_path / "ckpt")
    text = str(err.value)
    assert "state names differ" in text and "Nothing was written." in text
    assert "reconfigure" not in text and "layer_kwargs" in text and "load_state_dict" in text
    assert not (tmp_path / "ckpt").exists()


def test_a_block_count_changed_by_hand_gets_the_same_way_out(tmp_path):
    model = SequenceModel(CONFIG)
    del model.blocks[1]
    with pytest.raises(CheckpointError, match=r"1 blocks, config n_layers=2\. Nothing was written\. Build the model "
                                              r"from a config"):
        model.save_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize("layer", ["fftconv", "s4"])
def test_a_bidirectional_model_refuses_to_stream(layer):
    model = SequenceModel(ModelConfig(layer=layer, d_input=2, d_model=4, n_layers=1, d_output=3,
                                      layer_kwargs={"d_state": 4, "bidirectional": True}))
    assert model.bidirectional
    assert model(torch.randn(1, 5, 2)).shape == (1, 5, 3)          # convolution mode sees both directions
    with pytest.raises(ValueError, match="bidirectional model sees the future and cannot run step by step"):
        model.allocate_inference_cache(1)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, float("nan")])
def test_model_config_refuses_a_dropout_outside_0_1(dropout):
    with pytest.raises(ValueError, match=r"ModelConfig\.dropout must lie in \[0, 1\)"):
        ModelConfig(layer="lru", d_input=2, d_model=4, n_layers=1, d_output=3, dropout=dropout)


def test_model_config_from_dict_names_the_missing_keys():
    with pytest.raises(ValueError, match=r"ModelConfig keys \['d_output'\] are missing; "
                                         r"required: \['layer', 'd_input', 'd_output'\]"):
        ModelConfig.from_dict({"layer": "lru", "d_input": 2})


def test_model_config_json_round_trip_and_parameter_count():
    text = CONFIG.to_json()
    assert json.loads(text) == CONFIG.to_dict() and text == json.dumps(CONFIG.to_dict(), indent=2, sort_keys=True)
    assert ModelConfig.from_dict(json.loads(text)) == CONFIG
    model = SequenceModel(CONFIG)
    model.register_buffer("not_a_parameter", torch.zeros(1000))
    assert model.num_parameters() == sum(p.numel() for p in model.parameters()) > 0
