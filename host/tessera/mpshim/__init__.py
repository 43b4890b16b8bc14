"""Run firmware modules under CPython.

The firmware is MicroPython-first; to simulate fleets of devices on the host (tests, load
benchmarks) it is imported under CPython with two small stand-ins from `modules/`:
`cryptolib` (ECB/CBC on `cryptography`) and `micropython` (const and friends). These are
test shims only: boards use their own cryptolib, and the firmware tests that count run in
the real MicroPython interpreter.
"""
from __future__ import annotations

import sys
from pathlib import Path

from tessera.paths import firmware_dir

SHIM_DIR = Path(__file__).with_name("modules")


def install() -> None:
    """Put the shim modules and the firmware tree on sys.path (idempotent)."""
    for p in (str(SHIM_DIR), str(firmware_dir())):
        if p not in sys.path:
            sys.path.insert(0, p)
