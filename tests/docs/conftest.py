"""Reports how many documentation snippets ran and which were skipped (tests/docs/test_snippets.py)."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter, exitstatus, config):
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
