"""Importing an integration without its optional package fails with an install hint (simulated here by
blocking the package in sys.modules, so this runs whether or not the package is installed)."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest


def _block(monkeypatch: pytest.MonkeyPatch, *packages: str) -> None:
    """Make ``import <package>`` (and of any submodule already loaded) raise ModuleNotFoundError."""
    for name in list(sys.modules):
        if any(name == p or name.startswith(p + ".") for p in packages):
            monkeypatch.setitem(sys.modules, name, None)
    for package in packages:
        monkeypatch.setitem(sys.modules, package, None)


@pytest.mark.parametrize("module, missing, hint", [
    ("cloudckpt.integrations.lightning", ("lightning",), "pip install 'cloudckpt[lightning]'"),
    ("cloudckpt.integrations.hf", ("transformers",), "pip install 'cloudckpt[hf]'"),
])
def test_missing_optional_package_raises_import_error_with_hint(monkeypatch, module, missing, hint):
    _block(monkeypatch, *missing)
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=re.escape(hint)) as caught:
        importlib.import_module(module)
    assert isinstance(caught.value.__cause__, ImportError)  # the original error stays attached
    assert module not in sys.modules  # a later import (once installed) tries again


def test_cloudckpt_itself_never_imports_the_optional_packages():
    code = ("import sys, cloudckpt, cloudckpt.integrations; "
            "print(sorted(m for m in ('lightning', 'transformers', 'accelerate') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
