"""The user cache folder: one place for where serveless keeps what it makes on this machine.

`$SERVELESS_CACHE_DIR`, else `$XDG_CACHE_HOME/serveless`, else `~/.cache/serveless`. It
holds the built-in models (AlexNet's generated weights, the trained digits CNN), the
SHA-256 memo of model files (`hashes/`) and the checked stage sets (`stages/`); every entry
can be deleted at any time between jobs and is made again when needed.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SERVELESS_CACHE_DIR"


def cache_dir() -> Path:
    """$SERVELESS_CACHE_DIR, else $XDG_CACHE_HOME/serveless, else ~/.cache/serveless."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "serveless"
