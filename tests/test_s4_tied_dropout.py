"""S4's tied dropout (DropoutNd, ``S4(tie_dropout=True)``) in training mode: one draw per (batch, channel)
kept over the whole sequence. A coverage run of the suite found its training branch unexercised."""

from __future__ import annotations

import pytest
import torch

from lrnnx_zoo.plugins.s4 import S4, DropoutNd


@pytest.mark.parametrize("transposed", [True, False])
def test_tied_dropout_zeroes_or_scales_whole_channels(transposed):
    torch.manual_seed(0)
    drop = DropoutNd(p=0.5, transposed=transposed).train()
    x = torch.rand(64, 8, 10) + 1.0                     # (B, D, L) if transposed else (B, L, D); no zeros
    y = drop(x)
    ratio = y / x
    time_dim = 2 if transposed else 1
    # each (batch, channel) is either dropped (0) or kept and scaled by 1 / (1 - p) = 2, at every step
    assert torch.all((ratio == 0) | torch.isclose(ratio, torch.tensor(2.0)))
    assert torch.all(ratio.amin(time_dim) == ratio.amax(time_dim))
    kept = (ratio.select(time_dim, 0) > 0).float().mean().item()
    assert 0.35 < kept < 0.65                           # 512 draws of p = 0.5: 0.5 +- 0.022 (sd), 6.7 sd margin
    assert torch.equal(drop.eval()(x), x)


def test_s4_with_tied_dropout_trains_with_channel_masks_and_is_deterministic_in_eval():
    torch.manual_seed(1)
    layer = S4(d_model=4, d_state=8, l_max=16, dropout=0.5, tie_dropout=True, transposed=False)
    assert isinstance(layer.dropout, DropoutNd)
    x = torch.randn(3, 16, 4)
    layer.train()
    a, b = layer(x)[0], layer(x)[0]
    assert not torch.equal(a, b)                        # fresh masks per call
    layer.eval()
    assert torch.equal(layer(x)[0], layer(x)[0])


def test_tied_dropout_refuses_p_outside_0_1():
    with pytest.raises(ValueError, match=r"dropout probability must lie in \[0, 1\), got 1"):
        DropoutNd(p=1.0)
