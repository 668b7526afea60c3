"""The Lithops backend: AWS Lambda and every engine Lithops supports (backend.py in the
driver, sidecar.py the helper process that runs Lithops); `ping` is a call target that checks
a deployment without a job (`--backend-option function=serveless.backends.lithops:ping`)."""

from .backend import LithopsBackend, ping

__all__ = ["LithopsBackend", "ping"]
