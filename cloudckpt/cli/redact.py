"""Blanking credentials out of log lines: what ``cloudckpt -vv`` lets the SDKs log.

botocore at DEBUG logs request headers (``'Authorization': b'AWS4-HMAC-SHA256 Credential=...,
Signature=...'``, ``'X-Amz-Security-Token': b'...'``) and presigned URLs
(``X-Amz-Credential=...&X-Amz-Signature=...``); google-auth logs token exchanges
(``"access_token": "ya29..."``, ``refresh_token=``, a JWT ``assertion=``, a service account's
``"private_key"``) and requests carry ``Authorization: Bearer ...``.  Each value is replaced by
``<redacted>``, whatever the quoting (``name: value``, ``name=value``, ``'name': b'value'``,
``"name": "value"``).

>>> redact("{'X-Amz-Security-Token': b'IQoJb3JpZ2luX2VjEJr', 'Authorization': b'Bearer ya29.a0Af'}")
"{'X-Amz-Security-Token': b'<redacted>', 'Authorization': b'Bearer <redacted>'}"
"""

from __future__ import annotations

import logging
import re

__all__ = ["RedactSecrets", "redact"]

_SEPARATOR = r"""(?:["']?\s*[:=]\s*(?-i:b)?["']?)"""
#: Headers and parameters whose value is a credential, a signature or a token.
_NAMED = re.compile(
    r"(?i)(?P<name>x-amz-security-token|x-amz-signature|x-amz-credential|x-goog-signature|x-goog-credential|"
    r"awsaccesskeyid|aws_session_token|aws_secret_access_key|access_token|refresh_token|id_token|"
    r"client_secret|assertion|subject_token|(?<![a-z-])signature|(?<![a-z-])credential)"
    rf"(?P<sep>{_SEPARATOR})(?P<value>[^\s,&'\"<>]+)"
)
#: An Authorization header: everything after the name (and the scheme) to the end of the value.
_AUTHORIZATION = re.compile(
    rf"(?i)(?P<name>(?:proxy-)?authorization)(?P<sep>{_SEPARATOR})(?P<scheme>(?:bearer|basic|aws4-hmac-sha256|aws)\s+)?"
    r"(?P<value>[^'\"\r\n}]+)"
)
#: A PEM private key inside JSON (a service account file echoed somewhere).
_PRIVATE_KEY = re.compile(r"""(?i)(?P<name>["']?private_key["']?\s*:\s*["'])(?P<value>[^"']*)""")
#: AWS access key ids (long-term AKIA..., temporary ASIA...).
_KEY_ID = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{12,}\b")
_MARK = "<redacted>"
#: A lowercase word in every name the patterns above look for: text without any of them (most
#: log lines, and the multi-megabyte request and response bodies botocore logs at DEBUG) is left
#: alone without running the patterns, which cost about 0.5 µs per character.
_HINTS = ("token", "signature", "credential", "secret", "assertion", "authorization", "private_key",
          "awsaccesskeyid")
#: Longer log messages are cut to this many characters before redaction (the rest is a body).
MAX_LOGGED_CHARS = 64 * 1024


def redact(text: str) -> str:
    """``text`` with every credential value, signature and token replaced by ``<redacted>``."""
    if "AKIA" in text or "ASIA" in text:
        text = _KEY_ID.sub(_MARK, text)
    lowered = text.lower()
    if not any(hint in lowered for hint in _HINTS):
        return text
    text = _PRIVATE_KEY.sub(lambda m: m.group("name") + _MARK, text)
    text = _AUTHORIZATION.sub(lambda m: m.group("name") + m.group("sep") + (m.group("scheme") or "") + _MARK, text)
    text = _NAMED.sub(lambda m: m.group("name") + m.group("sep") + _MARK
                      if m.group("value") != _MARK else m.group(0), text)
    return text


class RedactSecrets(logging.Filter):
    """Blanks credentials and signatures out of log records (``-vv`` turns on the SDKs' debug logs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > MAX_LOGGED_CHARS:
            message = (f"{message[:MAX_LOGGED_CHARS]} ... ({len(message) - MAX_LOGGED_CHARS} more characters "
                       "not logged)")
            record.msg, record.args = message, None
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True
