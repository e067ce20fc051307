"""The package's layers: models and decoding know nothing of losses or training.

``asrkd.models`` (the modules) and ``asrkd.decoding`` (search over their outputs) sit at the
bottom; ``asrkd.losses`` reads model outputs; ``asrkd.training`` and the Lightning module put
them together. A model that imported its own loss or trainer could not be exported or reused
without them.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import importlib, pkgutil, sys
import {package}
for info in pkgutil.walk_packages({package}.__path__, "{package}."):
    importlib.import_module(info.name)
print(sorted(m for m in sys.modules if m.startswith({forbidden!r})))
"""

LAYERS = {
    "asrkd.models": ("asrkd.losses", "asrkd.training", "asrkd.modelmodule"),
    "asrkd.decoding": ("asrkd.losses", "asrkd.training", "asrkd.modelmodule"),
    "asrkd.losses": ("asrkd.training", "asrkd.modelmodule"),
}


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_lower_layers_import_nothing_from_upper_ones(package):
    # A fresh interpreter: what importing every module of the package pulls in, and nothing else.
    code = PROBE.format(package=package, forbidden=LAYERS[package])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.strip().splitlines()[-1]
    assert out == "[]", f"{package} imports {out}"
