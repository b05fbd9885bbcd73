"""``--json`` on the listings (models, plugins, layers, backends): one JSON document on stdout and
nothing else there, saying what the table says."""

from __future__ import annotations

import json

import pytest

from lrnnx_zoo.cli import main
from lrnnx_zoo.hub_card import headline_metric
from plugin_fixtures import BROKEN_IMPORT, GOOD_PLUGIN, installed, make_distribution


def run(argv, capsys, status: int = 0):
    """(stdout, stderr) of `lrnnx-zoo ARGV`, after checking its exit status."""
    assert main(argv) == status
    captured = capsys.readouterr()
    return captured.out, captured.err


def listing(argv, capsys, status: int = 0):
    """(the JSON document of `ARGV --json`, the table lines of `ARGV`), both with exit status ``status``."""
    out, _ = run([*argv, "--json"], capsys, status)
    document = json.loads(out)                      # the whole of stdout: nothing printed beside it
    table, _ = run(argv, capsys, status)
    return document, table.splitlines()


@pytest.mark.parametrize("pattern", [[], ["s4d"], ["digits-*"]])
def test_models_json_has_the_rows_of_the_table(pattern, capsys):
    # There was no machine-readable listing: a script had to split the aligned columns.
    models, table = listing(["models", *pattern], capsys)
    assert [m["name"] for m in models] == [line.split()[0] for line in table] and models
    for m, line in zip(models, table):
        assert line.split()[1:] == [m["family"], m["task"], headline_metric(m["metrics"])]
        assert main(["info", m["path"], "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["config"]["metrics"] == m["metrics"]


def test_models_json_of_no_match_is_an_empty_list(capsys):
    out, err = run(["models", "no-such-model", "--json"], capsys)
    assert json.loads(out) == [] and err == ""


def test_layers_and_backends_json_have_the_rows_of_the_table(capsys):
    layers, table = listing(["layers"], capsys)
    assert [line.split()[0] for line in table[1:]] == [entry["name"] for entry in layers]
    for entry, line in zip(layers, table[1:]):
        inits = ", ".join(sorted(i["name"] for i in entry["initializers"])) or "-"
        assert line.split(None, 2)[1:] == [", ".join(entry["plugins"]), inits]
    for kind in ([], ["cauchy"]):
        backends, table = listing(["backends", *kind], capsys)
        assert [f"{b['kind']}.{b['name']}" for b in backends] == table and table
        assert all(b["plugins"] for b in backends)
    out, err = run(["backends", "nope", "--json"], capsys, status=2)
    assert out == "" and "unknown backend kind 'nope'" in err


def test_plugins_json_reports_a_failed_plugin_and_keeps_the_strict_status(tmp_path, monkeypatch, capsys):
    modules = {"tp_json_good": GOOD_PLUGIN.replace("{layer_name}", "ema_j"), "tp_json_bad": BROKEN_IMPORT}
    root = make_distribution(tmp_path / "site", "tp-json", modules, {"good": "tp_json_good", "bad": "tp_json_bad"})
    with installed(root, monkeypatch):
        plugins, table = listing(["plugins"], capsys)
        strict, _ = listing(["plugins", "--strict"], capsys, status=1)
    assert strict == plugins
    rows = [line.split() for line in table[1:] if not line.startswith(" ")]
    assert [(p["name"], "ok" if p["ok"] else "FAILED") for p in plugins] == [tuple(r[:2]) for r in rows]
    bad = next(p for p in plugins if p["name"] == "bad")
    assert not bad["ok"] and "needs a library that is not installed" in bad["error"]
    good = next(p for p in plugins if p["name"] == "good")
    assert good["ok"] and good["error"] is None and good["layers"] == ["ema_j"]
    assert (good["distribution"], good["version"], good["builtin"]) == ("tp-json", "0.1.0", False)
