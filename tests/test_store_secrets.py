"""Secrets never travel (issue 21): a store option nobody listed as a secret is one. Its
value is in no worker's command line, no event, no Lithops payload and no object of the
store, and the job still runs with it."""

from __future__ import annotations

import json

import pytest
from datakit import image_folder, save, tiny_classifier
from typer.testing import CliRunner

from serveless.store import Store
from serveless.store.credentials import CREDENTIALS_ENV, split_credentials

pytest_plugins = ["s3server"]
MARK = "RECOGNISABLE-unlisted-9c1f"


def test_only_listed_options_are_public():
    options = {"endpoint_url": "http://127.0.0.1:9000", "anon": False,
               "s3_additional_kwargs": {"SSECustomerAlgorithm": "AES256",
                                        "SSECustomerKey": MARK},
               "headers": {"Authorization": MARK},
               "client_kwargs": {"region_name": "eu-west-1", "aws_session_token": MARK},
               "config_kwargs": {"s3": {"addressing_style": "path"}, "user_agent_extra": MARK}}
    public, secret = split_credentials(options)
    assert public == {"endpoint_url": "http://127.0.0.1:9000", "anon": False,
                      "client_kwargs": {"region_name": "eu-west-1"},
                      "config_kwargs": {"s3": {"addressing_style": "path"}}}
    assert MARK not in json.dumps(public)
    assert set(secret) == {"s3_additional_kwargs", "headers", "client_kwargs", "config_kwargs"}
    # a password in a URL is a secret whatever the option's name
    public, secret = split_credentials({"endpoint_url": f"http://user:{MARK}@host:9000"})
    assert public == {} and MARK in json.dumps(secret)
    st = Store("memory://secrets", {"endpoint_url": f"http://u:{MARK}@h", "fail_rate": 0.1})
    assert MARK not in json.dumps(st.spec()) and "fail_rate" not in json.dumps(st.spec())


@pytest.mark.e2e
def test_an_unlisted_option_is_in_no_argv_event_payload_or_object(s3_server, tmp_path,
                                                                  monkeypatch):
    from serveless.cli import app

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", CREDENTIALS_ENV):
        monkeypatch.delenv(var, raising=False)
    image_folder(tmp_path / "imgs", per_class=2)
    model = save(tiny_classifier(), tmp_path / "tiny.onnx")
    import serveless.backends.local.backend as local

    seen_argv: list[str] = []
    events: list[str] = []
    real_popen = local.subprocess.Popen
    real_invoke = local.LocalBackend.invoke

    def popen(args, *a, **kw):  # every worker's command line, as `ps` would show it
        seen_argv.append(" ".join(map(str, args)))
        return real_popen(args, *a, **kw)

    def invoke(self, fn, event):  # every event, as a payload would carry it
        events.append(json.dumps(event) + json.dumps(fn.store))
        return real_invoke(self, fn, event)

    monkeypatch.setattr(local.subprocess, "Popen", popen)
    monkeypatch.setattr(local.LocalBackend, "invoke", invoke)
    url = s3_server.url("unlisted")
    result = CliRunner().invoke(app, [
        "run", "--store", url, "--job", "uj", "--model", model, "--input", str(tmp_path / "imgs"),
        "--store-option", f"endpoint_url={s3_server.endpoint}",
        "--store-option", f"key={s3_server.key}", "--store-option", f"secret={s3_server.secret}",
        "--store-option", f'config_kwargs={{"user_agent_extra": "{MARK}"}}'])
    assert result.exit_code == 0, result.output  # the workers got it, through their environment
    assert MARK not in result.output
    assert seen_argv and not [a for a in seen_argv if MARK in a or s3_server.secret in a]
    assert events and not [e for e in events if MARK in e or s3_server.secret in e]
    client = s3_server.client()
    for key in s3_server.keys("unlisted/"):
        obj = client.get_object(Bucket=s3_server.bucket, Key=key)
        assert MARK.encode() not in obj["Body"].read(), key
        assert MARK not in json.dumps(obj.get("Metadata", {})), key
