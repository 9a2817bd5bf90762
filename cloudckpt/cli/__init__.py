"""The ``cloudckpt`` command: inspect, verify, restore, promote, clean up and copy checkpoints.

Every command takes a checkpoint ROOT: ``s3://bucket/prefix``, ``gs://bucket/prefix``,
``file:///path`` or a plain path.  A final path component ending in ``.ckpt`` names one
checkpoint in that root (``s3://b/run/checkpoint_step_00001200.ckpt``); ``ROOT@WHICH`` chooses
one the same way in every command: ``ROOT@latest``, ``ROOT@best``, ``ROOT@NAME``, ``ROOT@STEP``
or ``ROOT@timeline:ID`` (``show`` and ``verify`` also take WHICH as a separate argument).  The
choice follows the library's one rule (:mod:`cloudckpt.resolver`).

Exit status: 0 success, 1 failure (an error, a failed verification), 2 a usage mistake
(bad URL, bad option), 141 when the reader of stdout went away (``| head``; quiet, as
for a tool ended by SIGPIPE).  Errors are one line on stderr; ``--debug`` shows tracebacks.
"""

from .app import EXIT_FAILURE, EXIT_USAGE, Failure, cli, main
from .doctor import doctor_cmd
from .inspect import VerifyResult, ls_cmd, show_cmd, verify_checkpoint, verify_cmd
from .manage import gc_cmd, promote_cmd
from .render import (
    emit_json,
    human_age,
    human_bytes,
    parse_duration,
    table,
    tensor_paths,
)
from .targets import open_root, pointers_of, resolve, split_target
from .timelines import quarantine_cmd, rollback_cmd
from .transfer import cp_cmd, export_weights, restore_cmd

__all__ = [
    "EXIT_FAILURE", "EXIT_USAGE", "Failure", "VerifyResult", "cli", "cp_cmd", "doctor_cmd", "emit_json", "export_weights",
    "gc_cmd", "human_age", "human_bytes", "ls_cmd", "main", "open_root", "parse_duration", "pointers_of",
    "promote_cmd", "quarantine_cmd", "resolve", "restore_cmd", "rollback_cmd", "show_cmd", "split_target", "table", "tensor_paths",
    "verify_checkpoint", "verify_cmd",
]
