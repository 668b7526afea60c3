"""Store credentials: which options are secrets, and how they reach a function without
travelling.

A store opened with secrets in its options (any option not in PUBLIC_OPTIONS) keeps them
in this process. What goes into events, Lithops payloads and logs is the store's
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
from urllib.parse import urlsplit

CREDENTIALS_ENV = "SERVELESS_STORE_CREDENTIALS"
PUBLIC_OPTIONS: dict[str, Any] = {
    # fsspec and s3fs settings that say where and how, never who
    "endpoint_url": None, "anon": None, "use_ssl": None, "requester_pays": None,
    "version_aware": None, "cache_regions": None, "default_block_size": None,
    "default_fill_cache": None, "default_cache_type": None, "use_listings_cache": None,
    "listings_expiry_time": None, "max_paths": None, "auto_mkdir": None,
    "client_kwargs": {"region_name": None, "endpoint_url": None, "verify": None,
                      "use_ssl": None},
    "config_kwargs": {"signature_version": None, "connect_timeout": None,
                      "read_timeout": None, "retries": True, "s3": True,
                      "max_pool_connections": None},
}
"""The store options that may travel (into events, Lithops payloads, job.json, logs): an
allow-list, because a list of secrets is never complete (`s3_additional_kwargs` carries an
SSE-C key, `headers` an Authorization, an endpoint `user:pass@`). Every other option, and
any value that embeds a password, is a secret: it stays in the process that opened the
store and reaches a local function through its environment, never its command line. A
nested dict is public as far as its own allow-list goes; `True` allows a whole value."""
_credentials: dict[str, dict[str, Any]] = {}  # reference -> credential options, this process
_refs: dict[str, str] = {}  # canonical JSON of credential options -> reference


def split_credentials(options: dict[str, Any], allowed: dict[str, Any] | None = None,
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the options that may travel, every other one): by PUBLIC_OPTIONS, also inside nested
    dicts such as client_kwargs={'region_name': ..., 'aws_access_key_id': ...}."""
    allowed = PUBLIC_OPTIONS if allowed is None else allowed
    public: dict[str, Any] = {}
    secret: dict[str, Any] = {}
    for name, value in options.items():
        rule = allowed.get(str(name), False) if name in allowed else False
        if rule is True or (rule is None and not _embeds_secret(value)):
            public[name] = value
        elif isinstance(rule, dict) and isinstance(value, dict):
            pub, sec = split_credentials(value, rule)
            if pub:
                public[name] = pub
            if sec:
                secret[name] = sec
        else:
            secret[name] = value
    return public, secret


def _embeds_secret(value: Any) -> bool:
    """A value that carries a password of its own: a URL with user info (`user:pass@`)."""
    if not isinstance(value, str) or "://" not in value:
        return False
    return bool(urlsplit(value).password or urlsplit(value).username)


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
