"""A real S3 API for the tests: moto's server mode on 127.0.0.1, with credentials checked.

Why a server and not moto's in-process mocks: the functions run in other processes (local
backend workers, Lithops runners), and they must reach the same bucket over HTTP exactly as
they would reach S3 or MinIO. Why IAM checks on: without them moto accepts any key, and the
"wrong credentials" error could not be tested. The server listens on 127.0.0.1 only, on a
port the kernel picks, and is stopped when the test session ends.

Loaded as a pytest plugin (`pytest_plugins = ["s3server"]`) so that every test module
shares one server.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

REGION = "us-east-1"
BUCKET = "serveless-test"
_ALLOW_ALL = {"Version": "2012-10-17",
              "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


@dataclass
class S3Server:
    """A running moto server and the credentials of a user it accepts."""

    endpoint: str
    key: str
    secret: str
    bucket: str = BUCKET
    _server: Any = field(default=None, repr=False)

    def options(self, **overrides: Any) -> dict[str, Any]:
        """fsspec/s3fs store options that reach this server (what --store-option passes)."""
        return {"endpoint_url": self.endpoint, "key": self.key, "secret": self.secret,
                **overrides}

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def client(self, key: str | None = None, secret: str | None = None) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=key or self.key,
                            aws_secret_access_key=secret or self.secret)

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under a prefix (for tests that look at the bucket directly)."""
        out: list[str] = []
        pages = self.client().get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=self.bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    def stop(self) -> None:
        from moto import settings

        if self._server is not None:
            self._server.stop()
            self._server = None
        settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")  # as it was before start()


def start_s3_server(bucket: str = BUCKET) -> S3Server:
    """Start moto on 127.0.0.1, create a user with full access and a bucket, turn auth on."""
    import boto3
    import requests
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        # Auth is off until the user exists; any key is accepted for these setup calls.
        iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION,
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        user = f"serveless-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=user)
        policy = iam.create_policy(PolicyName=f"{user}-all",
                                   PolicyDocument=json.dumps(_ALLOW_ALL))
        iam.attach_user_policy(UserName=user, PolicyArn=policy["Policy"]["Arn"])
        access = iam.create_access_key(UserName=user)["AccessKey"]
        s3 = S3Server(endpoint, access["AccessKeyId"], access["SecretAccessKey"], bucket, server)
        s3.client().create_bucket(Bucket=bucket)
        reply = requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10)
        reply.raise_for_status()
    except BaseException:
        server.stop()
        raise
    return s3


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One S3 server for the whole session; requests must carry the test user's keys."""
    server = start_s3_server()
    try:
        yield server
    finally:
        server.stop()
