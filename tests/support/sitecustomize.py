"""Registers the test filesystem `flaky://` in every interpreter started with this folder
on PYTHONPATH (local function instances of a test that uses it: see flakyfs.environment)."""

import flakyfs

flakyfs.register()
