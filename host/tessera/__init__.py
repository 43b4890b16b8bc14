"""Tessera host package: KSN (SCPM), ASM peer, BCAST SP-4 over SimulCrypt, and the board
tooling that deploys and drives the MicroPython firmware; secure RMCP-2 has its session
manager, agents and the board RMA's control plane (no tree join or content yet).

The public API for scripts is `tessera.api` (docs/scripting.md); its names are importable
from here too (`from tessera import Ksn, Board`), loaded on first use so that the `tessera`
command does not pay for them. `__all__` lists every public name.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def _api_names() -> list[str]:
    import tessera.api

    return list(tessera.api.__all__)


def _is_submodule(name: str) -> bool:
    from importlib.util import find_spec

    return find_spec(f"tessera.{name}") is not None


def __getattr__(name: str) -> Any:
    if name == "__all__":
        return ["__version__", *_api_names()]
    if name.startswith("_") or _is_submodule(name):  # `from tessera import keyfile` imports the module
        raise AttributeError(name)
    import tessera.api

    if name in tessera.api.__all__:
        return getattr(tessera.api, name)
    raise AttributeError(f"module 'tessera' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_api_names()})
