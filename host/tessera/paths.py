"""Where the repository's trees are. The package is installed editable from the repo
(`make` does this); TESSERA_ROOT overrides the location."""
from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    env = os.environ.get("TESSERA_ROOT")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parents[2]


def firmware_dir() -> Path:
    return repo_root() / "firmware"


def boards_dir() -> Path:
    return repo_root() / "boards"


def var_dir() -> Path:
    """Run-time state (virtual boards, default databases). TESSERA_VAR overrides."""
    env = os.environ.get("TESSERA_VAR")
    p = Path(env) if env else repo_root() / "var"
    p.mkdir(parents=True, exist_ok=True)
    return p
