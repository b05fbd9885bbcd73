"""What an installed lrnnx-zoo relies on: the files its wheel ships, and the oldest releases of its
dependencies that pyproject.toml admits (each fix here was found running the suite against them)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import onnx
import pluggy
import pytest
import torch

import lrnnx_zoo
from plugin_fixtures import installed, make_distribution


ROOT = Path(__file__).resolve().parents[1]


# -- what the wheel holds ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def setuptools_config() -> Dict:
    tomllib = pytest.importorskip("tomllib")        # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]


def _folder(package: str, package_dir: Dict[str, str]) -> Path:
    """The source folder of a dotted package name under [tool.setuptools] package-dir."""
    parts = package.split(".")
    for i in range(len(parts), 0, -1):
        mapped = package_dir.get(".".join(parts[:i]))
        if mapped is not None:
            return ROOT / mapped / Path(*parts[i:])
    return ROOT / Path(*parts)


def _files(folder: Path) -> List[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts]


def test_every_package_folder_is_listed(setuptools_config):
    # An editable install imports any folder; a wheel holds only the listed packages, and the CLI
    # skips a subcommand whose module is missing, so a forgotten one vanished without an error.
    packages, package_dir = setuptools_config["packages"], setuptools_config["package-dir"]
    for package in packages:
        folder = _folder(package, package_dir)
        assert (folder / "__init__.py").is_file(), f"{package} is listed but {folder} has no __init__.py"
        for init in folder.rglob("__init__.py"):
            name = ".".join([package, *init.parent.relative_to(folder).parts])
            assert name in packages, f"{init.parent} is a package but [tool.setuptools] packages lacks {name!r}"


def test_every_data_file_matches_its_package_data_globs(setuptools_config):
    # Files that are not Python reach the wheel only through [tool.setuptools.package-data].
    packages, package_dir = setuptools_config["packages"], setuptools_config["package-dir"]
    globs = setuptools_config.get("package-data", {})
    folders = {package: _folder(package, package_dir) for package in packages}
    for package, folder in folders.items():
        inner = [f for p, f in folders.items() if p.startswith(package + ".")]   # their files are their own
        data = {f for f in _files(folder) if f.suffix not in (".py", ".pyc")
                and not any(f.is_relative_to(sub) for sub in inner)}
        shipped = {f for pattern in globs.get(package, []) for f in folder.glob(pattern)}
        missing = sorted(str(f.relative_to(ROOT)) for f in data - shipped)
        assert not missing, f"not in the wheel (no package-data glob of {package!r} matches): {missing}"
    # PEP 561: without the marker a type checker reads every lrnnx_zoo name as Any (an audit)
    assert (_folder("lrnnx_zoo", package_dir) / "py.typed").is_file()
    names = set(lrnnx_zoo.list_models())
    assert names and all((_folder("lrnnx_zoo.checkpoints", package_dir) / n / "model.safetensors").is_file()
                         for n in names)


# -- the oldest dependency releases the floors admit ---------------------------------------------
def test_an_entry_point_naming_none_is_reported_without_registering_none(tmp_path, monkeypatch):
    # pluggy 1.3-1.6 take register(None, name) as blocking that name; unregistering the None plugin
    # then failed an assertion, so with one such third-party entry point reload_plugins() raised
    # "AssertionError: one of name or plugin needs to be specified" and no family loaded at all.
    # pluggy 1.7 ignores a None plugin, so the spy stands in for the older releases.
    registered = []
    real_register = pluggy.PluginManager.register

    def register(self, plugin, name=None):
        registered.append((name, plugin))
        return real_register(self, plugin, name)

    monkeypatch.setattr(pluggy.PluginManager, "register", register)
    root = tmp_path / "site"
    make_distribution(root, "tp-none", {"tp_none": "PLUGIN = None\n"}, {"nothing": "tp_none:PLUGIN"})
    with installed(root, monkeypatch):
        assert {"lru", "s4d"} <= set(lrnnx_zoo.list_layers())
        error = {p.name: p for p in lrnnx_zoo.list_plugins()}["nothing"].error or ""
        assert re.search(r"implements none of the hooks .*got None", error), error
        assert [name for name, plugin in registered if plugin is None] == []


def _rewrite_gemms_as_old_onnxruntime_did(model: onnx.ModelProto) -> None:
    """What onnxruntime's quantize_dynamic before 1.32 did first: each Gemm with transB=1 reads its
    weight transposed in place, under the same name, and the Gemm drops transB."""
    weights = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        trans_b = [a for a in node.attribute if a.name == "transB" and a.i == 1]
        if node.op_type == "Gemm" and trans_b and node.input[1] in weights:
            w = weights[node.input[1]]
            w.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(onnx.numpy_helper.to_array(w).T), w.name))
            trans_b[0].i = 0


def test_int8_quantizer_gets_a_graph_whose_gemm_weights_may_be_rewritten_in_place(tmp_path, monkeypatch):
    # int8 export failed with every onnxruntime from 1.18 (the floor) to 1.31: "[ShapeInferenceError]
    # Inferred shape and existing shape differ in dimension 0: (1) vs (64)", because the graph kept the
    # exporter's value_info of each weight, which the quantizer's in-place transpose made stale.
    from onnxruntime import quantization
    from lrnnx_zoo.export import to_onnx

    given = []
    real = quantization.quantize_dynamic

    def spy(model_input, *args, **kwargs):
        copy = onnx.ModelProto()
        copy.CopyFrom(model_input if isinstance(model_input, onnx.ModelProto) else onnx.load(str(model_input)))
        given.append(copy)
        return real(model_input, *args, **kwargs)

    monkeypatch.setattr(quantization, "quantize_dynamic", spy)
    torch.manual_seed(0)
    cfg = lrnnx_zoo.ModelConfig(layer="s4d", d_input=3, d_output=4, d_model=8, n_layers=1,
                                layer_kwargs={"d_state": 4})
    to_onnx(lrnnx_zoo.SequenceModel(cfg).eval(), tmp_path / "q.onnx", quantize="int8")
    model = given[0]
    assert any(n.op_type == "Gemm" for n in model.graph.node)      # else the check below checks nothing
    _rewrite_gemms_as_old_onnxruntime_did(model)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)


# -- a plain install, without the [data] extra ---------------------------------------------------
@pytest.fixture
def no_sklearn(monkeypatch):
    """scikit-learn not installed, as after a plain `pip install lrnnx-zoo` (it is the [data] extra)."""
    monkeypatch.setitem(sys.modules, "sklearn", None)     # a None entry makes its import raise ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)


def test_evaluating_the_digits_without_scikit_learn_says_what_to_install(no_sklearn, capsys):
    # It printed a 30-line traceback ending in the ImportError (the install hint was in its last line).
    from lrnnx_zoo.cli import main as cli_main
    assert cli_main(["evaluate", "digits-s4d"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lrnnx-zoo evaluate: ") and "pip install 'lrnnx-zoo[data]'" in err
    assert "Traceback" not in err


def test_int8_export_of_the_digits_without_scikit_learn_says_what_to_install(no_sklearn, tmp_path, capsys):
    # The int8 report measures the accuracy change on the checkpoint's test split, which the digits
    # data needs scikit-learn for: after the whole export the command ended in a traceback.
    # The split is needed whatever graph comes before it: a 64-step validation (the digits' own length,
    # not 4096 steps streamed 10 times) and the TorchScript-based exporter (opset 17) take ~2 s of its ~20.
    from lrnnx_zoo.cli import main as cli_main
    argv = ["export", "digits-s4d", "--format", "onnx", "--quantize", "int8", "--out", str(tmp_path / "q"),
            "--latency-steps", "0", "--validation-length", "64", "--opset", "17"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lrnnx-zoo export: ") and "pip install 'lrnnx-zoo[data]'" in err
    assert not (tmp_path / "q").exists()


# -- the README's test command ------------------------------------------------------------------
@pytest.mark.parametrize("args, runs", [
    (["-k", "export"], "-n auto tests -k export"),                  # ran on one core, pytest's own paths
    (["--ignore", "export", "-q"], "-n auto tests --ignore export -q"),
    (["export", "-q"], "export -q"),                                # a path given: that path alone
    (["-n", "1"], "tests -n 1"),
])
def test_the_test_command_tells_an_options_value_from_a_path(tmp_path, args, runs):
    # scripts/test.sh takes a path argument as what to run (on one core) instead of the whole suite; the
    # value of -k (a word that named a folder of the repo: -k export, -k plugins) was taken for one
    import shutil
    import subprocess
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "test.sh", tmp_path / "scripts" / "test.sh")
    (tmp_path / "scripts" / "env.sh").write_text("true\n")           # the venv is not made here
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\nshift 2\nprintf "%s " "$@"\n')      # "-m pytest ARGS" -> ARGS
    python.chmod(0o755)
    (tmp_path / "export").mkdir()
    (tmp_path / "tests").mkdir()
    out = subprocess.run(["bash", "scripts/test.sh", *args], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == runs


# -- what the source distribution holds ---------------------------------------------------------
def test_the_sdist_holds_every_file_the_readme_and_docs_link_to(tmp_path):
    # README.md was split into docs/ pages and links to examples/ and scripts/: an sdist without them
    # (setuptools takes only the packages, README and tests unless MANIFEST.in says more) sent its
    # reader to pages that were not there.
    import os
    import shutil
    import tarfile
    build_meta = pytest.importorskip("setuptools.build_meta")
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info",
                                                                "build", "dist", ".pytest_cache", "out"))
    out = tmp_path / "dist"
    cwd = Path.cwd()
    try:
        os.chdir(source)       # build_meta builds the project in the working directory
        name = build_meta.build_sdist(str(out))
    finally:
        os.chdir(cwd)
    with tarfile.open(out / name) as sdist:
        held = {Path(*Path(member).parts[1:]).as_posix() for member in sdist.getnames()}
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = set()
    for page in pages:
        prose = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", prose):
            if re.match(r"[a-z][\w+.-]*:", target):                     # https:, mailto: ...
                continue
            path = (page.parent / target).resolve().relative_to(ROOT).as_posix()
            if not any(h == path or h.startswith(path.rstrip("/") + "/") for h in held):
                missing.add(f"{page.relative_to(ROOT)} -> {target}")
    for needed in ("docs/semantics.md", "examples/ema_plugin/pyproject.toml", "scripts/demo.sh", "scripts/test.sh",
                   "benchmarks/bench_layers.py"):
        if needed not in held:
            missing.add(needed)
    assert not [h for h in held if "__pycache__" in h or h.endswith(".pyc")]
    assert sorted(missing) == [], f"the sdist lacks what README.md / docs/ link to: {sorted(missing)}"
