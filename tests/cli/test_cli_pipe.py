"""``cloudckpt show ROOT | head -2``: a reader that goes away early ends the command quietly, like cat or grep."""

from __future__ import annotations

import os
import shlex
import subprocess

from cli_helpers import cli_command, make_run

from cloudckpt.cli.app import EXIT_BROKEN_PIPE


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def test_stdout_closed_before_the_first_line_is_quiet(tmp_path):
    root = str(tmp_path / "run")
    make_run(root, pin=None)
    started = []
    for command in (("show", root), ("ls", root), ("show", root, "--json")):  # at once: each imports torch
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before anything is written: every write gets EPIPE
        try:
            started.append((command, subprocess.Popen(cli_command(*command), stdout=write_end,
                                                      stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                                      env=_env(), text=True)))
        finally:
            os.close(write_end)
    for command, proc in started:
        _, stderr = proc.communicate(timeout=120)
        assert stderr == "", f"cloudckpt {' '.join(command)} wrote to stderr:\n{stderr}"
        assert proc.returncode == EXIT_BROKEN_PIPE == 141, proc.returncode


def test_head_gets_its_lines_and_the_pipeline_says_nothing(tmp_path):
    root = str(tmp_path / "run")
    make_run(root, pin=None)
    command = " ".join(shlex.quote(part) for part in cli_command("show", root))
    proc = subprocess.run(["bash", "-c", f"{command} | head -2"], capture_output=True, text=True, env=_env(),
                          timeout=120, check=False)
    assert proc.returncode == 0, proc
    assert proc.stdout.splitlines()[0].startswith("checkpoint") and len(proc.stdout.splitlines()) == 2
    assert proc.stderr == "", proc.stderr
