"""The ``cloudckpt`` click group: one-line error handling, the options every command shares, ``main``.

Commands register themselves on :data:`cli` when their modules are imported (see ``__init__``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click

from .. import __version__
from ..errors import CloudCkptError
from .redact import RedactSecrets

EXIT_FAILURE = 1
EXIT_USAGE = 2
#: Exit status when the reader of stdout went away (``cloudckpt show ROOT | head -2``): what a shell
#: reports for a tool that SIGPIPE ended (128 + 13), with no message, as ``cat`` or ``grep`` behave.
EXIT_BROKEN_PIPE = 128 + getattr(signal, "SIGPIPE", 13)

# -- errors ---------------------------------------------------------------------
class Failure(click.ClickException):
    """A failure reported as one line on stderr (exit 1, or 2 for a usage mistake)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(" ".join(str(message).split()))
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"cloudckpt: error: {self.message}", err=True)


def _exit_quietly_on_broken_pipe() -> NoReturn:
    """stdout's reader is gone: send what is still buffered to /dev/null (the flush at exit would fail
    again) and end without a word.  SIGPIPE itself stays ignored (Python's default), so a dropped
    network connection is an error the retry logic sees, never a silent death of the process."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (tests, embedding)
        pass
    raise click.exceptions.Exit(EXIT_BROKEN_PIPE)


class _Group(click.Group):
    """Turns the library's typed errors into one-line failures (tracebacks only with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BrokenPipeError:
            _exit_quietly_on_broken_pipe()
        except Exception as exc:
            if (ctx.obj or {}).get("debug"):
                raise
            if isinstance(exc, CloudCkptError):
                raise Failure(str(exc)) from exc
            if isinstance(exc, ImportError):
                raise Failure(str(exc)) from exc
            if isinstance(exc, OSError):
                raise Failure(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)) from exc
            raise


# -- common options ---------------------------------------------------------------------
def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")(f)
    f = click.option("--endpoint-url", envvar="CLOUDCKPT_ENDPOINT_URL", metavar="URL",
                     help="S3 or GCS endpoint (MinIO, an emulator...); env CLOUDCKPT_ENDPOINT_URL.")(f)
    return f


def _progress_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--progress/--no-progress", default=True,
                        help="Progress bars on stderr (only ever shown when it is a terminal).")(f)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
@click.version_option(__version__, prog_name="cloudckpt")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int) -> None:
    """Inspect, verify, restore, promote, clean up and copy cloudckpt checkpoints.

    ROOT is s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, file:///PATH or a local path.
    ROOT/NAME.ckpt names one checkpoint.  Credentials come from the usual
    environment (AWS_*, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS, ...).
    """
    ctx.obj = {"debug": debug}
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="cloudckpt: %(levelname)s: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):  # once, however often cli() runs
            handler.addFilter(RedactSecrets())
    if verbose < 2:  # the SDKs' own chatter (retries, auth probes) is not for users; errors say enough
        for noisy in ("botocore", "boto3", "urllib3", "google", "google.auth"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``cloudckpt`` console script."""
    cli.main(args=argv, prog_name="cloudckpt")
