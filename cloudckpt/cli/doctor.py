"""``cloudckpt doctor ROOT``: what the store behind a root really does, and whether cloudckpt accepts it."""

from __future__ import annotations

import sys
from typing import Any

import click

from ..storage.capabilities import Capabilities, probe
from .app import EXIT_FAILURE, _common, cli
from .render import emit_json
from .targets import open_root


def verdict(caps: Capabilities) -> str:
    if caps.conditional_writes:
        return "OK: conditional writes are enforced; several writers on this root are safe"
    return ("REFUSED by default: the store ignores conditional writes. Accept it only if one process at a "
            "time writes to this root: storage_options={'conditional_writes': 'unsupported'} "
            "(single-writer mode, docs/RELIABILITY.md)")


def _lines(caps: Capabilities) -> list[tuple[str, str]]:
    rows = [("store", f"{caps.store} ({caps.backend})")]
    if caps.endpoint:
        rows.append(("endpoint", f"{caps.endpoint} (chosen by {caps.endpoint_setting})"))
    rows += [
        ("create-only writes", caps.create_only),
        ("If-Match writes", caps.if_match),
        ("store checksums", caps.checksums),
        ("upload listing", caps.upload_listing),
    ]
    rows += [("observed", line) for line in caps.observations]
    rows.append(("verdict", verdict(caps)))
    return rows


@cli.command("doctor")
@click.argument("root", metavar="ROOT")
@_common
def doctor_cmd(root: str, endpoint_url: str | None, as_json: bool) -> None:
    """Probe the store behind ROOT: conditional writes, checksums, upload listing.

    Writes one small object under ROOT/.cloudckpt/probe/ (a few requests) and deletes it.
    Exit status 1 when the store ignores conditional writes (cloudckpt refuses it by default).
    """
    store = open_root(root, endpoint_url)
    with store:
        caps = probe(store)
    if as_json:
        body: dict[str, Any] = caps.to_json()
        body["verdict"] = verdict(caps)
        emit_json(body)
    else:
        width = max(len(name) for name, _ in _lines(caps))
        for name, value in _lines(caps):
            click.echo(f"{name:<{width}}  {value}")
    if not caps.conditional_writes:
        sys.exit(EXIT_FAILURE)
