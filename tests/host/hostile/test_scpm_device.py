"""Hostile input against the deployed SCPM device (issue 11 #1, #2, #12): a virtual esp32
running main.py (self-test, then the UDP device) with the board's heap, enrolled by the host
KSN, takes a burst of 5,000 mixed datagrams from many source addresses and ports on
127.0.0.x (random junk, truncated frames, plain frames, secure frames forged under the
user key with random SAs, SNFs and MACs) while the KSN keeps asking it for a property.
Every genuine request must be answered, during the burst and after it. Loopback only,
bounded in count and time; figures go to docs/security.md."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import time

import pytest

from tessera.boards import ops, profile
from tessera.boards.virtual import VirtualBoard, free_udp_port
from tessera.errors import TesseraError
from tessera.scpm import codec as C
from tessera.scpm.ksn import KsnEngine
from tessera.scpm.server import KsnServer, Operations
from tessera.scpm.store import Store

pytestmark = pytest.mark.slow
SKEY = bytes(range(32))
ADDR = 0x0A0000B1
BURST = 5000
CHUNK = 50  # datagrams between two pauses (the kernel queue of the board's socket is finite)
GENUINE_EVERY = 250  # one genuine KSN request per this many hostile datagrams
QUIET = lambda s: None  # noqa: E731


@pytest.fixture(scope="module")
def board(tessera_var):
    vb = VirtualBoard("hostile-scpm-esp32", "esp32")
    pty = vb.start(fresh=True)
    try:
        t = ops.Target(profile.load("esp32"), pty, virtual=True)
        ops.deploy(t, with_main=True)
        port, ksn_port = free_udp_port(), free_udp_port()
        setup = os.urandom(16)
        cfg = {"address": f"{ADDR:08x}", "setup_key": setup.hex(), "port": port, "bind": "127.0.0.1",
               "ksn_host": "127.0.0.1", "ksn_port": ksn_port}
        (vb.fs / "scpm.json").write_text(json.dumps(cfg))
        vb.power_cut(port, 15.0)  # boot: main.py runs the self-test, then serves
        yield {"vb": vb, "port": port, "ksn_port": ksn_port, "setup": setup}
    finally:
        vb.stop()


def _forged(user_gen: int, rng: random.Random) -> bytes:
    """A well-formed service-3 frame under the device's user key (kind 1, index 0, current
    generation) from a random SA with a random SNF: it passes every check before the MAC."""
    body = bytes([0x13, 0x11, 0x10, user_gen]) + rng.randbytes(4) + rng.randbytes(32 + 16)
    return bytes([0x11]) + rng.randbytes(4) + ADDR.to_bytes(4, "big") + len(body).to_bytes(2, "big") + body


def _hostile(i: int, user_gen: int, rng: random.Random) -> bytes:
    kind = i % 8
    if kind < 4:
        return _forged(user_gen, rng)
    if kind == 4:  # truncated forged frame
        f = _forged(user_gen, rng)
        return f[:rng.randrange(len(f))]
    if kind == 5:  # plain ENROL_HELLO from a random SA (an enrolled device ignores it)
        return (bytes([0x10]) + rng.randbytes(4) + ADDR.to_bytes(4, "big") + b"\x00\x03" +
                bytes([C.Op.ENROL_HELLO]) + rng.randbytes(2))
    return rng.randbytes(rng.randrange(0, 1200))  # junk, up to the largest datagram it reads


def _senders(n_addrs: int = 40, per_addr: int = 3) -> list[socket.socket]:
    socks = []
    for a in range(2, 2 + n_addrs):
        for _ in range(per_addr):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((f"127.0.0.{a}", 0))
            s.setblocking(False)
            socks.append(s)
    return socks


def _read_all(s: socket.socket) -> int:
    n = 0
    while True:
        try:
            s.recvfrom(2048)
        except (BlockingIOError, InterruptedError):
            return n
        n += 1


def test_burst_of_5000_mixed_datagrams_device_keeps_answering_its_ksn(board, tmp_path):
    rng = random.Random(11)

    async def go():
        eng = KsnEngine(Store(tmp_path / "ksn.sqlite", storage_key=SKEY), timeout=0.5, retries=8)
        srv = KsnServer(eng, "127.0.0.1", board["ksn_port"])
        k = Operations(srv)
        await srv.start()
        socks = _senders()
        try:
            await k.enrol(ADDR, board["setup"].hex(), "127.0.0.1", board["port"], progress=QUIET)
            user_gen = eng.peer(ADDR).held["1/0"]
            dst = ("127.0.0.1", board["port"])
            asked = answered = 0
            lat = []
            sent = 0
            while sent < BURST:
                for _ in range(CHUNK):
                    s = socks[sent % len(socks)]
                    with contextlib.suppress(BlockingIOError):
                        s.sendto(_hostile(sent, user_gen, rng), dst)
                    sent += 1
                await asyncio.sleep(0.01)
                if sent % GENUINE_EVERY == 0:
                    asked += 1
                    t0 = time.monotonic()
                    with contextlib.suppress(TesseraError):
                        got = await k.app(ADDR, "get", 3, progress=QUIET)
                        answered += got["value"] == b"0.1.0".hex()
                        lat.append(time.monotonic() - t0)
            # after the burst: still enrolled, still serving (and a key update still works)
            after = res = None
            with contextlib.suppress(TesseraError):
                after = await k.app(ADDR, "get", 3, progress=QUIET)
                res = await k.rotate([ADDR], progress=QUIET)
            reflected = sum(_read_all(s) for s in socks)
            return asked, answered, lat, after, res, reflected
        finally:
            for s in socks:
                s.close()
            await srv.stop()
            eng.store.close()

    asked, answered, lat, after, res, reflected = asyncio.run(asyncio.wait_for(go(), 240))
    lat.sort()
    print(f"burst {BURST}: genuine {answered}/{asked} answered, p50 {lat[len(lat) // 2] * 1000:.0f} ms, "
          f"max {lat[-1] * 1000:.0f} ms, datagrams back to the senders {reflected}" if lat else "none answered")
    assert asked == BURST // GENUINE_EVERY
    assert answered == asked, f"only {answered} of {asked} genuine KSN requests answered during the burst"
    assert after is not None and after["value"] == b"0.1.0".hex(), "no answer after the burst"
    assert res is not None and res[0]["ok"] and res[0]["new"] == res[0]["old"] % 255 + 1
    assert reflected == 0, "the device answered forged or plain frames from the flood's sources"
