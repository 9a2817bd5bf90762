"""Credentials and signatures never leak into logs, errors, stored objects or CLI output.

Distinctive fake credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY set to marker strings)
are used for saves, restores, verification, retention and CLI commands against moto, including
failure paths (a proxy answering 403 SignatureDoesNotMatch / InvalidAccessKeyId with the key id
and signature echoed in the error body, as S3 does, and a 30% storm of transient errors whose
retries are logged).  Everything captured is scanned for the markers and for signature material
(``X-Amz-Signature``, ``Signature=``, ``Credential=``).

What the promise covers (and what it does not):
* the secret key: nowhere, ever, not even in third-party DEBUG logs;
* the access key id and request signatures: not in cloudckpt's own log records (any level),
  not in any logger's WARNING+ records, not in exception messages or tracebacks, not in stored
  objects, not in CLI output at the default verbosity or -v;
* third-party DEBUG logs (botocore logs the Authorization header, which carries the key id and
  a per-request signature) are outside it: cloudckpt never turns them on in a library, and the
  CLI turns them on only with -vv, through a filter that redacts credentials (tested below).
"""

from __future__ import annotations

import re

import datetime as _dt
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from fault_proxy import FaultProxy
from reliability_util import SDK_LOGGERS, invoke_cli, report, step_state

from cloudckpt import CheckpointManager, KeepLastN, PermissionDenied, RetryPolicy, SweepConfig, TransferConfig
from cloudckpt.storage import open_storage

KEY_ID = "AKIACLOUDCKPTMARKER7"
SECRET = "cloudckptSECRETmarker0123456789abcdefXYZ"
#: A temporary credential's session token: botocore sends it as X-Amz-Security-Token.
TOKEN = "IQoJcloudckptSESSIONtokenMARKER0123456789abcdef"
SIGNATURE_PATTERNS = ("X-Amz-Signature", "Signature=", "Credential=", "X-Amz-Credential")
REPO = Path(__file__).resolve().parents[2]
KiB = 1024


def _leaks(text: str) -> list[str]:
    """Marker credentials, or a signature / credential label followed by a value (not by the
    CLI's ``<redacted>``)."""
    found = [m for m in (KEY_ID, SECRET, TOKEN) if m in text]
    return found + [m for m in SIGNATURE_PATTERNS if re.search(re.escape(m) + r"(?!=?<redacted>)", text)]


@pytest.fixture
def marked_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def _manager(url: str, endpoint: str, **options) -> CheckpointManager:
    return CheckpointManager(
        open_storage(url, endpoint_url=endpoint, retry=RetryPolicy(sleep=lambda s: None, max_attempts=12)),
        transfer=TransferConfig(chunk_size=64 * KiB, pack_threshold=8 * KiB), capture_rng=False,
        monitor="loss", **options)


def _exception_texts(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc)


def test_no_credentials_in_logs_errors_or_stored_objects(moto_s3, marked_credentials, caplog, monkeypatch):
    bucket = moto_s3.new_bucket()
    url = f"s3://{bucket}/run"
    errors: list[BaseException] = []
    caplog.set_level(logging.DEBUG)  # every logger, botocore included ...
    for name in SDK_LOGGERS:  # ... even if an earlier test in this process changed their levels
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
        monkeypatch.setattr(logging.getLogger(name), "handlers", [])
    # The happy path, with retention (deletes) and restores.
    mgr = _manager(url, moto_s3.endpoint_url, retention=KeepLastN(2),
                   cleanup=SweepConfig(grace=_dt.timedelta(0)))
    for step in (1, 2, 3):
        mgr.save(step_state(step), step=step, metrics={"loss": 1.0 / step})
    mgr.restore({"model": step_state(0)["model"]})
    mgr.verify()
    mgr.list()
    # A storm of transient errors: every retry is logged at WARNING.
    with FaultProxy(moto_s3.endpoint_url, fault_rate=0.3, seed=5, weights={"503": 1, "500": 1, "reset": 1}) as proxy:
        storm = _manager(url, proxy.endpoint_url)
        storm.save(step_state(4), step=4, metrics={"loss": 0.1})
        storm.restore({"model": step_state(0)["model"]})
    # Refused: S3 echoes the key id and the signature into the error body.
    for mode in ("signature", "invalid_key", "403"):
        with FaultProxy(moto_s3.endpoint_url, always=mode) as proxy:
            with pytest.raises(PermissionDenied) as excinfo:
                _manager(url, proxy.endpoint_url).save(step_state(5), step=5)
            errors.append(excinfo.value)
            with pytest.raises(PermissionDenied) as excinfo:
                _manager(url, proxy.endpoint_url).restore({"model": step_state(0)["model"]})
            errors.append(excinfo.value)
    for name in SDK_LOGGERS:
        sdk = logging.getLogger(name)
        assert sdk.level == logging.NOTSET and not sdk.handlers, f"cloudckpt changed {name}'s logging"

    ours, others_warning, third_party_debug = [], [], []
    for record in caplog.records:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += _exception_texts(record.exc_info[1])
        leaks = _leaks(text)
        if SECRET in text:
            ours.append(f"{record.name}: the SECRET KEY: {text[:300]}")
        elif record.name.startswith("cloudckpt") and leaks:
            ours.append(f"{record.name} {record.levelname}: {leaks}: {text[:300]}")
        elif record.levelno >= logging.WARNING and leaks:
            others_warning.append(f"{record.name} {record.levelname}: {leaks}: {text[:300]}")
        elif leaks:
            third_party_debug.append(record.name)
    in_errors = [f"{type(e).__name__}: {_leaks(_exception_texts(e))}" for e in errors if _leaks(_exception_texts(e))]
    stored = []
    client = moto_s3.client()
    for item in client.list_objects_v2(Bucket=bucket).get("Contents", []):
        body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        if any(m.encode() in body for m in (KEY_ID, SECRET, "Signature=", "Credential=")):
            stored.append(item["Key"])
    cloudckpt_records = sum(r.name.startswith("cloudckpt") for r in caplog.records)
    report(f"[secrets] in process: {len(caplog.records)} log records scanned ({cloudckpt_records} from cloudckpt), "
           f"{len(errors)} permission errors, {len(client.list_objects_v2(Bucket=bucket).get('Contents', []))} "
           f"stored objects; leaks in cloudckpt logs: {len(ours)}, in others' WARNING+: {len(others_warning)}, "
           f"in errors/tracebacks: {len(in_errors)}, in stored objects: {len(stored)}; "
           f"third-party DEBUG records naming the key id or a signature (outside the promise): "
           f"{len(third_party_debug)} ({', '.join(sorted(set(third_party_debug)))})")
    assert not ours and not others_warning and not in_errors and not stored, (ours, others_warning, in_errors, stored)
    assert any("retrying" in r.getMessage() for r in caplog.records), "the storm logged no retry"


def _cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cloudckpt.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_SESSION_TOKEN=TOKEN,
               AWS_DEFAULT_REGION="us-east-1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


@pytest.fixture(scope="module")
def cli_runs(moto_s3):
    """A root with two checkpoints, and the output of ``python -m cloudckpt.cli`` run on it in real
    processes (in parallel, as each imports torch): a command refused with 403 SignatureDoesNotMatch,
    and one at -vv (the SDKs' DEBUG logs on)."""
    saved = dict(os.environ)
    os.environ.update(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_SESSION_TOKEN=TOKEN)
    try:
        bucket = moto_s3.new_bucket()
        mgr = _manager(f"s3://{bucket}/run", moto_s3.endpoint_url)
        for step in (1, 2):
            mgr.save(step_state(step), step=step, metrics={"loss": 1.0 / step})
    finally:
        os.environ.clear()
        os.environ.update(saved)
    root, env = f"s3://{bucket}/run", _cli_env()
    with FaultProxy(moto_s3.endpoint_url, always="signature") as refusing:
        running = {
            "verify -v (403)": _cli(["-v", "verify", root, "--endpoint-url", refusing.endpoint_url], env),
            "ls -vv": _cli(["-vv", "ls", root, "--endpoint-url", moto_s3.endpoint_url], env),
        }
        results = {label: process.communicate(timeout=180) + (process.returncode,)
                   for label, process in running.items()}
    return root, results


def test_no_credentials_in_cli_output(moto_s3, cli_runs, marked_credentials, caplog):
    root, processes = cli_runs
    caplog.set_level(logging.DEBUG, logger="cloudckpt")
    results: dict[str, tuple[str, int]] = {}
    with FaultProxy(moto_s3.endpoint_url, always="signature") as refusing:
        commands = {
            "ls": ["ls", root, "--endpoint-url", moto_s3.endpoint_url],
            "ls -v": ["-v", "ls", root, "--endpoint-url", moto_s3.endpoint_url],
            "verify": ["verify", root, "--endpoint-url", moto_s3.endpoint_url],
            "verify --all --json": ["verify", root, "--all", "--json", "--endpoint-url", moto_s3.endpoint_url],
            "show latest": ["show", root, "latest", "--endpoint-url", moto_s3.endpoint_url],
            "ls (403)": ["ls", root, "--endpoint-url", refusing.endpoint_url],
            "ls --debug (403)": ["--debug", "ls", root, "--endpoint-url", refusing.endpoint_url],
        }
        for label, args in commands.items():  # in this process (fast); the CLI's own code paths
            result = invoke_cli(args)
            text = result.output + (_exception_texts(result.exception) if result.exception else "")
            results[label] = (text, result.exit_code)
    for label, (out, err, code) in processes.items():
        if label != "ls -vv":
            results[f"python -m cloudckpt.cli {label}"] = (out + err, code)
    logged = "".join(r.getMessage() for r in caplog.records if r.name.startswith("cloudckpt"))
    leaks = {label: _leaks(text) for label, (text, _) in results.items() if _leaks(text)}
    if _leaks(logged):
        leaks["cloudckpt log records"] = _leaks(logged)
    for label in ("ls", "ls -v", "verify", "verify --all --json", "show latest"):
        text, code = results[label]
        assert code == 0 and "checkpoint_step_00000002.ckpt" in text, (label, text)
    for label in ("ls (403)", "ls --debug (403)", "python -m cloudckpt.cli verify -v (403)"):
        text, code = results[label]
        assert code != 0 and "SignatureDoesNotMatch" in text, (label, text)
    debug_out, debug_err, debug_code = processes["ls -vv"]
    assert debug_code == 0 and SECRET not in debug_out + debug_err  # never, not even with SDK DEBUG logs on
    debug_leaks = len(_leaks(debug_out + debug_err))
    redacted = (debug_out + debug_err).count("<redacted>")
    report(f"[secrets] CLI: {len(results)} commands ({len(results) - 3} succeeding, 3 refused with 403 "
           f"SignatureDoesNotMatch echoing the key id and signature, one in a real process), "
           f"{sum(len(t) for t, _ in results.values())} characters of output scanned; leaks: {len(leaks)}; "
           f"with -vv (SDK DEBUG logs on): secret key 0 times, key id / signatures {debug_leaks} times "
           f"({redacted} values redacted)")
    assert not leaks, leaks


def test_no_credentials_in_cli_debug_output(cli_runs):
    _, processes = cli_runs
    out, err, code = processes["ls -vv"]
    assert code == 0, err
    assert not _leaks(out + err), _leaks(out + err)


#: What the SDKs log at DEBUG, one line per credential-bearing form (botocore request headers and
#: presigned URLs, google-auth token exchanges and service-account files, a GCS signed URL).
SDK_DEBUG_LINES = [
    "Sending http request: <AWSPreparedRequest stream_output=False, method=GET, headers={'X-Amz-Date': "
    "b'20261207T140000Z', 'X-Amz-Security-Token': b'IQoJMARKER1//wEaCXVz', 'Authorization': "
    "b'AWS4-HMAC-SHA256 Credential=ASIAMARKER2ABCDEFGH/20261207/us-east-1/s3/aws4_request, "
    "SignedHeaders=host;x-amz-date, Signature=MARKER3abcdef0123'}>",
    "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAMARKER4ABCDEFGH%2F2026"
    "&X-Amz-Security-Token=IQoJMARKER5%2Fabc&X-Amz-Signature=MARKER6deadbeef",
    "https://b.s3.amazonaws.com/k?AWSAccessKeyId=AKIAMARKER7ABCDEFGH&Signature=MARKER8%2Bx&Expires=1",
    "x-amz-security-token: IQoJMARKER9",
    "Authorization: Bearer ya29.MARKER10-xyz",
    "{'Authorization': 'Bearer ya29.MARKER11', 'User-Agent': 'gcloud-python'}",
    '{"access_token": "ya29.MARKER12", "expires_in": 3599, "refresh_token": "1//MARKER13", '
    '"id_token": "eyJ.MARKER14.sig"}',
    "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=eyJhbGci.MARKER15.sig",
    "grant_type=refresh_token&client_id=1.apps&client_secret=GOCSPX-MARKER16&refresh_token=1//MARKER17",
    '{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----\\nMIIEvMARKER18\\n-----END '
    'PRIVATE KEY-----\\n", "client_email": "sa@p.iam.gserviceaccount.com"}',
    "https://storage.googleapis.com/b/o?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=sa%40p%2FMARKER19"
    "&X-Goog-Signature=MARKER20abcdef",
]


def test_redaction_covers_every_credential_of_both_sdks():
    from cloudckpt.cli.redact import redact

    leaks = [(line, redact(line)) for line in SDK_DEBUG_LINES if "MARKER" in redact(line)]
    assert not leaks, leaks
    assert all(redact(line) != line for line in SDK_DEBUG_LINES)
    harmless = ("check the credentials in use (AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_SESSION_TOKEN) SignatureDoesNotMatch; no usable credentials")
    assert redact(harmless) == harmless


def test_a_huge_log_message_is_cut_before_redaction_and_nothing_past_the_cut_is_logged():
    """botocore logs whole request and response bodies at DEBUG: those are cut, not scanned."""
    from cloudckpt.cli.redact import MAX_LOGGED_CHARS, RedactSecrets

    body = "x" * (2 * MAX_LOGGED_CHARS) + " X-Amz-Security-Token: IQoJb3JpZ2luSECRET"
    record = logging.LogRecord("botocore.parsers", logging.DEBUG, __file__, 1, "Response body:\n%s", (body,), None)
    assert RedactSecrets().filter(record)
    message = record.getMessage()
    assert len(message) < MAX_LOGGED_CHARS + 100 and "more characters not logged" in message
    assert "SECRET" not in message
    short = logging.LogRecord("botocore.auth", logging.DEBUG, __file__, 1, "%s",
                              ("'X-Amz-Security-Token': b'IQoJb3JpZ2luSECRET'",), None)
    RedactSecrets().filter(short)
    assert "SECRET" not in short.getMessage() and "<redacted>" in short.getMessage()
