"""Secrets out of every error line, record and stored config.

``redact(text)`` replaces API keys named in the environment, ``Authorization``/``Bearer`` values, ``sk-``
style keys, credentials inside URLs (``user:pw@host``) and secret-looking query parameters (``?api-key=``)
with ``***``: for error lines and config values. ``redact_obj`` masks the environment's secret values in
every string of a JSON-able value (a record: model text is kept as it is, except a key echoed in it).
"""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"
# env vars whose values are secrets wherever they show up (besides each LLM section's api_key_env)
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "OPENAI_API_KEY", "MINIMAX_API_KEY")
_URL_PATTERNS = [  # credentials written into a URL
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)[^/\s@:]*:?[^/\s@]*@"), r"\1" + MASK + "@"),
    (re.compile(r"(?i)([?&](?:api[-_]?key|key|token|access[-_]?token|secret|password|sig|signature)=)[^&\s\"']+"),
     r"\1" + MASK),
]
_PATTERNS = [
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{4,}"), r"\1 " + MASK),
    (re.compile(r"(?i)(authorization|x-api-key|api-key)(\"?\s*[:=]\s*\"?)[^\s\"',;&]+"), r"\1\2" + MASK),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"), MASK),
    *_URL_PATTERNS,
]
_extra_env: set[str] = set()


def register_secret_env(*names: str | None) -> None:
    """Also mask the values of these environment variables (an LLM section's ``api_key_env``)."""
    _extra_env.update(n for n in names if n)


def _secret_values() -> list[str]:
    return [v for n in (*SECRET_ENV, *_extra_env) if (v := os.environ.get(n)) and len(v) >= 4]


def _mask_values(text: str, values: list[str] | None = None) -> str:
    for value in _secret_values() if values is None else values:
        if value in text:
            text = text.replace(value, MASK)
    return text


def redact(text: str) -> str:
    if not text:
        return text
    text = _mask_values(text)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact_obj(value: Any, values: list[str] | None = None) -> Any:
    """``value`` with the environment's secret values masked in every string (dicts and lists walked)."""
    values = _secret_values() if values is None else values  # looked up once per call, not per string
    if isinstance(value, str):
        return _mask_values(value, values)
    if isinstance(value, dict):
        return {k: redact_obj(v, values) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_obj(v, values) for v in value]
    return value


def credential_fields(tree: Any, path: str = "") -> list[tuple[str, str]]:
    """(dotted path, masked value) of every URL in a JSON-able tree (a config) that holds credentials:
    user and password (``user:pw@host``) or a secret-looking query parameter."""
    if isinstance(tree, dict):
        return [f for k, v in tree.items() for f in credential_fields(v, f"{path}.{k}" if path else str(k))]
    if isinstance(tree, list):
        return [f for i, v in enumerate(tree) for f in credential_fields(v, f"{path}[{i}]")]
    if isinstance(tree, str) and "://" in tree:
        masked = tree
        for pattern, repl in _URL_PATTERNS:
            masked = pattern.sub(repl, masked)
        if masked != tree:
            return [(path, masked)]
    return []
