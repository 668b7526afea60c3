"""Shared fixtures: a small image set, its records, and AlexNet built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from serveless.images import make_sample_images
from serveless.models import build_alexnet
from serveless.records import pack_folder
from serveless.store import Store


@pytest.fixture(scope="session")
def alexnet():
    return build_alexnet(seed=0)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    make_sample_images(root, 60, classes=3, seed=7)
    return root


@pytest.fixture(scope="session")
def records_dir(tmp_path_factory, image_dir) -> Path:
    """60 images in records of 25: the last record is short."""
    root = tmp_path_factory.mktemp("records")
    pack_folder(image_dir, Store(str(root)), "", 25)
    return root
