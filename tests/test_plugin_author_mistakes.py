"""A plugin author's first mistakes, each of which must end in an error that says what was expected,
what was found and what to do (found by walking the README's "Writing a plugin" guide as a stranger,
with real pip installs of a plugin distribution; here the distributions are built on sys.path)."""

from __future__ import annotations

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo.cli import main
from lrnnx_zoo.registry import RegistryError
from plugin_fixtures import GOOD_PLUGIN, installed, layers_registered, make_distribution


def _wrong_group(root, group: str):
    """A good plugin whose pyproject.toml named the entry point group ``group`` instead of lrnnx_zoo."""
    make_distribution(root, "tp-wronggroup", {"tp_wronggroup": GOOD_PLUGIN.replace("{layer_name}", "wg_ema")},
                      {"wg": "tp_wronggroup"})
    eps = next(root.glob("*.dist-info")) / "entry_points.txt"
    eps.write_text(eps.read_text().replace("[lrnnx_zoo]", f"[{group}]"))
    return root


@pytest.mark.parametrize("group", ["lrnnx_zoo.plugins", "lrnx_zoo"])
def test_an_entry_point_in_a_mistyped_group_is_named(tmp_path, monkeypatch, capsys, group):
    # It was ignored without a word: "unknown layer 'wg_ema'; available: fftconv, lru, s4, s4d.", and
    # `lrnnx-zoo plugins` did not list the installed distribution at all.
    with installed(_wrong_group(tmp_path / "site", group), monkeypatch):
        with pytest.raises(RegistryError) as err:
            lrnnx_zoo.create_layer("wg_ema", 4)
        msg = str(err.value)
        assert (f"tp-wronggroup declares the entry point wg = 'tp_wronggroup' in the group {group!r}" in msg
                and "found in the group 'lrnnx_zoo' ([project.entry-points.lrnnx_zoo]" in msg
                and "reinstall tp-wronggroup" in msg), msg
        assert main(["plugins"]) == 0
        out = capsys.readouterr().out
        assert f"note: tp-wronggroup declares the entry point wg = 'tp_wronggroup' in the group {group!r}" in out, out
        assert main(["plugins", "--json"]) == 0          # the JSON on stdout stays a document
        captured = capsys.readouterr()
        assert "tp-wronggroup" not in captured.out and "tp-wronggroup" in captured.err


def test_a_checkpoint_of_a_plugin_in_a_mistyped_group_names_the_group(tmp_path, monkeypatch):
    # "which is installed (tp-wronggroup) but not loaded: check its 'lrnnx_zoo' entry point" left the
    # author to find which part of it was wrong
    from lrnnx_zoo.registry import unloaded_plugin_remedy
    with installed(_wrong_group(tmp_path / "site", "lrnnx-zoo"), monkeypatch):
        said = unloaded_plugin_remedy(None, "tp-wronggroup")
    assert "in the group 'lrnnx-zoo', which lrnnx-zoo does not read" in said, said


def test_unrelated_groups_are_not_suspects(tmp_path, monkeypatch):
    with installed(_wrong_group(tmp_path / "site", "console_scripts"), monkeypatch):
        with pytest.raises(RegistryError) as err:
            lrnnx_zoo.create_layer("wg_ema", 4)
    assert "declares the entry point" not in str(err.value)


IMPORT_NAME_ERROR = '''
import lrnnx_zoo


def defaults():
    return undefined_name          # a NameError while the module is imported


DEFAULTS = defaults()
'''

HOOK_BAD_NAME = '''
import torch
import lrnnx_zoo


@lrnnx_zoo.hookimpl
def lrnnx_zoo_register_layers(registry):
    registry.add_layer("my layer", torch.nn.Identity)     # a space: refused inside registry.add_layer
'''


@pytest.mark.parametrize("source, line, function, said", [
    (IMPORT_NAME_ERROR, 6, "defaults", "could not import 'tp_whereerr' from tp-whereerr: NameError: name 'undefined_name'"),
    (HOOK_BAD_NAME, 8, "lrnnx_zoo_register_layers", "PluginError in a hook: layers names must be non-empty strings"),
])
def test_a_failing_plugin_names_the_line_of_its_own_that_raised(tmp_path, monkeypatch, source, line, function, said):
    # `lrnnx-zoo plugins` prints an error's first line, which said "NameError: name 'undefined_name' is
    # not defined" (no traceback was kept for a failed import) or the PluginError add_layer raised,
    # naming no file: the author imported the module by hand to find which line of theirs it was.
    root = make_distribution(tmp_path / "site", "tp-whereerr", {"tp_whereerr": source}, {"whereerr": "tp_whereerr"})
    with installed(root, monkeypatch):
        info = {p.name: p for p in lrnnx_zoo.list_plugins()}["whereerr"]
    first = info.error.splitlines()[0]
    assert first.startswith(said), first
    assert f"(raised at {root / 'tp_whereerr.py'}:{line}, in {function})" in first, first
    assert "pip uninstall tp-whereerr" in first, first          # the way out stays on the same line
    assert "Traceback" in info.error and "tp_whereerr.py" in info.error     # the frames, for --json


IMPORT_MULTILINE_ERROR = '''
import lrnnx_zoo


def check():
    raise ValueError("bad settings in tp_lines.toml:\\n  width: expected an int, got 'wide'\\n  depth: missing")


check()
'''

HOOK_MULTILINE_ERROR = '''
import lrnnx_zoo


@lrnnx_zoo.hookimpl
def lrnnx_zoo_register_layers(registry):
    raise RuntimeError("bad settings in tp_lines.toml:\\n  width: expected an int, got 'wide'\\n  depth: missing")
'''


@pytest.mark.parametrize("source, line, function, said", [
    (IMPORT_MULTILINE_ERROR, 6, "check", "could not import 'tp_lines' from tp-lines: ValueError: bad settings"),
    (HOOK_MULTILINE_ERROR, 7, "lrnnx_zoo_register_layers", "RuntimeError in a hook: bad settings"),
])
def test_a_multi_line_plugin_error_names_its_line_on_the_first_line(tmp_path, monkeypatch, capsys, source, line,
                                                                      function, said):
    # The place and the way out were appended to the message's last line ("  depth: missing (raised at
    # ...) -- to fix it ..."), which `lrnnx-zoo plugins` (an error's first line) does not show.
    root = make_distribution(tmp_path / "site", "tp-lines", {"tp_lines": source}, {"lines": "tp_lines"})
    with installed(root, monkeypatch):
        info = {p.name: p for p in lrnnx_zoo.list_plugins()}["lines"]
        assert main(["plugins"]) == 0
    lines = info.error.splitlines()
    where = f"(raised at {root / 'tp_lines.py'}:{line}, in {function})"
    assert lines[0].startswith(f"{said} in tp_lines.toml: {where} -- "), lines[0]
    assert "pip uninstall tp-lines" in lines[0], lines[0]
    assert lines[1:3] == ["  width: expected an int, got 'wide'", "  depth: missing"], lines   # every line, as raised
    assert info.error.count("(raised at ") == 1 and "Traceback" in lines[3], info.error
    assert f"error:        {lines[0]}\n" in capsys.readouterr().out


UNPRINTABLE_ERROR = '''
import lrnnx_zoo


class SettingsError(Exception):
    def __str__(self):
        return self.args[0].decode("ascii")      # a bytes message it cannot decode


@lrnnx_zoo.hookimpl
def lrnnx_zoo_register_layers(registry):
    raise SettingsError(b"bad width \\xff")
'''


@pytest.mark.parametrize("hook", [False, True], ids=["import", "hook"])
def test_a_plugin_error_whose_message_cannot_be_read_does_not_stop_the_others(tmp_path, monkeypatch, hook):
    # The error's text is read to describe the failure; an exception whose __str__ raises escaped
    # discovery (UnicodeDecodeError from the registry's first use): no layer could be built, the
    # built-in ones and the good plugin's neither, against "one broken plugin must not stop the rest".
    source = UNPRINTABLE_ERROR if hook else UNPRINTABLE_ERROR.replace("@lrnnx_zoo.hookimpl\n", "").replace(
        "def lrnnx_zoo_register_layers(registry):", "def check():") + "\n\ncheck()\n"
    root = make_distribution(tmp_path / "site", "tp-unprintable", {"tp_unprintable": source},
                             {"unprintable": "tp_unprintable"})
    make_distribution(root, "tp-good", {"tp_good": GOOD_PLUGIN.replace("{layer_name}", "good_layer")}, {"good": "tp_good"})
    with installed(root, monkeypatch):
        assert {"s4d", "good_layer"} <= set(lrnnx_zoo.list_layers())
        info = {p.name: p for p in lrnnx_zoo.list_plugins()}["unprintable"]
        assert main(["plugins"]) == 0
    first = info.error.splitlines()[0]
    assert "SettingsError" in first and "<exception str() failed>" in first, first
    assert "(raised at " in first and "pip uninstall tp-unprintable" in first, first


class _NoStateSize(torch.nn.Module):
    """A layer of an author's own that takes d_model only."""

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model


def test_a_layer_without_d_state_is_told_the_contract():
    # "create_layer('nods', ...): got an unexpected keyword argument 'd_state'. _NoStateSize takes
    # (self, d_model)" from every recipe (`lrnnx-zoo train ... --layer nods`) and from every check of the
    # contract kit, which said what was passed but not that every registered layer must take it.
    with layers_registered("tp_nods", nods=_NoStateSize):
        with pytest.raises(TypeError) as err:
            lrnnx_zoo.create_layer("nods", 4, d_state=8)
        msg = str(err.value)
        assert "unexpected keyword argument 'd_state'. _NoStateSize takes (self, d_model" in msg, msg
        assert "every registered layer takes d_state" in msg and "add d_state to _NoStateSize.__init__" in msg, msg
        with pytest.raises(TypeError) as err:                   # another argument: no word about d_state
            lrnnx_zoo.create_layer("nods", 4, decay=0.5)
        assert "every registered layer" not in str(err.value)


def test_an_entry_point_naming_a_hook_function_says_to_name_its_module(tmp_path, monkeypatch):
    # `ema = "tp_fnpoint:lrnnx_zoo_register_layers"` (as console_scripts are written) said "implements
    # none of the hooks ...: got <function lrnnx_zoo_register_layers at 0x...> (function)"
    root = make_distribution(tmp_path / "site", "tp-fnpoint", {"tp_fnpoint": GOOD_PLUGIN.replace("{layer_name}", "fn_ema")},
                             {"fnpoint": "tp_fnpoint:lrnnx_zoo_register_layers"})
    with installed(root, monkeypatch):
        info = {p.name: p for p in lrnnx_zoo.list_plugins()}["fnpoint"]
    first = info.error.splitlines()[0]
    assert first.startswith("is the function tp_fnpoint.lrnnx_zoo_register_layers, but a plugin is the module (or "
                            "object) that holds the hooks"), first
    assert "point the entry point at 'tp_fnpoint'" in first and "pip uninstall tp-fnpoint" in first, first


def test_a_float32_step_form_in_a_float64_layer_is_named_by_the_kit():
    # A form that stored its matrices as float32 (`.float()`, not lrnnx_zoo.step_forms.stored) steps a
    # float64 layer about 1e-8 off its forward (the input promotes the products to float64): the kit
    # said "expected step-by-step outputs equal to forward's within 1e-10 ...; got 1.17e-08", no more.
    from lrnnx_zoo.testing import ContractError, layer_checks
    from plugin_fixtures import example_ema_plugin

    with example_ema_plugin("tp_f32form_ema") as ema:
        class Float32Form(ema.EMA):
            def step_form(self):
                return super().step_form().float()

        with layers_registered("tp_f32form", f32form=Float32Form):
            check = {c.name: c for c in layer_checks("f32form", onnx=False)}["step_float64"]
            with pytest.raises(ContractError) as err:
                check()
            msg = str(err.value)
            assert "within 1e-10 of max|y| (L=256, torch.float64)" in msg, msg
            assert ("its step form, built for a torch.float64 cache, holds dA torch.float32, B torch.float32, "
                    "C torch.float32: store each matrix with lrnnx_zoo.step_forms.stored(t)") in msg, msg
        # the example's own form (lrnnx_zoo.step_forms.stored) passes the same check
        {c.name: c for c in layer_checks("ema", onnx=False)}["step_float64"]()


class _OwnStep(lrnnx_zoo.LRNN):
    """h_t = a h_{t-1} + x_t per channel, with streaming methods of its own that check nothing."""

    def __init__(self, d_model: int, d_state: int = 1):
        super().__init__(None)
        self.d_model = d_model
        self.a = torch.nn.Parameter(torch.full((d_model,), 0.9))

    def forward(self, x, integration_timesteps=None, lengths=None):
        from lrnnx_zoo.base import mask_padding
        x = self.prepare_input(x, lengths)
        h, ys = x.new_zeros(x.shape[0], self.d_model), []
        for t in range(x.shape[1]):
            h = self.a * h + x[:, t]
            ys.append(h)
        return mask_padding(torch.stack(ys, 1) if ys else torch.zeros_like(x), lengths)

    def allocate_inference_cache(self, batch_size, max_seqlen=1, dtype=None):
        return {"h": torch.zeros(batch_size, self.d_model, dtype=dtype or self.a.dtype)}

    def step(self, x, cache):
        cache["h"] = self.a * cache["h"] + x
        return cache["h"], cache


@pytest.mark.parametrize("check, must", [
    ("bad_input", "make the step refuse an x_t of another batch or width with a ValueError naming the shape it "
                  "expects, (batch=2, d_model=16)"),
    ("stale_cache", "make the step keep lrnnx_zoo.base.weights_and_versions(self) in the cache it makes"),
])
def test_a_step_of_the_layers_own_is_told_how_to_pass_the_kit(check, must):
    # The kit held a step of a plugin's own to "expected a step on a cache made before an optimizer
    # step to raise RuntimeError matching 'weights changed since this cache was made.*allocate_inference_cache';
    # got no error", which the README's list of streaming methods did not state, nor how to do it.
    from lrnnx_zoo.testing import ContractError, layer_checks
    with layers_registered("tp_ownstep", ownstep=_OwnStep):
        run = {c.name: c for c in layer_checks("ownstep", onnx=False)}[check]
        with pytest.raises(ContractError) as err:
            run()
    msg = str(err.value)
    assert "_OwnStep.step is the layer's own: subclass lrnnx_zoo.LTI_LRNN, whose allocate_inference_cache" in msg, msg
    assert must in msg, msg


class _OwnStepDoneRight(_OwnStep):
    """_OwnStep with the two refusals done as the kit's hint and the README say."""

    def allocate_inference_cache(self, batch_size, max_seqlen=1, dtype=None):
        from lrnnx_zoo.base import weights_and_versions
        return {**super().allocate_inference_cache(batch_size, max_seqlen, dtype), "weights": weights_and_versions(self)}

    def step(self, x, cache):
        from lrnnx_zoo.base import unchanged
        if not unchanged(cache["weights"]):
            raise RuntimeError("_OwnStepDoneRight.step: the layer's weights changed since this cache was made: call "
                               "allocate_inference_cache again")
        if x.shape != cache["h"].shape:
            raise ValueError(f"expected x of shape (batch={cache['h'].shape[0]}, d_model={self.d_model}), "
                             f"got {tuple(x.shape)}")
        return super().step(x, cache)


def test_the_readme_recipe_for_a_step_of_ones_own_passes_those_checks():
    from lrnnx_zoo.testing import layer_checks
    with layers_registered("tp_ownstep_right", ownstep_right=_OwnStepDoneRight):
        for check in layer_checks("ownstep_right", onnx=False):
            if check.name in ("bad_input", "stale_cache"):
                check()
