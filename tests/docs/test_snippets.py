"""The documentation cannot rot: every ```python block of README.md and docs/**/*.md runs here.

How it works (see doc_snippets.py for the Markdown side):

* One test item per block, with the id ``<file>:<line>`` of its first line of code.  The blocks
  of one file share a namespace and run in file order; an item whose earlier blocks have not
  run yet (``-k`` picked it alone) runs them first, so any single item can be run on its own.
* Blocks marked ``<!-- snippet: skip (reason) -->`` are reported as skipped with that reason,
  and the inventory test keeps skips rare.
* ``s3://BUCKET/...`` and ``gs://BUCKET/...`` URLs work for real: moto and fake-gcs-server run
  (the session fixtures of tests/conftest.py), every bucket a snippet names is created and
  emptied before each file, and the SDKs find the servers through the environment
  (``AWS_ENDPOINT_URL`` for boto3, ``STORAGE_EMULATOR_HOST`` for google-cloud-storage), exactly as
  a user's would.  Snippets pass no endpoint options.
* Each file runs in a fresh temporary working directory, so relative paths land there.
* A failure names ``file:line`` of the block and shows the traceback through the Markdown file.
* Shell blocks are not run, but every ``cloudckpt ...`` command line in them is parsed by the real
  command-line interface (sub-command, options, option values, argument count) without running
  it, and ``--help`` of each sub-command used is rendered.
* Relative links between the documents (and to repository files) must resolve, anchors included.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import doc_snippets
from doc_snippets import Block

FILES = doc_snippets.markdown_files()
BLOCKS = doc_snippets.python_blocks(FILES)
#: At most this fraction of all python blocks may be skipped.
MAX_SKIP_FRACTION = 0.25


@dataclass
class FileRun:
    """The shared state of one Markdown file's blocks."""

    path: Path
    blocks: list[Block]
    workdir: Path
    module: types.ModuleType
    done: int = 0                    # blocks [0, done) have been handled
    failed_at: str | None = None     # file:line of the first block that failed
    outcomes: dict[str, str] = field(default_factory=dict)


class Runs:
    """Per-file runs, created lazily, torn down at the end of the module."""

    def __init__(self, factory: pytest.TempPathFactory, stores: "Stores") -> None:
        self.factory = factory
        self.stores = stores
        self.by_file: dict[Path, FileRun] = {}

    def of(self, path: Path) -> FileRun:
        run = self.by_file.get(path)
        if run is None:
            self.stores.empty()
            rel = path.relative_to(doc_snippets.REPO).as_posix()
            name = "docsnippet_" + "".join(c if c.isalnum() else "_" for c in rel)
            module = types.ModuleType(name)
            module.__dict__["__builtins__"] = __builtins__
            workdir = self.factory.mktemp(name)
            run = FileRun(path, [b for b in BLOCKS if b.path == path], workdir, module)
            self.by_file[path] = run
        return run

    def close(self) -> None:
        for run in self.by_file.values():
            _close_leftovers(run.module.__dict__)
            sys.modules.pop(run.module.__name__, None)


def _close_leftovers(namespace: dict[str, Any]) -> None:
    """Finish background saves a snippet left running (what a script's exit would do)."""
    import cloudckpt

    for value in list(namespace.values()):
        manager = value.manager if isinstance(value, cloudckpt.CheckpointCallback) else value
        if isinstance(manager, cloudckpt.CheckpointManager):
            try:
                manager.close()
            except Exception:
                pass


class Stores:
    """The buckets snippets name, on moto and fake-gcs-server."""

    def __init__(self, s3_client: Any, gcs_client: Any, buckets: dict[str, set[str]]) -> None:
        self.s3 = s3_client
        self.gcs = gcs_client
        self.buckets = buckets
        for bucket in sorted(buckets["s3"]):
            try:
                self.s3.create_bucket(Bucket=bucket)
            except self.s3.exceptions.BucketAlreadyOwnedByYou:
                pass
        for bucket in sorted(buckets["gs"]):
            if self.gcs.lookup_bucket(bucket) is None:
                self.gcs.create_bucket(bucket)

    def empty(self) -> None:
        """Remove every object (and pending multipart upload) from the snippets' buckets."""
        for bucket in self.buckets["s3"]:
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    self.s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            for upload in self.s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
                self.s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        for bucket in self.buckets["gs"]:
            for blob in list(self.gcs.list_blobs(bucket)):
                blob.delete()


@pytest.fixture(scope="module")
def doc_env(moto_s3, fake_gcs, tmp_path_factory):
    """Servers up, buckets made, SDKs pointed at the servers by environment variables only."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", moto_s3.endpoint_url)
        patch.setenv("STORAGE_EMULATOR_HOST", fake_gcs.endpoint_url)
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1"}.items():
            patch.setenv(name, os.environ.get(name, value))
        patch.delenv("AWS_PROFILE", raising=False)
        patch.delenv("CLOUDCKPT_ENDPOINT_URL", raising=False)
        stores = Stores(moto_s3.client(), fake_gcs.client(), doc_snippets.buckets_named(BLOCKS))
        runs = Runs(tmp_path_factory, stores)
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            yield runs
        finally:
            runs.close()
            signal.signal(signal.SIGTERM, sigterm)


def _run_block(run: FileRun, block: Block) -> None:
    """Execute one block in its file's namespace; raise pytest.fail with file:line on error."""
    if block.skip is not None:
        run.outcomes[block.where] = "skipped"
        return
    if run.failed_at is not None:
        run.outcomes[block.where] = "not run"
        pytest.fail(f"{block.where}: not run, because the earlier block at {run.failed_at} failed", pytrace=False)
    for path in block.fresh:
        shutil.rmtree(path, ignore_errors=True)
    cwd, argv = os.getcwd(), sys.argv
    sys.modules[run.module.__name__] = run.module
    failure = None
    try:
        os.chdir(Path(block.cwd) if block.cwd else run.workdir)
        sys.argv = [str(block.path), *(block.argv or [])]
        # Leading newlines make line numbers in tracebacks those of the Markdown file.
        code = compile("\n" * (block.line - 1) + block.code, str(block.path), "exec")
        exec(code, run.module.__dict__)
    except (Exception, SystemExit) as exc:
        frames = traceback.format_exception(type(exc), exc, exc.__traceback__)
        # Drop this runner's own frame; keep the snippet's and the library's.
        shown = [frames[0]] + [f for f in frames[1:] if __file__ not in f]
        failure = f"{block.where}: the snippet raised {type(exc).__name__}: {exc}\n\n" + "".join(shown)
    finally:
        os.chdir(cwd)
        sys.argv = argv
    if failure is not None:
        run.failed_at = block.where
        run.outcomes[block.where] = "failed"
        pytest.fail(failure, pytrace=False)
    run.outcomes[block.where] = "passed"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_snippet(block: Block, doc_env: Runs) -> None:
    run = doc_env.of(block.path)
    index = run.blocks.index(block)
    while run.done < index:  # earlier blocks of the file first (normally already run, in order)
        earlier = run.blocks[run.done]
        run.done += 1
        if earlier.where not in run.outcomes:
            _run_block(run, earlier)
    run.done = index + 1
    if block.skip is not None:
        run.outcomes[block.where] = "skipped"
        pytest.skip(f"{block.where}: {block.skip}")
    _run_block(run, block)


def test_inventory() -> None:
    """Every python block is either run or skipped with a reason, and skips stay rare."""
    assert FILES and FILES[0].name == "README.md"
    skipped = [b for b in BLOCKS if b.skip is not None]
    lines = [f"{len(BLOCKS)} python blocks in {len(FILES)} Markdown files: "
             f"{len(BLOCKS) - len(skipped)} run, {len(skipped)} skipped"]
    lines += [f"  skipped {b.where}: {b.skip}" for b in skipped]
    print("\n".join(lines))
    assert len(BLOCKS) >= 10, "the documentation has suspiciously few python blocks; did parsing break?"
    assert len(skipped) <= MAX_SKIP_FRACTION * len(BLOCKS), (
        "too many documentation snippets are skipped; make them runnable:\n" + "\n".join(lines))


def test_directives_attach_to_code_blocks() -> None:
    """A snippet comment must sit right above a code block, or it steers nothing."""
    stray = []
    for path in FILES:
        attached = {b.directive_line for b in doc_snippets.parse_blocks(path)}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "<!-- snippet:" in line and number not in attached:
                stray.append(f"{path.relative_to(doc_snippets.REPO)}:{number}: {line.strip()}")
    assert not stray, "snippet directives not directly above a code block:\n" + "\n".join(stray)


def test_sdks_find_the_servers_through_the_environment(doc_env: Runs, moto_s3, fake_gcs) -> None:
    """S3Storage and GCSStorage, given no endpoint option, use AWS_ENDPOINT_URL / STORAGE_EMULATOR_HOST."""
    import cloudckpt

    s3, gcs = moto_s3.client(), fake_gcs.client()
    s3_bucket, gcs_bucket = moto_s3.new_bucket(), fake_gcs.new_bucket()
    for url in (f"s3://{s3_bucket}/env-probe", f"gs://{gcs_bucket}/env-probe"):
        with cloudckpt.open_storage(url) as store:  # no endpoint_url: the environment decides
            store.put("probe", b"through the environment", mode="create")
            assert store.get("probe") == b"through the environment"
    assert s3.get_object(Bucket=s3_bucket, Key="env-probe/probe")["Body"].read() == b"through the environment"
    assert gcs.bucket(gcs_bucket).blob("env-probe/probe").download_as_bytes() == b"through the environment"


def _shell_commands() -> list[tuple[Block, list[str]]]:
    found = []
    for path in FILES:
        for block in doc_snippets.parse_blocks(path):
            if block.is_shell:
                found += [(block, argv) for argv in doc_snippets.cli_invocations(block)]
    return found


def test_cli_commands_in_docs_exist() -> None:
    """Every ``cloudckpt ...`` line of a shell block parses: real sub-command, options, argument count."""
    import click
    from click.testing import CliRunner

    from cloudckpt.cli import cli

    problems, used = [], set()
    group_options = {opt for p in cli.params for opt in (*p.opts, *p.secondary_opts)} | {"--help", "-h"}
    for block, argv in _shell_commands():
        shown = f"{block.where}: `cloudckpt {' '.join(argv)}`"
        words = list(argv)
        while words and words[0].startswith("-"):
            if words[0] not in group_options:
                problems.append(f"{shown}: unknown option {words[0]}")
            words = words[1:]
        if not words:
            continue
        command = cli.commands.get(words[0])
        if command is None:
            problems.append(f"{shown}: no sub-command {words[0]!r}")
            continue
        used.add(words[0])
        try:  # parse exactly as the command line would, without running anything
            command.make_context(words[0], list(words[1:]), parent=click.Context(cli, info_name="cloudckpt"))
        except click.ClickException as exc:
            problems.append(f"{shown}: {exc.format_message()}")
    assert not problems, "\n".join(problems)
    runner = CliRunner()
    for name in sorted(used) + [None]:
        result = runner.invoke(cli, [name, "--help"] if name else ["--help"])
        assert result.exit_code == 0, f"cloudckpt {name or ''} --help failed: {result.output}"


def test_relative_links_resolve() -> None:
    """Links between the docs (and to files in the repository) point at something, anchors included."""
    broken = []
    for path in FILES:
        for line, target in doc_snippets.relative_links(path):
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(doc_snippets.REPO)}:{line}: {target}"
            if not resolved.exists():
                broken.append(f"{where}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in doc_snippets.anchors(resolved):
                broken.append(f"{where}: no heading with anchor #{anchor}")
    assert not broken, "broken links in the documentation:\n" + "\n".join(broken)
