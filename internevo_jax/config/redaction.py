"""Secrets kept out of everything we log or write: webhook and monitor addresses, credentials inside URLs.

One place for the rule, so a log line, ``config.json``, the TensorBoard config text and a checkpoint's meta hide the
same things: ``redact`` masks an address (its userinfo, token-like path segments and query values), and
``redact_config`` applies it to every config value whose key names an address or a secret, and masks the
credentials of any other URL (``user:password@``, ``?token=...``). Standard library only: it
lives in the config package, which imports nothing else from the project.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

MASK = "***"
# A config key whose string value is an address or a credential as a whole: one of its ``_``-separated words, in any
# case (monitor.alert.feishu_alert_address, light_monitor_address, alert_address, an InternEvo helper variable such
# as FEISHU_WEBHOOK or API_TOKEN; not tokenizer_path).
_SECRET_KEY_WORDS = {"address", "webhook", "token", "secret", "password", "passwd", "credential", "credentials"}
_SECRET_KEY_WORDS |= {"apikey", "key"}  # API_KEY, APIKEY (a bare KEY too: a helper named so is rarely anything else)
# Query parameters that carry a credential in any other URL (a signed URL, an access token).
_SECRET_QUERY = re.compile(r"token|key|secret|pass|pwd|sig|auth|credential|session|x-amz-", re.IGNORECASE)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def _secret_path_segment(segment: str) -> bool:
    # Webhook tokens are path segments (Feishu .../hook/<uuid>, Slack /services/T../B../<key>, Discord /<id>/<token>):
    # long ones, or ones mixing in digits. Words such as "open-apis", "v2" or "hook" stay readable.
    return len(segment) >= 16 or (len(segment) >= 6 and any(c.isdigit() for c in segment))


def redact_parts(address: str) -> tuple[str, list[str]]:
    """The redacted address and the substrings it hides (the whole address first)."""
    try:
        parts = urllib.parse.urlsplit(address.strip())
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        return MASK, [address]
    if not parts.scheme or not parts.netloc:
        return MASK, [address]  # not a URL we can take apart: hide all of it
    secrets = [address]
    userinfo, at, hostport = parts.netloc.rpartition("@")
    netloc = f"{MASK}@{hostport}" if at else hostport
    secrets.append(userinfo)
    segments = []
    for segment in parts.path.split("/"):
        masked = _secret_path_segment(segment)
        segments.append(MASK if masked else segment)
        secrets.append(segment if masked else "")
    query = []
    for item in parts.query.split("&") if parts.query else []:
        key, eq, value = item.partition("=")
        query.append(f"{key}={MASK if value else ''}" if eq else MASK)
        secrets.append(value if eq else item)
    secrets.append(parts.fragment)
    fragment = MASK if parts.fragment else ""
    redacted = urllib.parse.urlunsplit((parts.scheme, netloc, "/".join(segments), "&".join(query), fragment))
    return redacted, [s for s in secrets if len(s) >= 3]  # shorter pieces are no secret and would garble the text


def redact(address: str) -> str:
    """An address safe to log: scheme and host kept; userinfo, path tokens and query values masked.

    ``https://open.feishu.cn/open-apis/bot/v2/hook/9f3c1e2a-...`` -> ``https://open.feishu.cn/open-apis/bot/v2/hook/***``;
    ``http://user:pass@10.0.0.1:8080/x?token=abc`` -> ``http://***@10.0.0.1:8080/x?token=***``. Anything that does not
    parse as ``scheme://host...`` becomes ``***``.
    """
    return redact_parts(address)[0]


def _url_credentials(match: re.Match) -> str:
    """One URL inside a text with only its credentials masked (userinfo, secret-named query values); paths kept."""
    url = match.group(0)
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url
    userinfo, at, hostport = parts.netloc.rpartition("@")
    netloc = f"{MASK}@{hostport}" if at else parts.netloc
    query = "&".join(
        f"{key}={MASK}" if eq and value and _SECRET_QUERY.search(key) else item
        for item in (parts.query.split("&") if parts.query else [])
        for key, eq, value in [item.partition("=")]
    )
    if netloc == parts.netloc and query == parts.query:
        return url  # nothing secret: keep the text byte for byte
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` with the credentials of every URL in it masked (``user:password@``, ``?token=...``)."""
    return _URL.sub(_url_credentials, text)


def redact_config(values: Any, key: str = "") -> Any:
    """A copy of a config's plain values (nested dicts/lists) safe to write to disk: a string under a key that names
    an address or a secret is ``redact``-ed whole; every other string keeps its text but not its URL credentials."""
    if isinstance(values, dict):
        return {k: redact_config(v, str(k)) for k, v in values.items()}
    if isinstance(values, (list, tuple)):
        return type(values)(redact_config(v, key) for v in values)
    if isinstance(values, str) and values:
        words = key.lower().split("_")
        if _SECRET_KEY_WORDS.intersection(words):
            return redact(values)
        return redact_text(values)
    return values
