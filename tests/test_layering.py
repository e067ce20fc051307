"""The package's layers: the model layer (asrkd.models) does not depend on training code."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import importlib, pkgutil, sys
import asrkd.models
for info in pkgutil.iter_modules(asrkd.models.__path__):
    importlib.import_module("asrkd.models." + info.name)
print(sorted(m for m in sys.modules if m.startswith(("asrkd.training", "asrkd.modelmodule"))))
"""


def test_models_import_nothing_from_training():
    # A fresh interpreter: what importing every model module pulls in, and nothing else.
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, timeout=120).stdout.strip().splitlines()[-1]
    assert out == "[]", f"asrkd.models imports training code: {out}"
