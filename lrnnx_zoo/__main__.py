"""``python -m lrnnx_zoo``: the ``lrnnx-zoo`` command line, run by a given interpreter."""

import sys

from .cli import console_main

sys.exit(console_main())
