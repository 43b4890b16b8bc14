"""Heap a deployed board needs to boot and serve (issue 9 #9), on the MicroPython unix port.

The firmware is compiled to .mpy as `tessera board deploy` installs it, boot.py and main.py
(the boot templates: one interpreter life per self-test suite, each ended by a soft reset,
then the SCPM UDP device in a fresh interpreter; tessera.boards.bootrun) run in
`micropython -X heapsize=N` in a board-like filesystem, and the host KSN (tessera.scpm,
real UDP on 127.0.0.1) enrols it,
reads a property, provisions a service-provider key and runs a master key update (the DH).
A heap passes when the self-test printed PASS and every operation succeeded; the smallest
passing heap is found by binary search to 1 KB.

    .venv/bin/python bench/mpy/boot_heap.py             # smallest heap, with the 56 KB check
    .venv/bin/python bench/mpy/boot_heap.py --heap 57344  # one run at a given heap
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "host"))

from tessera.boards.build import compile_firmware  # noqa: E402
from tessera.boards.bootrun import BootRun, prepare  # noqa: E402
from tessera.boards.virtual import free_udp_port  # noqa: E402
from tessera.paths import firmware_dir  # noqa: E402
from tessera.scpm.ksn import KsnEngine  # noqa: E402
from tessera.scpm.server import KsnServer, Operations  # noqa: E402
from tessera.scpm.store import Store  # noqa: E402

ESP32_FIRST_AREA = 56 * 1024  # the ESP32's GC heap before it grows (boards/esp32/board.json)
ADDR = 0x0A0000C1
QUIET = lambda s: None  # noqa: E731


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def _serve_ops(port: int, ksn_port: int, setup: bytes, db: Path, light: bool) -> None:
    eng = KsnEngine(Store(db, storage_key=bytes(32)), timeout=1.0, retries=4)
    srv = KsnServer(eng, "127.0.0.1", ksn_port)
    ops = Operations(srv)
    await srv.start()
    try:
        await ops.enrol(ADDR, setup.hex(), "127.0.0.1", port, progress=QUIET)
        got = await ops.app(ADDR, "get", 3, progress=QUIET)
        assert got["value"] == b"0.1.0".hex(), got
        if light:
            return
        await ops.provision([ADDR], "sp", 1, progress=QUIET)
        res = await ops.rotate([ADDR], progress=QUIET)
        assert res[0]["ok"], res
        got = await ops.app(ADDR, "get", 1, kind="sp", idx=1, progress=QUIET)
    finally:
        await srv.stop()
        eng.store.close()


def attempt(heap: int, lib: Path, selftest: bool = True, light: bool = False) -> tuple[bool, str]:
    """Boot boot.py and main.py in `heap` bytes (through main.py's soft reset after the
    self-test: a fresh interpreter, tessera.boards.bootrun) and run the KSN operations."""
    with tempfile.TemporaryDirectory() as tmp:
        fs = Path(tmp) / "fs"
        main = (firmware_dir() / "main.py").read_text()  # TESSERA_ROOT=<tree> measures another tree
        if not selftest:  # the device alone, for comparison
            main = "from tessera_fw.scpm import udp\n\nudp.main()\n"
        port, ksn_port = free_udp_port(), free_udp_port()
        setup = os.urandom(16)
        fs.mkdir()
        prepare(fs, lib, {
            "address": f"{ADDR:08x}", "setup_key": setup.hex(), "port": port, "bind": "127.0.0.1",
            "ksn_host": "127.0.0.1", "ksn_port": ksn_port, "log": True}, main)
        ok = False
        board = BootRun(fs, heap, Path(tmp) / "console.txt")
        with board:
            if board.serving(port, 30):
                try:
                    asyncio.run(asyncio.wait_for(_serve_ops(port, ksn_port, setup, Path(tmp) / "ksn.sqlite", light), 60))
                    ok = board.alive
                except Exception as e:  # noqa: BLE001 - any failure means this heap is too small
                    log(f"  heap {heap}: {type(e).__name__}: {e}")
        console = board.stop()
        ok = ok and ("SELFTEST PASS" in console or not selftest) and "scpm: restart" not in console
        return ok, console


def smallest(lib: Path, selftest: bool = True, light: bool = False, lo: int = 16 * 1024,
             hi: int = 112640) -> int | None:
    if not attempt(hi, lib, selftest, light)[0]:
        return None
    while hi - lo > 1024:
        mid = (lo + hi) // 2
        ok, _ = attempt(mid, lib, selftest, light)
        log(f"  heap {mid}: {'ok' if ok else 'fails'}")
        if ok:
            hi = mid
        else:
            lo = mid
    return hi


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heap", type=int, help="one run at this heap (bytes); prints the console")
    ap.add_argument("--no-selftest", action="store_true", help="the device alone (main.py without the self-test)")
    ap.add_argument("--light", action="store_true", help="only enrolment and a property read (no SP key, no DH update)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        log("compiling the firmware to .mpy ...")
        lib = compile_firmware(None, Path(tmp) / "lib").out_dir
        if a.heap:
            ok, console = attempt(a.heap, lib, not a.no_selftest, a.light)
            print(console)
            print(f"heap {a.heap}: {'boots and serves' if ok else 'FAILS'}")
            return 0 if ok else 1
        need = smallest(lib, not a.no_selftest, a.light)
    if need is None:
        print("does not boot and serve even in 110 KB")
        return 1
    fits = need <= ESP32_FIRST_AREA
    what = "enrolment and a property read" if a.light else "enrolment, property read, SP key and a master key update"
    print(f"boot ({'no self-test' if a.no_selftest else 'self-test'}) + SCPM device serving {what}: "
          f"smallest heap {need // 1024} KB ({need} bytes) with .mpy on the 64-bit unix port; "
          f"ESP32 first heap area {ESP32_FIRST_AREA // 1024} KB: {'fits' if fits else 'DOES NOT FIT'}")
    return 0 if fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
