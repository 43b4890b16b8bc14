"""Argument types shared by the command groups (argparse `type=` callables and parsers)."""
from __future__ import annotations

import argparse

from tessera.errors import TesseraError


def port(s: str) -> int:
    """A TCP/UDP port, 0..65535 (0: any free port where a server listens)."""
    try:
        v = int(s, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {s!r}") from None
    if not 0 <= v <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"port {v} is outside 0..65535")
    return v


def host_port(text: str, option: str) -> tuple[str, int]:
    """HOST:PORT given to `option`; a clean TesseraError when malformed."""
    host, _, p = text.rpartition(":")
    if not host or not p.isdigit() or not 1 <= int(p) <= 0xFFFF:
        raise TesseraError(f"{option} wants HOST:PORT with a port in 1..65535, got {text!r}")
    return host, int(p)
