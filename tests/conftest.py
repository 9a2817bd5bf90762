"""Session fixtures (the S3 and GCS test servers) and the end-of-run summaries.

The summaries live here, in the root conftest, because with ``pytest -n`` (xdist) only this one
is loaded by the controller: the workers send their reliability counts back through
``workeroutput``, and the controller prints them with the documentation-snippet tally.
"""

from __future__ import annotations

import sys

import pytest

from servers import FakeGCS, MotoS3

_COUNTS = "cloudckpt_reliability_counts"
_from_workers: list[str] = []


@pytest.fixture(scope="session")
def moto_s3():
    server = MotoS3()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fake_gcs():
    server = FakeGCS()
    yield server
    server.stop()


def _local_counts() -> list[str]:
    util = sys.modules.get("reliability_util")  # imported only when reliability tests ran here
    return list(getattr(util, "SUMMARY", []))


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the counts to the controller
        workeroutput[_COUNTS] = _local_counts()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    _from_workers.extend(getattr(node, "workeroutput", {}).get(_COUNTS, []))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = _local_counts() + _from_workers
    if counts:
        terminalreporter.write_sep("=", "cloudckpt reliability counts")
        for line in counts:
            terminalreporter.write_line(line)
    _snippet_summary(terminalreporter)


def _snippet_summary(terminalreporter) -> None:
    """How many documentation snippets ran and which were skipped (tests/docs/test_snippets.py)."""
    counts: dict[str, int] = {}
    skipped: list[str] = []
    for outcome in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            if "test_snippets.py::test_snippet[" not in nodeid or report.when not in ("call", "setup"):
                continue
            if outcome == "passed" and report.when != "call":
                continue
            counts[outcome] = counts.get(outcome, 0) + 1
            if outcome == "skipped":
                skipped.append(nodeid.split("[", 1)[1].rstrip("]"))
    if not counts:
        return
    terminalreporter.write_sep("-", "documentation snippets")
    terminalreporter.write_line(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    for where in skipped:
        terminalreporter.write_line(f"  skipped: {where}")
