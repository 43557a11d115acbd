"""The Triton kernels on the CPU under the Triton interpreter.

``TRITON_INTERPRET`` is read when Triton is imported, so it is set here, before any test module
imports Triton, and this folder runs in its own pytest process:
``TRITON_INTERPRET=1 python -m pytest tests/triton_interpret``.
"""

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError(
        "tests/triton_interpret: triton was imported before TRITON_INTERPRET=1 could be set; run "
        "this folder in its own process: TRITON_INTERPRET=1 python -m pytest tests/triton_interpret"
    )
os.environ["TRITON_INTERPRET"] = "1"
