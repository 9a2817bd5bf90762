from __future__ import annotations

import pytest

from preempt_helpers import Outcome, run


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> tuple[Outcome, str]:
    """An uninterrupted run of the test configuration (with a per-step state trace) and its root."""
    workdir = tmp_path_factory.mktemp("reference")
    root = str(workdir / "ckpt")
    outcome = run("reference", root, workdir)
    assert outcome.exitcode == 0, outcome.describe()
    assert outcome.result is not None and outcome.result["status"] == "finished", outcome.describe()
    return outcome, root
