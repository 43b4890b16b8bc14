"""Demo scenario: the SCPM key setting node with the virtual boards as devices.

The KSN (SQLite registry with encrypted keys, asyncio UDP on loopback) enrols every board
with the setup key from its "label", installs a service provider key, rotates the master
keys with Diffie-Hellman, exchanges secure application frames under keys of different
authority, shows a replayed frame being refused, and recovers from a KSN crash in the
middle of an update through key synchronisation.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time

from tessera.boards.virtual import VirtualBoard, free_udp_port
from tessera.demo import DemoContext
from tessera.paths import firmware_dir
from tessera.scpm import codec as C
from tessera.scpm.ksn import KsnEngine
from tessera.scpm.server import KsnServer, Operations, fmt_addr
from tessera.scpm.store import Store

TITLE = "SCPM: key setting node enrols boards, rotates master keys, refuses replays"
ORDER = 10


class _Device:
    def __init__(self, name: str, target, addr: int, ksn_port: int) -> None:
        self.name, self.target, self.addr = name, target, addr
        self.vb = VirtualBoard(f"demo-{name}", target.profile.name)
        self.setup = os.urandom(16)  # the label of a factory-fresh device
        self.port = free_udp_port()
        cfg = {"address": f"{addr:08x}", "setup_key": self.setup.hex(), "port": self.port, "bind": "127.0.0.1",
               "ksn_host": "127.0.0.1", "ksn_port": ksn_port}
        (self.vb.fs / "scpm.json").write_text(json.dumps(cfg))
        shutil.copy(firmware_dir() / "main.py", self.vb.fs / "main.py")

    def restore(self) -> None:
        """Leave the board as the board scenario left it: no main.py, idle at the REPL."""
        for f in ("main.py", "scpm.json"):
            with contextlib.suppress(FileNotFoundError):
                (self.vb.fs / f).unlink()
        self.vb.power_cut()


def run(ctx: DemoContext) -> None:
    if not ctx.boards:
        raise RuntimeError("no virtual boards (the board scenario must run first)")
    ksn_port = free_udp_port()
    devices = [_Device(name, t, 0x0A000101 + i, ksn_port) for i, (name, t) in enumerate(sorted(ctx.boards.items()))]
    try:
        for d in devices:
            d.vb.power_cut(d.port)
            ctx.step(f"{d.name}: SCPM device {fmt_addr(d.addr)} up on udp 127.0.0.1:{d.port} (main.py, scpm.json)")
        asyncio.run(asyncio.wait_for(_scenario(ctx, devices, ksn_port), 120))
    finally:
        for d in devices:
            with contextlib.suppress(Exception):
                d.restore()


async def _scenario(ctx: DemoContext, devices: list[_Device], ksn_port: int) -> None:
    db = ctx.workdir / "scpm-ksn.sqlite"
    quiet = lambda s: None  # noqa: E731

    def open_ksn() -> tuple[KsnEngine, KsnServer, Operations]:
        engine = KsnEngine(Store(db), timeout=0.5, retries=8)
        server = KsnServer(engine, "127.0.0.1", ksn_port)
        return engine, server, Operations(server)

    engine, server, ops = open_ksn()
    await server.start()
    try:
        ctx.step(f"KSN {fmt_addr(engine.address)} on udp 127.0.0.1:{ksn_port}, registry {db.name} "
                 f"(keys AES-GCM encrypted under {db.name}.key, mode 0600)")
        t0 = time.monotonic()
        for d in devices:
            await ops.enrol(d.addr, d.setup.hex(), "127.0.0.1", d.port, name=d.name, progress=ctx.step)
        ctx.fact(f"enrolled {len(devices)} boards with the Annex A challenge in {time.monotonic() - t0:.2f} s")
        await ops.provision(None, "sp", 1, progress=ctx.step)
        t0 = time.monotonic()
        for _ in range(2):
            await ops.rotate(None, progress=ctx.step)
        gens = sorted({engine.peer(d.addr).master for d in devices})
        ctx.fact(f"{2 * len(devices)} DH master key updates (2048-bit MODP, MicroPython side) in "
                 f"{time.monotonic() - t0:.2f} s; master key generation now {gens}")

        d = devices[0]
        got = await ops.app(d.addr, "get", 3, progress=ctx.step)
        try:
            await ops.app(d.addr, "set", 2, b"\x00\x07", progress=quiet)
            raise RuntimeError("tariff set with the user key")
        except C.ScpmError as e:
            ctx.step(f"{d.name}: set tariff under the user key -> {e}")
        await ops.app(d.addr, "set", 2, b"\x00\x07", kind="sp", idx=1, progress=ctx.step)
        ctx.fact(f"{d.name}: firmware property {bytes.fromhex(got['value']).decode()!r} read under the user key; "
                 "tariff write refused under the user key (ERR_AUTHORITY), accepted under the SP key")

        # Replay: the same secure frame twice; the device answers once and drops the copy.
        # Then the device's answer is replayed to the KSN, which drops it with ERR_REPLAY.
        t, sends = engine.app_get(d.addr, 1)
        heard: list[bytes] = []
        real_received = server.received
        server.received = lambda data, addr: (heard.append(data), real_received(data, addr))
        server.send(sends)
        await asyncio.wait_for(_done(t), 10)
        server.transport.sendto(sends[0].frame, ("127.0.0.1", d.port))
        await asyncio.sleep(0.5)
        server.received = real_received
        if len(heard) != 1:
            raise RuntimeError(f"expected one answer to a frame sent twice, got {len(heard)}")
        before = engine.errors[C.ErrorCode.REPLAY]
        server.received(heard[0], ("127.0.0.1", d.port))
        if engine.errors[C.ErrorCode.REPLAY] != before + 1:
            raise RuntimeError("the KSN accepted a replayed answer")
        ctx.fact(f"{d.name}: an APP_GET frame sent twice (SNF {C.decode(sends[0].frame).snf}) was answered once, "
                 "the copy silently dropped by the device; the device's answer replayed to the KSN: ERR_REPLAY")

        # Crash: the KSN dies right after persisting the pending master key of an update.
        real_put = engine.store.put_device_key

        def put(addr, kind, idx, gen, status, secret, txid=0):
            real_put(addr, kind, idx, gen, status, secret, txid)
            if status == "pending":  # dead from here on: sends nothing, hears nothing
                server.send = lambda sends: None
                server.received = lambda data, addr: None

        engine.store.put_device_key = put
        t, sends = engine.rotate(d.addr)
        server.send(sends)
        for _ in range(200):
            if any(k.status == "pending" for k in engine.store.device_keys(d.addr)):
                break
            await asyncio.sleep(0.05)
        dropped = sum(engine.errors.values())
        await server.stop()
        engine.store.close()
        ctx.step(f"KSN killed mid-update of {d.name} (pending master key in SQLite, MKU_COMMIT never sent)")
    except BaseException:
        await server.stop()
        engine.store.close()
        raise

    engine, server, ops = open_ksn()
    await server.start()
    try:
        res = await ops.sync([d.addr], progress=ctx.step)
        res2 = await ops.app(d.addr, "get", 1, progress=quiet)
        ctx.fact(f"KSN restarted from SQLite: {res[0]['result']}; {d.name} reachable again (power = {res2['value']})")
        ctx.fact("KSN device table: " + ", ".join(f"{r['name']} master gen {r['master_gen']}" for r in ops.devices())
                 + f"; {dropped} bad frame(s) dropped by the KSN before the crash")
    finally:
        await server.stop()
        engine.store.close()


async def _done(t) -> None:
    while not t.finished:
        await asyncio.sleep(0.01)
    if t.error:
        raise t.error
