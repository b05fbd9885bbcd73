"""lrnnx_zoo.runtime: the allocator setting is opt-in and safe to repeat."""

import subprocess
import sys


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
