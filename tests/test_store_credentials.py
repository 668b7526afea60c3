"""Credentials never travel: store options that are credentials stay in the process that
was given them; events, job.json, logs and reports carry a reference, and local workers
get the credentials through their environment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from serveless.data.samples import make_sample_images
from serveless.data.sources import pack
from serveless.store import Store
from serveless.store.credentials import CREDENTIALS_ENV, credentials_env, split_credentials

pytest_plugins = ["s3server"]

SECRET = "RECOGNISABLE-secret-5f0c1e"


def test_spec_holds_no_credentials_and_resolves_them_where_handed_over(tmp_path):
    options = {"endpoint_url": "http://127.0.0.1:1", "key": "AKIARECOGNISABLE", "secret": SECRET,
               "client_kwargs": {"region_name": "eu-west-1", "aws_session_token": SECRET + "t"},
               "profile": "prod"}
    public, secret = split_credentials(options)
    assert public == {"endpoint_url": "http://127.0.0.1:1",
                      "client_kwargs": {"region_name": "eu-west-1"}}
    assert set(secret) == {"key", "secret", "client_kwargs", "profile"}
    st = Store("memory://creds-test", options)
    spec = st.spec()
    text = json.dumps(spec)
    assert SECRET not in text and "AKIARECOGNISABLE" not in text and "prod" not in text
    assert Store.from_spec(spec).options == options  # in this process: all of them
    # in another process: only through the environment it was started with
    code = ("import json,sys; from serveless.store import Store; "
            "print(json.dumps(Store.from_spec(json.loads(sys.argv[1])).options))")
    env = {k: v for k, v in __import__("os").environ.items() if k != CREDENTIALS_ENV}
    plain = subprocess.run([sys.executable, "-c", code, text], env=env, capture_output=True,
                           text=True, check=True)
    assert json.loads(plain.stdout) == public  # the platform's own credentials then
    handed = subprocess.run([sys.executable, "-c", code, text],
                            env={**env, **credentials_env()}, capture_output=True, text=True,
                            check=True)
    assert json.loads(handed.stdout) == options


@pytest.mark.e2e
def test_a_secret_given_by_store_option_is_in_no_object_log_or_output(
        s3_server, tmp_path, monkeypatch):
    """`run --store-option secret=...` on S3: the job runs (the workers authenticate with
    the secret, moto checks it), and the secret is in no object of the store, no worker's
    command line and no output."""
    from serveless.cli import app

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                CREDENTIALS_ENV):
        monkeypatch.delenv(var, raising=False)
    make_sample_images(tmp_path / "images", 10, classes=3, seed=5)
    pack(tmp_path / "images", Store(str(tmp_path / "records")), "", 10)
    seen_argv: list[str] = []
    import serveless.backends.local.backend as local

    real_popen = local.subprocess.Popen

    def popen(args, *a, **kw):  # every worker's command line, as `ps` would show it
        seen_argv.append(" ".join(map(str, args)))
        return real_popen(args, *a, **kw)

    monkeypatch.setattr(local.subprocess, "Popen", popen)
    result = CliRunner().invoke(app, [
        "run", "--store", s3_server.url("secret"), "--job", "sj", "--model", "alexnet",
        "--preset", "paper", "--records", str(tmp_path / "records"),
        "--store-option", f"endpoint_url={s3_server.endpoint}",
        "--store-option", f"key={s3_server.key}", "--store-option", f"secret={s3_server.secret}",
    ])
    assert result.exit_code == 0, result.output
    assert s3_server.secret not in result.output
    assert len(seen_argv) >= 4 and not [a for a in seen_argv if s3_server.secret in a]
    keys = s3_server.keys("secret/")
    assert "secret/sj/job.json" in keys and any(k.startswith("secret/sj/log/") for k in keys)
    client = s3_server.client()
    for key in keys:
        body = client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
        assert s3_server.secret.encode() not in body, key
        assert s3_server.key.encode() not in body, key
    report = tmp_path / "report"
    out = CliRunner().invoke(app, ["report", "sj", "--store", s3_server.url("secret"),
                                   "--store-option", f"endpoint_url={s3_server.endpoint}",
                                   "--store-option", f"key={s3_server.key}",
                                   "--store-option", f"secret={s3_server.secret}",
                                   "--out", str(report)])
    assert out.exit_code == 0, out.output
    assert s3_server.secret not in out.output
    for path in Path(report).rglob("*"):
        if path.is_file():
            assert s3_server.secret.encode() not in path.read_bytes(), path
