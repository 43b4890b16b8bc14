"""The deployed firmware boots and serves in the ESP32's first 56 KB heap area (issue 9 #9).

What `tessera board deploy --main` puts on a virtual board (the firmware as .mpy, boot.py,
main.py) boots in `micropython -X heapsize=57344` (64-bit unix port) as a board boots it
(tessera.boards.bootrun): the first two lives each run one self-test suite and soft-reset,
the third, in a fresh interpreter, starts the SCPM device, which the host KSN then enrols over UDP on
127.0.0.1 and asks for a property. bench/mpy/boot_heap.py finds the smallest such heap.
"""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from tessera.boards.bootrun import BootRun, prepare
from tessera.boards.build import compile_firmware
from tessera.boards.virtual import free_udp_port
from tessera.scpm.ksn import KsnEngine
from tessera.scpm.server import KsnServer, Operations
from tessera.scpm.store import Store

# The ESP32's first heap area (boards/esp32/board.json heap_note). The smallest heap that
# passed bench/mpy/boot_heap.py --light is 53984 B: 3.3 KB of margin for the ragged edge
# (fragmentation moves it by 1-2 KB from run to run); docs/scpm-firmware.md "Boot heap".
BOOT_HEAP = 56 * 1024  # the ESP32 first heap area
ADDR = 0x0A0000C7


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_firmware(None, tmp_path_factory.mktemp("mpy") / "lib").out_dir  # what deploy copies


async def _enrol_and_read(port: int, setup: bytes, db: Path) -> str:
    eng = KsnEngine(Store(db, storage_key=bytes(32)), timeout=1.0, retries=4)
    srv = KsnServer(eng, "127.0.0.1", free_udp_port())
    ops = Operations(srv)
    await srv.start()
    try:
        await ops.enrol(ADDR, setup.hex(), "127.0.0.1", port, progress=lambda s: None)
        got = await ops.app(ADDR, "get", 3, progress=lambda s: None)
        return bytes.fromhex(got["value"]).decode()
    finally:
        await srv.stop()
        eng.store.close()


def _boot(lib: Path, tmp_path: Path, heap: int) -> tuple[BootRun, int, bytes]:
    fs = tmp_path / "fs"
    fs.mkdir()
    port, setup = free_udp_port(), os.urandom(16)
    prepare(fs, lib, {"address": f"{ADDR:08x}", "setup_key": setup.hex(), "port": port, "bind": "127.0.0.1"})
    return BootRun(fs, heap, tmp_path / "console.txt"), port, setup


def test_deployed_firmware_self_tests_then_serves_in_the_boot_heap(lib: Path, tmp_path: Path) -> None:
    board, port, setup = _boot(lib, tmp_path, BOOT_HEAP)
    with board:
        assert board.serving(port, 60), board.stop()
        value = asyncio.run(asyncio.wait_for(_enrol_and_read(port, setup, tmp_path / "ksn.sqlite"), 60))
        assert board.alive
    console = board.stop()
    assert value == "0.1.0"
    # each self-test suite ran in its own life (crypto, then SCPM), each ended by a soft
    # reset; the serving life printed the summary of both
    crypto, scpm, serving = console.split("MPY: soft reboot")
    assert "ok   dh-group14" in crypto and "scpm-" not in crypto, console
    assert "ok   scpm-enrolment" in scpm and "dh-group14" not in scpm and "scpm: device" not in scpm, console
    assert "SELFTEST PASS 12/12" in serving and "lives=2 (before the soft reset)" in serving, console
    assert "scpm: device 0a0000c7" in serving and "MemoryError" not in console, console
    assert board.soft_resets == 2
    fs = tmp_path / "fs"
    assert not (fs / "selftest.txt").exists() and not (fs / "selftest.part").exists()  # the next boot tests again


def test_boot_heap_is_tight(lib: Path, tmp_path: Path) -> None:
    """The bound means something: 8 KB less and the same boot does not get to serve a
    property read (the self-test or the device runs out of heap)."""
    board, port, setup = _boot(lib, tmp_path, BOOT_HEAP - 8 * 1024)
    ok = False
    with board:
        if board.serving(port, 60):
            try:
                asyncio.run(asyncio.wait_for(_enrol_and_read(port, setup, tmp_path / "ksn.sqlite"), 30))
                ok = board.alive
            except Exception:  # noqa: BLE001 - the device ran out of heap: what this checks
                ok = False
    assert not ok, board.stop()


def test_board_that_cannot_record_the_self_test_serves_without_a_reset(lib: Path, tmp_path: Path) -> None:
    """A filesystem where selftest.part cannot be written (here a directory of that name):
    a soft reset would run the same suite forever, so the board serves in its first life."""
    board, port, _ = _boot(lib, tmp_path, 112640)
    (tmp_path / "fs" / "selftest.part").mkdir()
    with board:
        assert board.serving(port, 60), board.stop()
        assert board.alive
    console = board.stop()
    assert board.soft_resets == 0 and "MPY: soft reboot" not in console, console
    assert "ok   dh-group14" in console and "scpm: device 0a0000c7" in console, console
