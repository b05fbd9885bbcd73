"""lrnnx_zoo.runtime: the allocator setting is opt-in and safe to repeat; what a fresh process
imports and pays on first use."""

import subprocess
import sys


def _child_output(code: str) -> str:
    """stdout of ``code`` run in a fresh interpreter (what it imports must not depend on this session)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_tune_allocator_applies_on_linux_and_is_idempotent():
    # in a child process: the setting is process-wide and must not leak into the test session
    code = ("import sys, lrnnx_zoo; from lrnnx_zoo.runtime import tune_allocator; "
            "a = tune_allocator(); b = tune_allocator(); "
            "import torch; x = torch.randn(4096, 4096); y = (x @ x).sum(); "
            "print(a, b, sys.platform)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1]
    if out[2].startswith("linux"):
        assert out[0] == "True"


def test_importing_the_package_does_not_tune_the_allocator():
    code = ("import lrnnx_zoo, lrnnx_zoo.export, lrnnx_zoo.runtime as rt; lrnnx_zoo.list_layers(); "
            "print(rt._applied)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_cli_called_in_process_leaves_the_allocator_and_its_own_process_tunes_it():
    # lrnnx_zoo.cli.main tuned the allocator for good (freed memory never returned) in an application
    # that called it in-process; the command and `python -m lrnnx_zoo`, processes of their own, still do
    code = ("import lrnnx_zoo.cli, lrnnx_zoo.runtime as rt\n"
            "status = lrnnx_zoo.cli.main(['layers'])\n"
            "print(status, rt._applied)")
    assert _child_output(code).splitlines()[-1] == "0 False"
    if sys.platform.startswith("linux"):
        code = ("import sys, lrnnx_zoo.cli, lrnnx_zoo.runtime as rt\n"
                "sys.argv = ['lrnnx-zoo', 'recipes']\n"
                "status = lrnnx_zoo.cli.console_main()\n"
                "print(status, rt._applied)")
        assert _child_output(code).splitlines()[-1] == "0 True"
        code = ("import runpy, sys, lrnnx_zoo.runtime as rt\n"        # python -m lrnnx_zoo.cli recipes
                "sys.argv = ['lrnnx_zoo.cli', 'recipes']\n"
                "try:\n"
                "    runpy.run_module('lrnnx_zoo.cli', run_name='__main__', alter_sys=True)\n"
                "except SystemExit as exc:\n"
                "    print(exc.code, rt._applied)")
        assert _child_output(code).splitlines()[-1] == "0 True"
        from importlib.metadata import entry_points
        scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
        assert scripts["lrnnx-zoo"] == "lrnnx_zoo.cli:console_main"


def test_a_first_forward_step_and_prefill_import_no_sympy():
    # torch.broadcast_shapes imports torch._refs and sympy on first use: the shipped forecaster's
    # first forward took 650 ms (20 ms of it compute). lrnnx_zoo.shapes.broadcast_shape replaces it.
    code = ("import sys, torch, lrnnx_zoo\n"
            "m = lrnnx_zoo.from_pretrained('forecast-sunspots-s4d').eval()\n"
            "x = torch.randn(2, 16, 1)\n"
            "with torch.no_grad():\n"
            "    m(x); y, c = m.prefill(x); m.step(x[:, 0], c)\n"
            "for fam in lrnnx_zoo.list_layers():\n"
            "    layer = lrnnx_zoo.create_layer(fam, 8, d_state=4)\n"
            "    layer(torch.randn(2, 16, 8)).sum().backward()\n"
            "print('sympy' in sys.modules)\n")
    assert _child_output(code) == "False"


def test_broadcast_shape_follows_torch():
    import itertools
    import pytest
    import torch
    from lrnnx_zoo.shapes import broadcast_shape
    sizes = [(), (1,), (3,), (2, 1), (1, 3), (2, 3), (4, 1, 3), (0,), (1, 0)]
    for a, b in itertools.product(sizes, repeat=2):
        try:
            want = torch.broadcast_shapes(a, b)
        except RuntimeError:
            with pytest.raises(ValueError, match="do not broadcast"):
                broadcast_shape(a, b)
        else:
            assert broadcast_shape(a, b) == want, (a, b)
    assert broadcast_shape(torch.Size([5, 1]), (7,), ()) == (5, 7) and broadcast_shape() == ()


def test_the_command_line_and_training_import_no_onnx():
    # building the CLI's parser imported onnx through lrnnx_zoo.export (1.3 s of every command,
    # `lrnnx-zoo models` included); the export names now load on first use.
    code = ("import sys, lrnnx_zoo.cli, lrnnx_zoo.export as e\n"
            "lrnnx_zoo.cli.build_parser()\n"
            "before = [m for m in ('onnx', 'onnxruntime', 'onnxscript') if m in sys.modules]\n"
            "from lrnnx_zoo.export import to_onnx, OnnxStreamer\n"
            "print(before, 'onnx' in sys.modules, callable(to_onnx), set(e.__all__) <= set(dir(e)))\n")
    assert _child_output(code) == "[] True True True"
