"""True end-to-end: the host KSN (SQLite, asyncio UDP on loopback) against the firmware
running on virtual boards (MicroPython unix port, one per board profile), deployed with
tessera.boards.ops.deploy, configured through scpm.json and rebooted so that main.py starts
the device's UDP loop. Crashes are real: the KSN engine is abandoned mid-update and rebuilt
from SQLite; the board's interpreter is killed and the bridge boots it again."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket

import pytest

from tessera.boards import ops, profile
from tessera.boards.virtual import VirtualBoard, free_udp_port
from tessera.scpm import codec as C
from tessera.scpm.codec import ErrorCode, KeyKind
from tessera.scpm.ksn import KsnEngine
from tessera.scpm.server import KsnServer, Operations
from tessera.scpm.store import Store

pytestmark = pytest.mark.slow
SKEY = bytes(range(32))


class Killed(Exception):
    pass


class Board:
    def __init__(self, name: str, prof: str, addr: int, ksn_port: int) -> None:
        self.vb = VirtualBoard(f"scpm-e2e-{prof}", prof)
        self.addr = addr
        self.setup = os.urandom(16)
        self.port = free_udp_port()
        self.ksn_port = ksn_port
        self.target: ops.Target | None = None
        self.bridge_pid = 0

    def start(self) -> None:
        pty = self.vb.start(fresh=True)
        self.bridge_pid = self.vb.state()["pid"]
        self.target = ops.Target(profile.load(self.vb.board), pty, virtual=True)
        ops.deploy(self.target, with_main=True)
        cfg = {"address": f"{self.addr:08x}", "setup_key": self.setup.hex(), "port": self.port,
               "bind": "127.0.0.1", "ksn_host": "127.0.0.1", "ksn_port": self.ksn_port}
        (self.vb.fs / "scpm.json").write_text(json.dumps(cfg))
        self.reboot()

    def reboot(self, timeout: float = 15.0) -> None:
        """Power cut: kill the interpreter; the bridge boots it again and main.py starts."""
        self.vb.power_cut(self.port, timeout)


@pytest.fixture(scope="module")
def boards(tessera_var):
    ksn_port = free_udp_port()
    bs = [Board(p.name, p.name, 0x0A000100 + i, ksn_port) for i, p in enumerate(profile.load_all())]
    try:
        for b in bs:
            b.start()
        yield bs
    finally:
        for b in bs:
            if not b.vb.stop() and b.bridge_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(b.bridge_pid, signal.SIGTERM)


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return tmp_path_factory.mktemp("ksn") / "ksn.sqlite"


class Ksn:
    """The KSN process: engine on SQLite, UDP server on the boards' configured KSN port."""

    def __init__(self, db, port: int) -> None:
        self.engine = KsnEngine(Store(db, storage_key=SKEY), timeout=0.5, retries=8)
        self.server = KsnServer(self.engine, "127.0.0.1", port)
        self.ops = Operations(self.server)

    async def __aenter__(self) -> Ksn:
        await self.server.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.stop()
        self.engine.store.close()

    async def crash(self) -> None:
        """Die without any cleanup of the engine: only what reached SQLite survives."""
        await self.server.stop()
        self.engine.store.close()


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def _enrolled(k: Ksn, b: Board) -> None:
    p = k.engine.peer(b.addr)
    if p is None or p.state != "enrolled":
        await k.ops.enrol(b.addr, b.setup.hex(), "127.0.0.1", b.port, progress=lambda s: None)


def test_enrol_provision_rotate_and_authority(boards, db):
    async def go():
        async with Ksn(db, boards[0].ksn_port) as k:
            quiet = lambda s: None  # noqa: E731
            for b in boards:
                await k.ops.enrol(b.addr, b.setup.hex(), "127.0.0.1", b.port, progress=quiet)
            await k.ops.provision(None, "sp", 1, progress=quiet)
            await k.ops.provision(None, "maker", progress=quiet)
            res = await k.ops.rotate(None, progress=quiet)
            assert sorted((r["old"], r["new"]) for r in res) == [(1, 2)] * len(boards)
            for b in boards:
                assert (await k.ops.app(b.addr, "get", 3, progress=quiet))["value"] == b"0.1.0".hex()
                with pytest.raises(C.ScpmError) as e:  # tariff needs the SP level
                    await k.ops.app(b.addr, "set", 2, b"\x00\x09", progress=quiet)
                assert e.value.code == ErrorCode.AUTHORITY
                await k.ops.app(b.addr, "set", 2, b"\x00\x09", kind="sp", idx=1, progress=quiet)
                for svc in (1, 2, 3):
                    got = await k.ops.app(b.addr, "get", 2, kind="maker", service=svc, progress=quiet)
                    assert got["value"] == "0009"
            rec = k.engine.store.device(boards[0].addr)
            assert rec.master_gen == 2 and rec.held == {"1/0": 1, "2/1": 1, "3/0": 1}

    run(go())


@pytest.mark.parametrize("when", ["after-pending-persisted", "after-mku-start"])
def test_ksn_crash_mid_update_recovers_through_sync(boards, db, when):
    b = boards[0]

    async def go():
        async with Ksn(db, b.ksn_port) as k:
            await _enrolled(k, b)
            before = k.engine.peer(b.addr).master
            crashed = asyncio.Event()
            if when == "after-pending-persisted":
                real_put = k.engine.store.put_device_key

                def put(addr, kind, idx, gen, status, secret, txid=0):
                    real_put(addr, kind, idx, gen, status, secret, txid)
                    if status == "pending":  # killed right after the write, MKU_COMMIT never leaves
                        crashed.set()
                        raise Killed("KSN killed")

                k.engine.store.put_device_key = put
            else:
                real_send = k.server.send

                def send(sends):
                    real_send(sends)
                    crashed.set()
                    k.server.received = lambda data, addr: None  # dead: hears nothing any more

                k.server.send = send
            t, sends = k.engine.rotate(b.addr)
            with contextlib.suppress(Killed):
                k.server.send(sends)
            await asyncio.wait_for(crashed.wait(), 10)
            await asyncio.sleep(0.3)
            await k.crash()
        async with Ksn(db, b.ksn_port) as k:  # restart from SQLite
            p = k.engine.peer(b.addr)
            assert p.needs_sync == (when == "after-pending-persisted")
            res = await k.ops.sync([b.addr], progress=lambda s: None)
            assert res[0]["ok"], res
            after = k.engine.peer(b.addr).master
            assert after == (before % 255 + 1 if when == "after-pending-persisted" else before)
            assert k.engine.peer(b.addr).pending is None
            assert (await k.ops.app(b.addr, "get", 1, progress=lambda s: None))["value"] == "00"
            res = await k.ops.rotate([b.addr], progress=lambda s: None)
            assert res[0]["new"] == after % 255 + 1

    run(go())


def test_device_rebooted_mid_update(boards, db):
    b = boards[-1]

    async def go():
        async with Ksn(db, b.ksn_port) as k:
            await _enrolled(k, b)
            before = k.engine.peer(b.addr).master
            real_send = k.server.send
            state = {"dropped": 0}

            def send(sends):
                t = k.engine.peer(b.addr).km
                if t is not None and t.kind == "mku" and t.phase == "commit" and not state["dropped"]:
                    state["dropped"] += 1  # MKU_COMMIT lost; the device then loses power
                    b.reboot()
                    return
                real_send(sends)

            k.server.send = send
            res = await k.ops.rotate([b.addr], progress=lambda s: None)
            assert state["dropped"] == 1 and res[0]["new"] == before + 1
            k.server.send = real_send
            sync = await k.ops.sync([b.addr], progress=lambda s: None)
            assert sync[0]["result"] == f"in sync at generation {before + 1}"
            assert (await k.ops.app(b.addr, "get", 3, progress=lambda s: None))["value"] == b"0.1.0".hex()

    run(go())


def _raw_app_frame(eng: KsnEngine, b: Board) -> tuple[int, bytes]:
    t, sends = eng.app_get(b.addr, 1)
    return t.txid, sends[0].frame


def test_replayed_tampered_and_foreign_frames_are_refused(boards, db):
    b = boards[0]

    async def go():
        async with Ksn(db, b.ksn_port) as k:
            await _enrolled(k, b)
            await k.ops.app(b.addr, "get", 1, progress=lambda s: None)
        # a raw controller socket holding the KSN's keys (the engine stays offline: the
        # frames are built by it and sent by hand, answers read by hand)
        eng = KsnEngine(Store(db, storage_key=SKEY))
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(3)
        dst = ("127.0.0.1", b.port)
        try:
            def ask(frames: list[bytes], good_txid: int) -> list[C.AppResult]:
                for f in frames:
                    sock.sendto(f, dst)
                answers = []
                with contextlib.suppress(socket.timeout):
                    while True:
                        data, _ = sock.recvfrom(2048)
                        answers.append(data)
                        sock.settimeout(0.4)  # wait a little for any further (wrong) answer
                sock.settimeout(3)
                out = []
                for a in answers:
                    r = C.receive(a, eng.address, lambda sa, shd: eng._key(eng.peer(sa), (int(shd.kind), shd.index, shd.gen)),
                                  lambda sa, shd: C.ReplayWindow())
                    out.append(C.decode_pdu(r.padata))
                return out

            # genuine frame answered once; its replay is refused silently
            txid, f = _raw_app_frame(eng, b)
            got = ask([f, f], txid)
            assert [a.txid for a in got] == [txid] and got[0].status == 0
            # reordered beyond the window: 40 newer frames first, then an old one
            old_txid, old = _raw_app_frame(eng, b)
            newer = [_raw_app_frame(eng, b) for _ in range(40)]
            got = ask([f for _, f in newer] + [old], -1)
            assert sorted(a.txid for a in got) == sorted(t for t, _ in newer)
            # tampered at every byte position, truncated, wrong key, other generation,
            # rogue KSN key management, then one good frame: only the good one is answered
            txid, good = _raw_app_frame(eng, b)
            bad = []
            _, f = _raw_app_frame(eng, b)
            for i in range(len(f)):
                x = bytearray(f)
                x[i] ^= 0x20
                bad.append(bytes(x))
            bad += [f[:n] for n in range(0, len(f), 5)]
            shd = C.SecureHeader(C.Service.AUTH_CONF, KeyKind.USER, 0, 1)
            bad.append(C.seal(C.KSN_ADDRESS, b.addr, shd, 10**6, C.AppGet(9, 1).encode(), C.UsageKey(bytes(16))))
            bad.append(C.seal(C.KSN_ADDRESS, b.addr, C.SecureHeader(C.Service.AUTH_CONF, KeyKind.USER, 0, 7), 10**6,
                              C.AppGet(9, 1).encode(), eng.home[(1, 0, 1)]))
            bad.append(C.seal(C.KSN_ADDRESS, b.addr, C.SecureHeader(C.Service.AUTH_CONF, KeyKind.MASTER, 0, 9), 10**6,
                              C.SyncReq(9, bytes(16)).encode(), C.UsageKey(bytes(16))))
            got = ask(bad + [good], txid)
            assert [a.txid for a in got] == [txid], got
            # wrong KSN: key management under the user key from another node gets KM_ERROR(WRONG_KSN)
            rogue = C.seal(0x0A0000EE, b.addr, shd, 1, C.SpKeyInit(7, 0, 9, bytes(16)).encode(), eng.home[(1, 0, 1)])
            sock.sendto(rogue, dst)
            data, _ = sock.recvfrom(2048)
            r = C.receive(data, 0x0A0000EE, lambda sa, s: eng.home[(1, 0, 1)], lambda sa, s: C.ReplayWindow())
            err = C.decode_pdu(r.padata)
            assert isinstance(err, C.KmError) and err.code == ErrorCode.WRONG_KSN
        finally:
            sock.close()
            # persist what the raw controller used, so the KSN never reuses its SNFs
            eng.store.close()
        async with Ksn(db, b.ksn_port) as k:  # the device and the KSN keep serving
            assert (await k.ops.app(b.addr, "get", 3, progress=lambda s: None))["value"] == b"0.1.0".hex()

    run(go())


def test_device_requested_update(boards, db):
    b = boards[0]

    async def go():
        async with Ksn(db, b.ksn_port) as k:
            await _enrolled(k, b)
            before = k.engine.peer(b.addr).master
            done = asyncio.Event()
            k.engine.listeners.append(lambda t: t.data.get("requested") and done.set())
            # The board's application asks for an update: interrupt main.py, start the device
            # loop again with a request first (mpremote returns at once, the loop keeps running).
            code = ("from tessera_fw.scpm import udp\nimport asyncio\nu = udp.start()\n"
                    "u._send(u.dev.request_update(3, udp.ticks_ms()), u.ksn_addr)\nasyncio.run(u.run())\n")
            # mpremote's Ctrl-C stops main.py (also after the power cuts of earlier tests)
            b.target.remote.timeout = 20
            await asyncio.to_thread(b.target.remote.run, "exec", "--no-follow", code)
            await asyncio.wait_for(done.wait(), 20)
            assert k.engine.peer(b.addr).master == before + 1
            # junk at the KSN from a stranger while it works
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for junk in (b"\x11" * 40, os.urandom(300), b""):
                    s.sendto(junk, ("127.0.0.1", b.ksn_port))
            assert (await k.ops.app(b.addr, "get", 1, progress=lambda s: None))["value"] == "00"
            assert k.engine.errors
        b.reboot()  # back to main.py

    run(go())
