"""The SCPM end-to-end flows against board-speed virtual boards, with the KSN's defaults
(issue 9 #2): enrol, service provider / maker / user keys, master-key update, SYNC after a
lost MKU_COMMIT (the device loses power), a device-requested update and application frames,
on a virtual Pico W and a virtual ESP32 that take as long as the real boards (a DH of about
5.3 s and 3.9 s). The KSN is built exactly as `tessera scpm` builds it, with no timing
argument: what a user gets.
"""
from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from tessera.boards import ops, profile
from tessera.boards.virtual import free_udp_port
from tessera.scpm import codec as C
from tessera.scpm.codec import ErrorCode
from tessera.scpm.ksn import KsnEngine
from tessera.scpm.server import KsnServer, Operations
from tessera.scpm.store import Store

pytestmark = pytest.mark.slow
SKEY = bytes(range(32))
QUIET = lambda s: None  # noqa: E731


class Device:
    def __init__(self, t: ops.Target) -> None:
        self.target, self.vb = t, t.vboard
        self.addr = 0x0A000200 + (1 if t.profile.name == "rp2040" else 2)
        self.setup = os.urandom(16)
        self.port = free_udp_port()
        self.ksn_port = free_udp_port()
        cfg = {"address": f"{self.addr:08x}", "setup_key": self.setup.hex(), "port": self.port,
               "bind": "127.0.0.1", "ksn_host": "127.0.0.1", "ksn_port": self.ksn_port}
        (self.vb.fs / "scpm.json").write_text(json.dumps(cfg))
        self.vb.power_cut(self.port, timeout=120)  # main.py at board speed: self-test, then the device

    def reboot(self) -> None:
        """Power cut at board speed: the boot self-test alone runs the DH once."""
        self.vb.power_cut(self.port, timeout=120)


@pytest.fixture(params=["rp2040", "esp32"])
def device(request, virtual_board):
    return Device(virtual_board(f"speed-e2e-{request.param}", request.param, speed="board", main=True))


def test_scpm_flows_at_board_speed_with_ksn_defaults(device, tmp_path, capsys):
    d = device
    timings: list[tuple[str, float]] = []

    async def step(name: str, coro):
        t0 = time.monotonic()
        res = await coro
        timings.append((name, time.monotonic() - t0))
        return res

    async def go() -> None:
        engine = KsnEngine(Store(tmp_path / "ksn.sqlite", storage_key=SKEY))  # the defaults
        server = KsnServer(engine, "127.0.0.1", d.ksn_port)
        o = Operations(server)
        await server.start()
        try:
            await step("enrol", o.enrol(d.addr, d.setup.hex(), "127.0.0.1", d.port, progress=QUIET))
            await step("SP key", o.provision([d.addr], "sp", 1, progress=QUIET))
            await step("maker key", o.provision([d.addr], "maker", progress=QUIET))
            await step("new user key", o.provision([d.addr], "user", new=True, progress=QUIET))
            res = await step("master-key update", o.rotate([d.addr], progress=QUIET))
            assert res[0]["new"] == 2
            # application frames under keys of different authority
            got = await step("APP_GET (user)", o.app(d.addr, "get", 3, progress=QUIET))
            assert got["value"] == b"0.1.0".hex()
            with pytest.raises(C.ScpmError) as e:  # the tariff needs the SP level
                await o.app(d.addr, "set", 2, b"\x00\x09", progress=QUIET)
            assert e.value.code == ErrorCode.AUTHORITY
            await step("APP_SET (SP)", o.app(d.addr, "set", 2, b"\x00\x09", kind="sp", idx=1, progress=QUIET))
            got = await step("APP_GET (maker)", o.app(d.addr, "get", 2, kind="maker", service=1, progress=QUIET))
            assert got["value"] == "0009"
            # MKU_COMMIT lost, and the device loses power before it hears the retransmission
            real_send = server.send
            lost = {"n": 0}

            def send(sends):
                t = engine.peer(d.addr).km
                if t is not None and t.kind == "mku" and t.phase == "commit" and not lost["n"]:
                    lost["n"] += 1
                    d.reboot()  # blocks the KSN's loop as long as the board boots: a harsh case
                    return
                real_send(sends)

            server.send = send
            res = await step("update, commit lost, reboot", o.rotate([d.addr], progress=QUIET))
            server.send = real_send
            assert lost["n"] == 1 and res[0]["new"] == 3
            sync = await step("SYNC", o.sync([d.addr], progress=QUIET))
            assert sync[0]["result"] == "in sync at generation 3", sync
            # the device asks for an update: the board's application restarts the device loop
            # with an MKU_REQUEST first (mpremote interrupts main.py at board speed)
            done = asyncio.Event()
            engine.listeners.append(lambda t: t.data.get("requested") and done.set())
            code = ("from tessera_fw.scpm import udp\nimport asyncio\nu = udp.start()\n"
                    "u._send(u.dev.request_update(3, udp.ticks_ms()), u.ksn_addr)\nasyncio.run(u.run())\n")
            d.target.remote.timeout = 90
            t0 = time.monotonic()
            await asyncio.to_thread(d.target.remote.run, "exec", "--no-follow", code)
            await asyncio.wait_for(done.wait(), 90)
            timings.append(("device-requested update", time.monotonic() - t0))
            assert engine.peer(d.addr).master == 4
            got = await step("APP_GET after all", o.app(d.addr, "get", 1, progress=QUIET))
            assert got["value"] == "00"
        finally:
            with capsys.disabled():
                st = d.vb.state() or {}
                print(f"\n{d.vb.board} at board speed (slow-down {st.get('slowdown')}x), KSN default timers "
                      f"{engine.timing}: " + ", ".join(f"{n} {s:.1f} s" for n, s in timings))
            await server.stop()
            engine.store.close()

    asyncio.run(asyncio.wait_for(go(), 240))
