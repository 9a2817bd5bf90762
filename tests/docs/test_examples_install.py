"""The examples say what they need: ``spot_training.py --s3`` after the main install names the extra to install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL = "pip install -e '.[examples]'"


def test_the_examples_extra_brings_moto_and_the_readmes_name_it():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("moto[server]") for req in extras["examples"])
    for doc in ("README.md", "examples/kubernetes/README.md", "docs/guides/spot-instances.md"):
        assert INSTALL in (REPO / doc).read_text(), f"{doc} does not say how to install what --s3 needs"


def test_s3_story_without_moto_names_the_install_command(tmp_path):
    hidden = tmp_path / "without-moto"
    (hidden / "moto").mkdir(parents=True)  # stands in for an environment where moto is not installed
    (hidden / "moto" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'moto'\", name='moto')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden), str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "spot_training.py"), "--s3"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "pip install 'cloudckpt[examples]'" in proc.stderr and "moto" in proc.stderr, proc.stderr
