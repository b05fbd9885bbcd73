"""lrnnx_zoo.testing, the contract kit a plugin author runs from an installed lrnnx-zoo: a broken layer
is reported with the layer, the check and what was expected vs what came back.

The broken layers are the README's example EMA (examples/ema_plugin) with one defect each, registered
in code as a plugin would register them; tiny sizes (d_model=4, d_state=2), and only the check each
breaks runs, except where check_layer's report of several failures is the point.
"""

from __future__ import annotations

import ast
import importlib
import pickle
import sys
from pathlib import Path
from typing import Dict, Iterable, Iterator, List

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo.step_forms import ChannelDenseStepForm
from lrnnx_zoo.testing import CHECKS, ContractError, check_layer, layer_checks, parametrize_with_checks
from plugin_fixtures import example_ema_plugin, layers_registered

pytestmark = pytest.mark.usefixtures("one_torch_thread")

H, N = 4, 2


@pytest.fixture(scope="module")
def broken() -> Iterator[Dict[str, type]]:
    """The example EMA with one defect each, registered as kit_<defect> (plus the example as "ema")."""
    with example_ema_plugin("lrnnx_ema_kit") as ema:
        class WrongShape(ema.EMA):
            def forward(self, x, integration_timesteps=None, lengths=None):
                return super().forward(x, integration_timesteps, lengths)[..., 1:]

        class NonCausal(ema.EMA):            # reads the sequence backwards
            def forward(self, x, integration_timesteps=None, lengths=None):
                return super().forward(x.flip(1), integration_timesteps, lengths).flip(1)

        class StepDisagrees(ema.EMA):        # its step form's decay is a^2, forward's a
            def step_form(self):
                a, b, c = self.discretize(torch.float64)
                return ChannelDenseStepForm((a * a)[:, None, None], b[:, None], c[None, :, None])

        class IgnoresLengths(ema.EMA):       # never hands lengths on: the padding's outputs stay
            def forward(self, x, integration_timesteps=None, lengths=None):
                return super().forward(x, integration_timesteps)

        class PlainCoefficient(ema.EMA):     # a gain kept as a plain tensor attribute
            def __init__(self, d_model, d_state=1, init="flat"):
                super().__init__(d_model, d_state, init)
                self.gain = torch.ones(d_model)

            def forward(self, x, integration_timesteps=None, lengths=None):
                return super().forward(x, integration_timesteps, lengths) * self.gain

        class FixedDecay(ema.EMA):           # not broken: fixed coefficients, a buffer and no parameters
            def __init__(self, d_model, d_state=1, init="flat"):
                super().__init__(d_model, d_state, init)
                logit = self.logit.detach().clone()
                del self.logit
                self.register_buffer("logit", logit)

        layers = {"kit_wrong_shape": WrongShape, "kit_non_causal": NonCausal, "kit_step_disagrees": StepDisagrees,
                  "kit_ignores_lengths": IgnoresLengths, "kit_plain_coefficient": PlainCoefficient,
                  "kit_fixed_decay": FixedDecay}
        with layers_registered("broken_kit", **layers):
            yield layers


BROKEN = {
    "kit_wrong_shape": ("shapes", r"expected forward\(x \(3, 50, 4\) float32\) to return a float32 Tensor "
                                  r"\(3, 50, 4\); got \(3, 50, 3\) torch.float32"),
    "kit_non_causal": ("causality", r"expected y\[:, :40\] unchanged \(within 1e-5\) by a change to x\[:, 40\] "
                                    r"\(a causal layer\); got a change of \d"),
    "kit_step_disagrees": ("step_float32", r"expected step-by-step outputs equal to forward's within 0.0001 of "
                                           r"max\|y\| \(L=1024, torch.float32\); got 0.\d"),
    "kit_ignores_lengths": ("lengths", r"expected zeros past each length \(y\[0, 30:\]\); got max\|y\| \d"),
    "kit_plain_coefficient": ("dtype_conversion", r"expected layer.to\(torch.float64\) to reach every coefficient; "
                                                  r"got left behind: attribute 'gain' of PlainCoefficient "
                                                  r"\(torch.float32\), a plain tensor \(make it an nn.Parameter, "
                                                  r"or a buffer if fixed\)$"),
}


def _check(name: str, check: str):
    (found,) = [c for c in layer_checks(name, H, N, onnx=False) if c.name == check]
    return found


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_layer_is_reported_with_its_check_and_what_came_back(broken, name):
    check, message = BROKEN[name]
    with pytest.raises(ContractError, match=rf"^layer '{name}' fails the contract check '{check}': {message}") as info:
        _check(name, check)()
    assert (info.value.layer, info.value.check, info.value.failures) == (name, check, (info.value,))
    assert isinstance(info.value, AssertionError)       # pytest shows it as a failed assertion


def test_the_example_layer_passes_the_checks_the_broken_ones_fail(broken):
    # the defects, not the checks, fail above: the example itself passes each of those checks
    for check, _ in BROKEN.values():
        _check("ema", check)()


def test_check_layer_returns_the_checks_a_passing_layer_passed(broken):
    # It returned None: `python -c "...; check_layer('ema')"` or a notebook cell showed nothing for a
    # layer that passed, as for one that was never checked.
    from lrnnx_zoo.testing import layer_checks
    names = check_layer("ema", H, N, onnx=False)
    assert names == [c.name for c in layer_checks("ema", H, N, onnx=False)] and len(names) >= 15


def test_check_layer_runs_every_check_and_reports_each_failure(broken):
    # IgnoresLengths breaks three checks (its lengths never reach prepare_input, which refuses bad
    # ones): each is named, with its own message
    with pytest.raises(ContractError) as info:
        check_layer("kit_ignores_lengths", H, N, onnx=False)
    err = info.value
    failed = ["lengths", "padding", "bad_input"]
    assert [f.check for f in err.failures] == failed and err.check == ", ".join(failed)
    assert "- lengths: expected zeros past each length" in str(err)
    assert "- padding: expected zeros past the length 9 whatever the padding holds" in str(err)
    assert ("- bad_input: expected lengths=[5.0, 7.5] to raise TypeError matching 'lengths must hold integers'"
            in str(err))
    again = pickle.loads(pickle.dumps(err))             # pytest-xdist and multiprocessing send it across
    assert str(again) == str(err) and [f.check for f in again.failures] == failed


def test_an_error_inside_the_layer_names_the_check_and_the_error(broken):
    with pytest.raises(ContractError, match=r"^layer 'kit_wrong_shape' fails the contract check 'step_float32': "
                                            r"it raised \w+Error: "):
        _check("kit_wrong_shape", "step_float32")()


def test_a_layer_that_cannot_be_built_gives_one_create_check():
    (check,) = layer_checks("lru", H, N, no_such_option=1)
    with pytest.raises(ContractError, match=r"^layer 'lru' fails the contract check 'create': expected "
                                            r"create_layer\('lru', 4, d_state=2, \*\*\{'no_such_option': 1\}\) to "
                                            r"build the layer; it raised TypeError"):
        check()


def test_checks_leave_the_random_state_as_it_was(broken):
    before = torch.random.get_rng_state()
    _check("ema", "causality")()
    assert torch.equal(torch.random.get_rng_state(), before)


def test_listing_the_checks_leaves_the_random_state_as_it_was():
    # layer_checks builds a probe of the layer (is it bidirectional, time-invariant?): the LRU's random
    # initialisation drew from the caller's stream, at a plugin suite's collection or in check_layer
    before = torch.random.get_rng_state()
    layer_checks("lru", H, N, onnx=False)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_a_layer_of_fixed_coefficients_passes_the_stale_cache_check(broken):
    # the gradients check allows a layer without parameters; the stale-cache check built an optimiser over
    # none ("optimizer got an empty parameter list") and edited next(parameters()) (StopIteration)
    assert not list(lrnnx_zoo.create_layer("kit_fixed_decay", H, d_state=N).parameters())
    _check("kit_fixed_decay", "stale_cache")()
    _check("kit_fixed_decay", "gradients")()


def test_onnx_is_optional_and_bidirectional_layers_skip_streaming_checks():
    names = {c.name for c in layer_checks("s4", H, N)}
    assert names == set(CHECKS) and "onnx" not in {c.name for c in layer_checks("s4", H, N, onnx=False)}
    two_way = {c.name for c in layer_checks("s4", H, N, bidirectional=True)}
    assert two_way == {n for n, c in CHECKS.items() if not c.streaming} and "causality" not in two_way


def test_parametrize_with_checks_gives_one_case_per_check():
    mark = parametrize_with_checks(["lru", "s4d"], H, N, onnx=False)
    argname, params = mark.args
    assert argname == "check"
    assert [p.id for p in params] == [f"{n}-{c}" for n in ("lru", "s4d") for c in CHECKS if c != "onnx"]


def test_importing_the_kit_needs_no_pytest(monkeypatch):
    # a plugin's check_layer call outside any test runner: the module imports again with pytest made
    # unimportable (None in sys.modules), in this process (a fresh interpreter cost 1.5 s of torch import)
    import lrnnx_zoo.testing as kit
    for name in ("pytest", "_pytest"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "lrnnx_zoo.testing")
    monkeypatch.setattr(lrnnx_zoo, "testing", kit)         # restored after: the import below rebinds it
    fresh = importlib.import_module("lrnnx_zoo.testing")
    assert fresh is not kit and callable(fresh.check_layer)
    with pytest.raises(ImportError):
        fresh.parametrize_with_checks("lru")                  # the one function that needs pytest
    # Here the modules the kit imports are this process's, imported already: one importing pytest at its
    # top would go unseen, where the fresh interpreter this replaced saw it. So no module of the installed
    # package imports pytest when it is imported (a function's or a TYPE_CHECKING import aside).
    roots = {Path(importlib.import_module(f"lrnnx_zoo.{sub}").__file__).parent for sub in ("plugins", "export")}
    found = [f"{path.name}:{line}" for root in roots | {Path(lrnnx_zoo.__file__).parent}
             for path in sorted(root.rglob("*.py")) for line in _pytest_imports_on_import(path)]
    assert found == [], f"modules importing pytest when imported: {found}"


def _pytest_imports_on_import(path: Path) -> List[int]:
    """Line numbers of the imports of pytest (or _pytest) that run when ``path`` is imported: at module
    level or in a class body, not in a function nor under ``if TYPE_CHECKING:``."""
    def runs(nodes: Iterable[ast.AST]) -> Iterator[int]:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
                yield from runs(node.orelse)
                continue
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in ("pytest", "_pytest") for n in names):
                yield node.lineno
            yield from runs(ast.iter_child_nodes(node))
    return list(runs(ast.parse(path.read_text(encoding="utf-8")).body))
