"""A console nobody reads must not stop the board (issue 9 #5).

The board runs the deployed firmware with "log": true, so every misaddressed frame prints an
"scpm: ERR_NOT_FOR_ME" line; the host floods it with such frames while nothing reads the
virtual board's serial port. Before the bridge buffered and dropped, the pty filled after
about 36 KB, the bridge blocked writing it, the interpreter blocked on print, and the device
stopped answering UDP.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import pytest

from tessera import cli
from tessera.boards import ops
from tessera.boards.virtual import CONSOLE_BUFFER, free_udp_port
from tessera.scpm import codec as C
from tessera.scpm.ksn import KsnEngine
from tessera.scpm.server import KsnServer, Operations
from tessera.scpm.store import Store

pytestmark = pytest.mark.slow

LINE = len(b"scpm: ERR_NOT_FOR_ME\n")


def _misaddressed(n: int, dev: int) -> list[bytes]:
    shd = C.SecureHeader(C.Service.AUTH_CONF, C.KeyKind.USER, 0, 1)
    key = C.UsageKey(bytes(16))
    return [C.seal(C.KSN_ADDRESS, dev + 1 + (i % 7), shd, 1 + i, b"\x00" * 8, key) for i in range(n)]


def test_console_flood_nobody_reads_the_board_keeps_answering(virtual_board, tmp_path, capsys):
    t = virtual_board("flood", "esp32", main=True)
    vb = t.vboard
    addr, setup = 0x0A000F01, os.urandom(16)
    port = free_udp_port()
    (vb.fs / "scpm.json").write_text(json.dumps({
        "address": f"{addr:08x}", "setup_key": setup.hex(), "port": port, "bind": "127.0.0.1", "log": True}))
    vb.power_cut(port)  # boots main.py: self-test, then the device; nothing reads the pty from now on
    frames = _misaddressed(4000, addr)  # 4000 lines, 84 KB of log: twice the 45 KB
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        deadline = time.monotonic() + 60
        sent = 0
        # paced so that the device's socket buffer never overflows: every frame is read,
        # every frame prints its line
        while sent < len(frames) and time.monotonic() < deadline:
            for f in frames[sent:sent + 40]:
                s.sendto(f, ("127.0.0.1", port))
            sent += 40
            time.sleep(0.01)
        # all the log is out of the interpreter once the bridge counts what it dropped
        want = len(frames) * LINE - CONSOLE_BUFFER - 2 * 18432 - 4096
        while time.monotonic() < deadline and vb.state()["console_dropped"] < want:
            time.sleep(0.1)
    st = vb.state()
    assert sent == len(frames)
    assert st["console_dropped"] >= want, st
    assert st["boots"] == 2  # no reboot hid a stall

    async def enrol() -> None:  # the device answers the KSN at once, log and all
        eng = KsnEngine(Store(tmp_path / "ksn.sqlite", storage_key=bytes(32)), timeout=0.5, retries=8)
        srv = KsnServer(eng, "127.0.0.1", free_udp_port())
        await srv.start()
        try:
            await Operations(srv).enrol(addr, setup.hex(), "127.0.0.1", port, progress=lambda s: None)
            assert eng.peer(addr).state == "enrolled"
        finally:
            await srv.stop()
            eng.store.close()

    asyncio.run(asyncio.wait_for(enrol(), 30))
    # the drop count is in `virtual list` and in `board status` (which interrupts main.py)
    assert cli.main(["board", "virtual", "list"]) == 0
    assert f"console dropped {vb.state()['console_dropped']} B" in capsys.readouterr().out
    assert ops.status(t)["console_dropped"] >= want
