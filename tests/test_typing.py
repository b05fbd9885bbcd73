"""What a user's type checker reads from lrnnx_zoo's hints (the package ships py.typed, so mypy and
pyright take them as the truth), and run-time behaviour where a hint admits more than the code took.

The mypy check type-checks tests/typing_user_script.py (the README's guides as a user writes them) with
``mypy --strict`` against this checkout. Its first run builds mypy's cache of torch's hints (~20 s on
two cores); the cache is kept in the system's temporary folder, keyed by mypy's version and the user, so
later runs take a few seconds. Runs that share it (two checkouts' suites on one machine) take turns
under a lock: mypy keeps it in SQLite, and a run that met another one's write failed with "database is
locked" (python/mypy#21136)."""

from __future__ import annotations

import contextlib
import importlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

import lrnnx_zoo

HERE = Path(__file__).resolve().parent
EMA_EXAMPLE = HERE.parent / "examples" / "ema_plugin" / "lrnnx_ema.py"


def _package_tree(tmp_path: Path) -> Path:
    """A folder holding ``lrnnx_zoo`` laid out as a wheel installs it (plugins/ and export/ inside it),
    made of links to this checkout. An editable install maps them through an import hook that type
    checkers do not run, so they would not see the package at all."""
    root = tmp_path / "packages" / "lrnnx_zoo"
    root.mkdir(parents=True)
    top = Path(lrnnx_zoo.__file__).resolve().parent
    for entry in top.iterdir():
        if entry.name != "__pycache__":
            (root / entry.name).symlink_to(entry)
    for sub in ("plugins", "export"):        # [tool.setuptools] package-dir maps both outside lrnnx_zoo/
        folder = Path(importlib.import_module(f"lrnnx_zoo.{sub}").__file__).resolve().parent
        if not (root / sub).exists():
            (root / sub).symlink_to(folder)
    assert (root / "py.typed").is_file()
    return root.parent


@contextlib.contextmanager
def _mypy_cache(tmp_path: Path, version: str) -> Iterator[Path]:
    """The shared cache folder, held under an exclusive lock for the run. A folder of that name this
    user does not own (or a link) is not used: this run then builds its own cache in ``tmp_path``."""
    cache = Path(tempfile.gettempdir()) / f"lrnnx_zoo_mypy_cache_{version}_{os.getuid()}"
    try:
        cache.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(cache)
        shared = stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
    except OSError:
        shared = False
    if not shared:
        yield tmp_path / "mypy_cache"
        return
    try:
        import fcntl
    except ImportError:                      # no flock (Windows): a cache of this run's own
        yield tmp_path / "mypy_cache"
        return
    with open(cache / "lrnnx_zoo_tests.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)       # waits for another run's mypy; released on close
        yield cache


def test_readme_guides_type_check_under_mypy_strict(tmp_path, monkeypatch):
    api = pytest.importorskip("mypy.api", reason="mypy is not installed (pip install -e '.[test]' brings it)")
    import mypy.version
    monkeypatch.setenv("MYPYPATH", str(_package_tree(tmp_path)))
    # silent: lrnnx_zoo's own bodies are checked for the types they export, their errors not reported
    # (as for an installed package); only the user's script has to be clean
    with _mypy_cache(tmp_path, mypy.version.__version__) as cache:
        # with the README's plugin module, which the script imports and a strict user copies, and the
        # plugin's test of the contract kit (parametrize_with_checks must be a typed decorator)
        out, err, status = api.run([str(HERE / "typing_user_script.py"), str(EMA_EXAMPLE),
                                    str(EMA_EXAMPLE.with_name("test_lrnnx_ema.py")), "--strict",
                                    "--follow-imports=silent",
                                    "--cache-dir", str(cache), "--show-error-codes", "--no-color-output"])
    assert status == 0, f"mypy --strict on tests/typing_user_script.py and {EMA_EXAMPLE.name}:\n{out}{err}"


# -- run time against the hints ---------------------------------------------------------------------
def test_a_model_built_in_code_has_checkpoint_info_none():
    # the hint says Optional[dict]; such a model raised AttributeError on reading it
    model = lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer="s4d", d_input=1, d_output=2, d_model=4,
                                                          n_layers=1, layer_kwargs={"d_state": 2}))
    assert model.checkpoint_info is None


@pytest.mark.parametrize("threads", [2.0, True, -1, "1"])
def test_onnx_streamer_refuses_a_thread_count_that_is_not_an_int(tmp_path, threads):
    # 2.0 failed inside onnxruntime, where the streamer said the .onnx file could not be loaded (naming
    # its opset and a newer onnxruntime as the fix); True and -1 were taken
    from lrnnx_zoo.export import OnnxStreamer
    path = tmp_path / "any.onnx"
    path.write_bytes(b"never read: the thread count is checked first")
    with pytest.raises(ValueError, match=r"intra_op_threads must be an int >= 0 .* got " + repr(threads)):
        OnnxStreamer(path, intra_op_threads=threads)


def test_onnx_streamer_takes_one_provider_name_as_a_str(tmp_path, monkeypatch):
    # Optional[Sequence[str]] admits a str; list() of it asked ONNX Runtime for providers 'C', 'P', 'U', ...
    import onnxruntime as ort
    from lrnnx_zoo.export import OnnxStreamer
    path = tmp_path / "any.onnx"
    path.write_bytes(b"not loaded: the session is a stand-in")
    asked = []

    def session(path_: str, options: object, providers: object) -> None:
        asked.append(providers)
        raise RuntimeError("stand-in session")

    monkeypatch.setattr(ort, "InferenceSession", session)
    for given in ("CPUExecutionProvider", ["CPUExecutionProvider"], ("CPUExecutionProvider",), None):
        with pytest.raises(ValueError, match="stand-in session"):
            OnnxStreamer(path, providers=given)
    assert [list(p) for p in asked] == [["CPUExecutionProvider"]] * 4


@pytest.mark.parametrize("L", [True, 2.0, -1, "3"])
def test_lru_compute_kernel_refuses_a_length_that_is_not_an_int(L):
    # annotated int; True and 2.0 failed inside torch ("reshape() takes 1 positional argument but 2 were
    # given"), -1 as "upper bound and lower bound inconsistent with step sign", as the other families' do not
    from lrnnx_zoo.plugins.lru import LRU
    with pytest.raises(ValueError, match=r"LRU.compute_kernel needs L to be an integer >= 0 .* got " + repr(L)):
        LRU(4, 2).compute_kernel(L)


def test_lru_compute_kernel_takes_numpy_and_zero_lengths():
    import numpy as np
    import torch
    from lrnnx_zoo.plugins.lru import LRU
    layer = LRU(4, 2)
    powers, _ = layer.compute_kernel(np.int64(3))
    assert powers.shape == (3, 2) and torch.equal(powers, layer.compute_kernel(3)[0])
    assert layer.compute_kernel(0)[0].shape == (0, 2)
