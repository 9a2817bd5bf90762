"""Fixtures of the reliability suite, and the summary of the counts its tests print.

Every test here reports what it tried ("crash points tried: N, partial
checkpoints visible: 0, data lost: 0") through :func:`reliability_util.report`.
The lines are printed as they happen (visible with ``-s``) and repeated in a
"cloudckpt reliability counts" section at the end of the pytest run.
"""

from __future__ import annotations

from reliability_util import SUMMARY


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not SUMMARY:
        return
    terminalreporter.write_sep("=", "cloudckpt reliability counts")
    for line in SUMMARY:
        terminalreporter.write_line(line)
