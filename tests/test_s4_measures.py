"""S4's HiPPO measures are its registered initializers: listed, used by name, and extensible by a
plugin (a third-party measure is found by the layer, FFTConv's s4 kernel and the checkpoint
machinery like any other initializer)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo import hippo
from lrnnx_zoo.plugins.s4 import HippoSSKernel, SSKernelNPLR
from lrnnx_zoo.plugins.s4.measures import NPLR_MEASURES

from plugin_fixtures import installed, make_distribution, reinstall

# A plugin adding the measure "scaledlegs": LegS with its normal part's eigenvalues doubled
# (a different, still stable system), from the public helpers.
SCALED_LEGS = '''
import lrnnx_zoo
from lrnnx_zoo import hippo


def init_scaledlegs(N, rank=1, scale=2.0):
    w, P, B, _ = hippo.nplr("legs", N, rank=rank)
    return scale * w, P, B


def init_badshape(N, rank=1):
    w, P, B, _ = hippo.nplr("legs", N, rank=rank)
    return w, P, B[:-1]


def init_nanlegs(N, rank=1):
    w, P, B, _ = hippo.nplr("legs", N, rank=rank)
    return w * float("nan"), P, B


@lrnnx_zoo.hookimpl
def lrnnx_zoo_register_initializers(registry):
    registry.add_initializer("s4", "scaledlegs", init_scaledlegs)
    registry.add_initializer("s4", "badshape", init_badshape)
    registry.add_initializer("s4", "nanlegs", init_nanlegs)
'''


def _measures_dist(root):
    return make_distribution(root, "tp-measures", {"tp_measures": SCALED_LEGS}, {"measures": "tp_measures"})


def test_the_nplr_measures_are_s4s_initializers():
    assert lrnnx_zoo.list_initializers("s4") == sorted(f"s4.{m}" for m in NPLR_MEASURES)
    for measure in NPLR_MEASURES:
        rank = 2 if measure == "legt" else 1
        w, P, B = lrnnx_zoo.get_initializer("s4", measure)(8, rank=rank)
        w_ref, P_ref, B_ref, _ = hippo.nplr(measure, 8, rank=rank, dtype=torch.float64)
        for got, want in ((w, w_ref), (P, P_ref), (B, B_ref)):
            assert got.dtype == torch.complex128 and torch.equal(got, want), measure


def test_cli_layers_lists_s4s_measures():
    out = subprocess.run([sys.executable, "-m", "lrnnx_zoo.cli", "layers"], capture_output=True, text=True,
                         check=True, env={**os.environ, "LRNNX_ZOO_DISABLE_PLUGIN_AUTOLOAD": "1"}).stdout
    row = next(line for line in out.splitlines() if line.split()[0] == "s4")
    assert row.split(None, 2)[2] == "fourier, glagt, lagt, legs, legt, tlagt", out


@pytest.mark.parametrize("layer, kwargs", [("s4", {}), ("fftconv", {"kernel_type": "s4"})])
def test_unknown_measure_lists_the_registered_ones(layer, kwargs):
    with pytest.raises(lrnnx_zoo.RegistryError, match=r"unknown initializer for 's4' 'legx'; available: "
                                                      r"fourier, glagt, lagt, legs, legt, tlagt"):
        lrnnx_zoo.create_layer(layer, 4, d_state=4, measure="legx", **kwargs)


@pytest.mark.parametrize("measure", ["random", "diagonal"])
def test_hippo_measures_without_nplr_structure_say_why_and_where_to_go(measure):
    with pytest.raises(ValueError, match=rf"HiPPO measure '{measure}' has no normal-plus-low-rank structure, so S4 "
                                         r"cannot start from it; S4's measures: fourier, glagt, lagt, legs, legt, "
                                         r"tlagt. For a diagonal system use the S4D family"):
        lrnnx_zoo.create_layer("s4", 4, d_state=4, measure=measure)


def test_a_plugins_measure_builds_the_layer_and_fftconvs_s4_kernel(tmp_path, monkeypatch):
    H, N, L = 3, 8, 64
    with installed(_measures_dist(tmp_path / "site"), monkeypatch):
        assert "s4.scaledlegs" in lrnnx_zoo.list_initializers("s4")
        torch.manual_seed(0)
        mine = HippoSSKernel(H, N=N, measure="scaledlegs", measure_args={"scale": 3.0})
        # The same kernel built by hand from the plugin's factors and the same random draws
        # (HippoSSKernel draws log_dt, then C): exactly equal, and unlike LegS's own.
        w, P, B, _ = hippo.nplr("legs", N, dtype=torch.float64)
        torch.manual_seed(0)
        log_dt = torch.rand(H, dtype=torch.float64) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)
        C = torch.randn(1, H, N // 2, dtype=torch.complex64)
        by_hand = SSKernelNPLR(None, (3.0 * w).expand(H, -1), P.unsqueeze(1).expand(-1, H, -1), B.expand(H, -1),
                               C, log_dt)
        torch.manual_seed(0)
        legs = HippoSSKernel(H, N=N, measure="legs")
        with torch.no_grad():
            k_mine = mine(L=L)[0]
            assert torch.equal(k_mine, by_hand(L=L)[0])
            assert (k_mine - legs(L=L)[0]).abs().max() > 1e-3 * k_mine.abs().max()

        x = torch.randn(2, L, H)
        layer = lrnnx_zoo.create_layer("s4", H, d_state=N, measure="scaledlegs")
        fft = lrnnx_zoo.create_layer("fftconv", H, d_state=N, kernel_type="s4", measure="scaledlegs")
        for module in (layer, fft):
            y = module(x)
            assert y.shape == x.shape and torch.isfinite(y).all()


def test_a_checkpoint_with_a_plugins_measure_records_and_needs_that_plugin(tmp_path, monkeypatch):
    config = lrnnx_zoo.ModelConfig(layer="s4", d_input=1, d_output=2, d_model=4, n_layers=1,
                                   layer_kwargs={"d_state": 4, "measure": "scaledlegs"})
    with installed(_measures_dist(tmp_path / "site"), monkeypatch):
        lrnnx_zoo.SequenceModel(config).save_pretrained(tmp_path / "ck")
        saved = json.loads((tmp_path / "ck" / "config.json").read_text())
        assert saved.get("extra_plugins") == [{"name": "measures", "distribution": "tp-measures",
                                               "version": "0.1.0", "names": ["s4.scaledlegs"]}], saved
        lrnnx_zoo.from_pretrained(tmp_path / "ck")               # loads while the plugin is installed
        reinstall(monkeypatch)                                    # pip uninstall tp-measures
        with pytest.raises(lrnnx_zoo.CheckpointError, match=r"s4.scaledlegs from plugin 'measures' "
                                                            r"\(tp-measures 0.1.0\), which is not installed"):
            lrnnx_zoo.from_pretrained(tmp_path / "ck")


def test_a_measure_returning_wrong_shapes_or_non_finite_values_is_refused_by_name(tmp_path, monkeypatch):
    with installed(_measures_dist(tmp_path / "site"), monkeypatch):
        with pytest.raises(ValueError, match=r"the s4 initializer 'badshape' must return \(w, P, B\) tensors of "
                                             r"shapes \(4,\), \(1, 4\), \(4,\) for N=8, rank=1; got "
                                             r"\(\(4,\), \(1, 4\), \(3,\)\)"):
            lrnnx_zoo.create_layer("s4", 3, d_state=8, measure="badshape")
        with pytest.raises(ValueError, match="the s4 initializer 'nanlegs' returned non-finite values"):
            lrnnx_zoo.create_layer("s4", 3, d_state=8, measure="nanlegs")
