"""A console nobody reads must not stop the board (issue 9 #5).

The issue's flood was the firmware's own "log": true, one "scpm: ERR_NOT_FOR_ME" line per
misaddressed frame; the firmware now summarises its log (issue 11 #10), so here the board's
application prints the same 84 KB itself at boot, with nothing reading the virtual board's
serial port, and then starts the SCPM device. Before the bridge buffered and dropped, the pty
filled after about 36 KB, the bridge blocked writing it, the interpreter blocked on print,
and the device never came up.
"""
from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from tessera import cli
from tessera.boards import ops
from tessera.boards.virtual import CONSOLE_BUFFER, free_udp_port
from tessera.scpm.ksn import KsnEngine
from tessera.scpm.server import KsnServer, Operations
from tessera.scpm.store import Store

pytestmark = pytest.mark.slow

LINE = len(b"scpm: ERR_NOT_FOR_ME\n")


def test_console_flood_nobody_reads_the_board_keeps_answering(virtual_board, tmp_path, capsys):
    t = virtual_board("flood", "esp32", main=True)
    vb = t.vboard
    addr, setup = 0x0A000F01, os.urandom(16)
    port = free_udp_port()
    (vb.fs / "scpm.json").write_text(json.dumps({
        "address": f"{addr:08x}", "setup_key": setup.hex(), "port": port, "bind": "127.0.0.1", "log": True}))
    main = vb.fs / "main.py"
    n = 4000  # 4000 lines, 84 KB of log: twice the 45 KB
    main.write_text(f"for i in range({n}):\n    print('scpm: ERR_NOT_FOR_ME')\n" + main.read_text())
    vb.power_cut(port, timeout=60)  # boots main.py: the log, the self-test, then the device
    # all the log is out of the interpreter once the bridge counts what it dropped
    want = n * LINE - CONSOLE_BUFFER - 2 * 18432 - 4096
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and vb.state()["console_dropped"] < want:
        time.sleep(0.1)
    st = vb.state()
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
