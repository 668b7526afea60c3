"""Store credentials: which options are secrets, and how they reach a function without
travelling.

A store opened with credentials in its options (`--store-option key=… secret=…`) keeps
them in this process. What goes into events, Lithops payloads and logs is the store's
`spec()`: the options that are not credentials and an opaque reference to the rest
(`register`). A local worker gets the credentials of the stores its driver opened through
its environment (`credentials_env`, never its command line); a remote function uses its
own role or environment. `lookup` resolves a reference where it was handed over.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

CREDENTIALS_ENV = "SERVELESS_STORE_CREDENTIALS"
_CREDENTIAL_NAMES = {"key", "secret", "token", "profile", "password", "username",
                     "credentials"}
_CREDENTIAL_PARTS = ("secret", "token", "password", "credential", "access_key", "account_key",
                     "key_id", "connection_string", "profile", "sas_")
_credentials: dict[str, dict[str, Any]] = {}  # reference -> credential options, this process
_refs: dict[str, str] = {}  # canonical JSON of credential options -> reference


def is_credential(name: str) -> bool:
    """Whether a store option is a credential (or names one, as a profile does)."""
    low = name.lower()
    return low in _CREDENTIAL_NAMES or any(part in low for part in _CREDENTIAL_PARTS)


def split_credentials(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(options without credentials, the credentials), also inside nested dicts such as
    client_kwargs={'aws_access_key_id': ...}."""
    public: dict[str, Any] = {}
    secret: dict[str, Any] = {}
    for name, value in options.items():
        if is_credential(str(name)):
            secret[name] = value
        elif isinstance(value, dict):
            pub, sec = split_credentials(value)
            public[name] = pub
            if sec:
                secret[name] = sec
        else:
            public[name] = value
    return public, secret


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for name, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(name), dict):
            out[name] = merge(out[name], value)
        else:
            out[name] = value
    return out


def register(secret: dict[str, Any]) -> str:
    """An opaque reference for credentials kept in this process (the same for the same ones)."""
    canonical = json.dumps(secret, sort_keys=True, default=str)
    if canonical not in _refs:
        ref = uuid.uuid4().hex
        _refs[canonical] = ref
        _credentials[ref] = secret
    return _refs[canonical]


def lookup(ref: str) -> dict[str, Any] | None:
    if ref in _credentials:
        return _credentials[ref]
    try:
        shared = json.loads(os.environ.get(CREDENTIALS_ENV) or "{}")
    except json.JSONDecodeError:
        return None
    found = shared.get(ref) if isinstance(shared, dict) else None
    return found if isinstance(found, dict) else None


def credentials_env() -> dict[str, str]:
    """Environment for a local worker process: the credentials of the stores this process
    opened, under their references; {} when there are none."""
    return {CREDENTIALS_ENV: json.dumps(_credentials, default=str)} if _credentials else {}
