"""The embedded backend: a Lambda-like function runtime on this machine (backend.py in the
driver, worker.py each function instance, isolation.py its memory cap and CPU share)."""

from .backend import LocalBackend, instance_processes

__all__ = ["LocalBackend", "instance_processes"]
