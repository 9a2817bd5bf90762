"""The process test_http_crash.py kills with SIGKILL at one HTTP request: it runs one operation.

Operations (``OPERATIONS``), each through the fault proxy, so that every request it makes is
counted and any one can be the last:

``save``   open the root for writing (the capability probe), save step 3 with KeepLastN(2)
           (which removes step 1) and move the pointers and the index
``prune``  a retention prune with KeepLastN(1): removes step 1 and sweeps its chunks
``cp``     ``cloudckpt cp SRC DST`` of every checkpoint (the command line, in process)
``rollback`` ``cloudckpt rollback ROOT@1``: step 2 is superseded, step 1 is where the run resumes

It appends ``done`` or ``error ...`` to a progress file when it gets that far.
"""

from __future__ import annotations

import logging
import os
import traceback
from typing import Any, Callable

import torch
from http_util import http_store, loss, manager
from reliability_util import step_state


def _save(options: dict[str, Any]) -> None:
    store = http_store(options["flavor"], options["bucket"], options["endpoint"], options["prefix"])
    manager(store, keep=2).save(step_state(3), step=3, metrics={"loss": loss(3)})


def _prune(options: dict[str, Any]) -> None:
    store = http_store(options["flavor"], options["bucket"], options["endpoint"], options["prefix"])
    manager(store, keep=1).prune()


def _cp(options: dict[str, Any]) -> None:
    from cloudckpt.cli import cli

    scheme = "s3" if options["flavor"] == "s3" else "gs"
    root = f"{scheme}://{options['bucket']}"
    cli.main(["cp", f"{root}/{options['prefix']}", f"{root}/{options['prefix']}-copy",
              "--endpoint-url", options["endpoint"], "--no-progress"], standalone_mode=False)


def _rollback(options: dict[str, Any]) -> None:
    from cloudckpt.cli import cli

    scheme = "s3" if options["flavor"] == "s3" else "gs"
    cli.main(["rollback", f"{scheme}://{options['bucket']}/{options['prefix']}@1",
              "--endpoint-url", options["endpoint"]], standalone_mode=False)


def _warm_up() -> None:
    """Build one client of each SDK in the fork server, so that forked children find botocore's
    service models and google's discovery already loaded."""
    import http_util

    http_util.SESSION.client("s3", region_name="us-east-1")


_warm_up()

OPERATIONS: dict[str, Callable[[dict[str, Any]], None]] = {"save": _save, "prune": _prune, "cp": _cp,
                                                               "rollback": _rollback}


def main(options: dict[str, Any]) -> None:
    fd = os.open(options["progress"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def say(line: str) -> None:
        os.write(fd, (line.replace("\n", " ") + "\n").encode())

    try:
        os.environ.update(options.get("env", {}))
        logging.basicConfig(filename=options["log"], level=logging.INFO)
        torch.set_num_threads(1)
        OPERATIONS[options["op"]](options)
        say("done")
    except BaseException as exc:  # noqa: BLE001 - reported to the test, which fails on it
        say(f"error {type(exc).__name__}: {exc} {traceback.format_exc()[-800:]}")
        raise
