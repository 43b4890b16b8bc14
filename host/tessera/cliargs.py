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


def mcast_group(text: str, option: str, default_port: int = 26033) -> tuple[str, int]:
    """GROUP[:PORT], GROUP an IPv4 multicast address (224.0.0.0/4); the port defaults to
    the content port (profile B.10); a clean TesseraError when malformed."""
    import ipaddress

    group, sep, p = text.partition(":")
    try:
        ok = ipaddress.IPv4Address(group).is_multicast and (not sep or (p.isdigit() and 1 <= int(p) <= 0xFFFF))
    except ValueError:
        ok = False
    if not ok:
        raise TesseraError(f"{option} wants GROUP[:PORT] with an IPv4 multicast GROUP (224.0.0.0/4) and a port "
                           f"in 1..65535, got {text!r}")
    return group, int(p) if sep else default_port


def ipv4(text: str, option: str) -> str:
    """An IPv4 address given to `option`; a clean TesseraError when malformed."""
    import ipaddress

    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise TesseraError(f"{option} wants an IPv4 address, got {text!r}") from None


def host_port(text: str, option: str) -> tuple[str, int]:
    """HOST:PORT given to `option`; a clean TesseraError when malformed."""
    host, _, p = text.rpartition(":")
    if not host or not p.isdigit() or not 1 <= int(p) <= 0xFFFF:
        raise TesseraError(f"{option} wants HOST:PORT with a port in 1..65535, got {text!r}")
    return host, int(p)


def parent_dma(text: str, option: str) -> tuple[str, int, bytes]:
    """HOST:PORT:MAIDHEX of a parent DMA's tree port given to `option` (B.15 "Child DMA"; the
    MAID is 8 bytes, 16 hex digits, B.1); a clean TesseraError when malformed."""
    hp, _, mh = text.rpartition(":")
    try:
        maid = bytes.fromhex(mh)
    except ValueError:
        maid = b""
    if len(maid) != 8:
        raise TesseraError(f"{option} wants HOST:PORT:MAIDHEX with an 8-byte MAID (16 hex digits), got {text!r}")
    return (*host_port(hp, option), maid)
