"""asyncio transport for the KSN engine (profile section 9: one general frame per UDP datagram,
port 24767), the operations the CLI runs on it, and a local control socket so that CLI
commands reach a running `tessera ksn serve` instead of opening the database twice.

The control socket (its private directory, peer credentials and limits) is control.py.
One process owns a KSN database at a time (an exclusive lock next to the database): two
engines on one database would each keep their own send counters in memory and could reuse
an SNF under the same key (profile section 4 forbids that).
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tessera.errors import TesseraError
from tessera.scpm import codec as C
from tessera.scpm.codec import KeyKind, ScpmError, Service
from tessera.scpm.control import ControlServer, control_path
from tessera.scpm.ksn import KsnEngine, Send, Timing, Txn
from tessera.scpm.store import Store

log = logging.getLogger("tessera.scpm.server")

SUMMARY_EVERY = 60.0  # seconds between two summaries of dropped frames

Progress = Callable[[str], None]


class DbLock:
    def __init__(self, db: Path) -> None:
        self.path = db.with_name(db.name + ".lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise TesseraError(f"another KSN process is using {self.path.with_suffix('')} "
                               "(stop it, or run the command while `tessera ksn serve` is up)") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: KsnServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr) -> None:
        self.server.received(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error: %s", exc)


class KsnServer:
    """The engine on a UDP socket, with its timers. All engine calls happen on the loop."""

    def __init__(self, engine: KsnEngine, host: str = "127.0.0.1", port: int = C.PORT,
                 summary_every: float = SUMMARY_EVERY) -> None:
        self.engine = engine
        self.host, self.port = host, port
        self.transport: asyncio.DatagramTransport | None = None
        self._wake = asyncio.Event()
        self._timer: asyncio.Task | None = None
        self._stopping = False
        self.received_count = 0
        self.internal_errors = 0
        # Dropped frames are summarised, never logged one per datagram (issue 11 #10).
        self.summary_every = summary_every
        self._summarised: Counter = Counter()
        self._summarised_internal = 0
        self._last_summary = time.monotonic()
        engine.listeners.append(self._on_txn)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=(self.host, self.port))
        except OSError as e:
            raise TesseraError(f"cannot bind the KSN UDP socket {self.host}:{self.port}: {e.strerror}") from None
        self.port = self.transport.get_extra_info("sockname")[1]
        self._timer = asyncio.create_task(self._timers())
        log.debug("KSN %#010x listening on udp %s:%d", self.engine.address, self.host, self.port)

    async def stop(self) -> None:
        # A flag, not Task.cancel(): on Python 3.11 wait_for() can swallow a cancellation
        # that races with its inner future completing.
        self._stopping = True
        self._wake.set()
        if self._timer:
            await self._timer
        if self.transport:
            self.transport.close()
            await asyncio.sleep(0)  # the socket closes on the next loop iteration

    def _on_txn(self, t: Txn) -> None:
        if t.kind == "mku" and t.data.get("requested") and not t.error:
            log.info("device-requested master key update of %#010x done (generation %s)", t.addr, t.result)

    # -------------------------------------------------------------- datagrams
    def received(self, data: bytes, addr) -> None:
        self.received_count += 1
        try:
            out = self.engine.handle(data)
        except Exception:  # a bug must not stop the service for every other device
            self.internal_errors += 1
            if self.internal_errors == 1:  # the first with its traceback; the rest are counted
                log.exception("unexpected failure handling a datagram from %s", addr)
            return
        self.send(out)

    def summarise(self, force: bool = False) -> None:
        """One log line for the frames dropped since the last summary (at most one per
        `summary_every` seconds), by error code; nothing when none were."""
        now = time.monotonic()
        if not force and now - self._last_summary < self.summary_every:
            return
        new = self.engine.errors - self._summarised
        internal = self.internal_errors - self._summarised_internal
        if new or internal:
            n = sum(new.values())
            codes = ", ".join(f"ERR_{c.name} {k}" for c, k in sorted(new.items(), key=lambda x: -x[1]))
            log.warning("dropped %d frame(s) that failed the checks in the last %.0f s (%s)%s", n,
                        now - self._last_summary, codes or "none",
                        f"; {internal} failed with an internal error" if internal else "")
        self._summarised = Counter(self.engine.errors)
        self._summarised_internal = self.internal_errors
        self._last_summary = now

    def send(self, sends: list[Send]) -> None:
        for s in sends:
            dev = self.engine.store.device(s.addr)
            if dev is None or self.transport is None:
                log.warning("no endpoint for %#010x", s.addr)
                continue
            self.transport.sendto(s.frame, (dev.host, dev.port))
        self._wake.set()

    async def _timers(self) -> None:
        while not self._stopping:
            nd = self.engine.next_deadline()
            delay = 0.5 if nd is None else max(0.0, nd - self.engine.clock())
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=min(delay, 0.5))
            if self._stopping:
                self.summarise(force=True)
                return
            try:
                self.send(self.engine.poll())
                self.summarise()
            except Exception:
                log.exception("timer failure")

    # -------------------------------------------------------------- transactions
    async def run(self, started: tuple[Txn, list[Send]], timeout: float | None = None) -> Txn:
        """Send a started transaction and wait for the engine to end it (it always does, by
        its retry schedule; `timeout` is only a safety net)."""
        t, sends = started
        timeout = timeout if timeout is not None else self.engine.timing.longest()
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        t.add_done_callback(lambda txn: fut.done() or fut.set_result(txn))
        self.send(sends)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise TesseraError(f"{t.kind} of {t.addr:#010x} did not finish within {timeout:.0f} s") from None
        return t


def parse_addr(s: str) -> int:
    """A node address: 0x0A000002, 167772162, or 10.0.0.2."""
    try:
        if s.count(".") == 3:
            a = int.from_bytes(bytes(int(x) for x in s.split(".")), "big")
        else:
            a = int(s, 0)
    except ValueError:
        raise TesseraError(f"bad node address {s!r} (use 0x0A000002 or 10.0.0.2)") from None
    if not 0 < a <= 0xFFFFFFFF:
        raise TesseraError(f"node address {s!r} out of range (1..0xFFFFFFFF)")
    return a


def fmt_addr(a: int) -> str:
    return f"0x{a:08X}"


def _checked(t: Txn) -> Txn:
    if t.error is not None:
        raise ScpmError(t.error.code, f"{t.kind} {fmt_addr(t.addr)}: {t.error}")
    return t


class Operations:
    """What the CLI can ask of a KSN; runs on the loop that owns the server."""

    def __init__(self, server: KsnServer) -> None:
        self.server = server
        self.engine = server.engine

    def _targets(self, addrs: list[int] | None) -> list[int]:
        if addrs:
            for a in addrs:
                if self.engine.peer(a) is None:
                    raise TesseraError(f"unknown device {fmt_addr(a)} (enrol it first)")
            return addrs
        return [d.addr for d in self.engine.store.devices() if d.state == "enrolled"]

    async def enrol(self, addr: int, setup_key: str, host: str, port: int, name: str = "", progress: Progress = print) -> dict:
        key = _hex_key(setup_key, "the setup key (from the device label)")
        self.engine.register(addr, host, port, name)
        progress(f"enrolling {fmt_addr(addr)} at {host}:{port} ...")
        t = _checked(await self.server.run(self.engine.enrol(addr, key)))
        progress(f"{fmt_addr(addr)} enrolled: master key generation {t.result}, user key generation "
                 f"{self.engine.peer(addr).held.get('1/0')}")
        return {"addr": addr, "master_gen": t.result}

    async def provision(self, addrs: list[int] | None, kind: str, idx: int = 0, new: bool = False,
                        key: str | None = None, progress: Progress = print) -> list[dict]:
        k = {"sp": KeyKind.SP, "maker": KeyKind.MAKER, "user": KeyKind.USER}[kind]
        if new or key or (int(k), idx) not in self.engine.home_gen:
            raw = _hex_key(key, f"the {kind} key") if key else None
            gen = self.engine.new_home_key(k, idx, raw)
            progress(f"{kind} key index {idx}: new generation {gen}")
        out = []
        for a in self._targets(addrs):
            t = _checked(await self.server.run(self.engine.provision(a, k, idx)))
            progress(f"{fmt_addr(a)}: {kind} key index {idx} generation {t.result} installed")
            out.append({"addr": a, "gen": t.result})
        return out

    async def sync(self, addrs: list[int] | None, progress: Progress = print) -> list[dict]:
        out = []
        targets = self._targets(addrs) if addrs else [d.addr for d in self.engine.store.devices()
                                                      if d.master_gen or d.state == "enrolling"]
        for a in targets:
            try:
                t = await self.server.run(self.engine.sync(a))
            except ScpmError as e:  # e.g. an enrolment that never got as far as a master key
                progress(f"{fmt_addr(a)}: cannot sync: {e}")
                out.append({"addr": a, "ok": False, "result": str(e)})
                continue
            msg = t.result if not t.error else f"FAILED {t.error}"
            if t.kind == "mku" and not t.error:
                msg = f"update completed, master key generation {t.result}"
            progress(f"{fmt_addr(a)}: {msg}")
            out.append({"addr": a, "ok": not t.error, "result": str(msg)})
        failed = [r for r in out if not r["ok"]]
        if failed:  # like rotate and provision: the CLI exits 2 (docs/scpm.md)
            raise TesseraError(f"{len(failed)} of {len(out)} key synchronisations failed")
        return out

    async def rotate(self, addrs: list[int] | None, parallel: int = 16, progress: Progress = print) -> list[dict]:
        targets = self._targets(addrs)
        sem = asyncio.Semaphore(parallel)
        done = [0]
        results: list[dict] = []

        async def one(a: int) -> None:
            async with sem:
                t0 = time.monotonic()
                p = self.engine.peer(a)
                old = p.master
                try:
                    if p.needs_sync or p.pending is not None:
                        await self.server.run(self.engine.sync(a))
                        old = self.engine.peer(a).master
                    t = _checked(await self.server.run(self.engine.rotate(a)))
                    res = {"addr": a, "ok": True, "old": old, "new": t.result}
                    msg = f"master key generation {old} -> {t.result}"
                except TesseraError as e:
                    res, msg = {"addr": a, "ok": False, "error": str(e)}, f"FAILED: {e}"
                done[0] += 1
                progress(f"[{done[0]}/{len(targets)}] {fmt_addr(a)} {msg} ({time.monotonic() - t0:.2f} s)")
                results.append(res)

        await asyncio.gather(*(one(a) for a in targets))
        failed = [r for r in results if not r["ok"]]
        if failed:
            raise TesseraError(f"{len(failed)} of {len(targets)} master key updates failed")
        return results

    async def app(self, addr: int, op: str, prop: int, value: bytes = b"", kind: str = "user", idx: int = 0,
                  service: int = 3, progress: Progress = print) -> dict:
        k = {"user": KeyKind.USER, "sp": KeyKind.SP, "maker": KeyKind.MAKER}[kind]
        kw = {"kind": k, "idx": idx, "service": Service(service)}
        started = self.engine.app_get(addr, prop, **kw) if op == "get" else self.engine.app_set(addr, prop, value, **kw)
        t = _checked(await self.server.run(started))
        status, val = t.result
        if status:
            raise ScpmError(C.ErrorCode(status) if status in C.ErrorCode._value2member_map_ else C.ErrorCode.MALFORMED,
                            f"device refused {op} of property {prop}")
        progress(f"{fmt_addr(addr)} property {prop} = {val.hex()} {_printable(val)}")
        return {"addr": addr, "prop": prop, "value": val.hex()}

    def devices(self) -> list[dict]:
        out = []
        for d in self.engine.store.devices():
            p = self.engine.peer(d.addr)
            out.append({"addr": d.addr, "name": d.name, "endpoint": f"{d.host}:{d.port}", "state": d.state,
                        "master_gen": d.master_gen, "pending_gen": p.pending.gen if p and p.pending else 0,
                        "needs_sync": bool(p and p.needs_sync), "held": d.held, "last_error": d.last_error})
        return out


def _hex_key(text: str, what: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 16:  # the value itself is never repeated
        raise TesseraError(f"{what} must be 32 hex digits (16 bytes)")
    return raw


def _printable(b: bytes) -> str:
    try:
        s = b.decode("ascii")
    except UnicodeDecodeError:
        return ""
    return f"({s!r})" if s.isprintable() and s else ""


async def dispatch(ops: Operations, op: str, args: dict, progress: Progress):
    if op == "list":
        return ops.devices()
    fn = {"enrol": ops.enrol, "provision": ops.provision, "sync": ops.sync, "rotate": ops.rotate, "app": ops.app}.get(op)
    if fn is None:
        raise TesseraError(f"unknown operation {op!r}")
    if op == "app" and isinstance(args.get("value"), str):
        try:
            args = {**args, "value": bytes.fromhex(args["value"])}
        except ValueError:
            raise TesseraError("the property value must be hex") from None
    return await fn(**args, progress=progress)


def open_engine(db: Path | None, address: int = C.KSN_ADDRESS, timing: Timing | None = None) -> tuple[KsnEngine, DbLock]:
    store = Store(db)
    lock = DbLock(store.path)
    try:
        lock.acquire()
    except TesseraError:
        store.close()
        raise
    return KsnEngine(store, address=address, timing=timing), lock


async def serve(db: Path | None, host: str, port: int, address: int = C.KSN_ADDRESS, every: float | None = None,
                ready: Callable[[KsnServer], None] | None = None, stop: asyncio.Event | None = None,
                timing: Timing | None = None) -> None:
    """`tessera ksn serve`: UDP service, control socket, recovery SYNC at start, optional
    scheduled rotation of every device."""
    engine, lock = open_engine(db, address, timing)
    server = KsnServer(engine, host, port)
    ops = Operations(server)
    ctl = ControlServer(lambda op, args, progress: dispatch(ops, op, args, progress), control_path(engine.store.path))
    stop = stop or asyncio.Event()
    tasks: list[asyncio.Task] = []
    try:
        await server.start()
        await ctl.start()
        unresolved = [a for a, p in engine.peers.items() if p.needs_sync]
        if unresolved:
            log.info("recovering %d device(s) with an unfinished update", len(unresolved))
            tasks.append(asyncio.create_task(_recover(ops, unresolved)))
        if every:
            tasks.append(asyncio.create_task(_schedule(ops, every, stop)))
        if ready:
            ready(server)
        await stop.wait()
    finally:
        for t in tasks:
            t.cancel()
        await ctl.stop()
        await server.stop()
        engine.store.close()
        lock.release()


async def _recover(ops: Operations, addrs: list[int]) -> None:
    try:
        await ops.sync(addrs, progress=log.info)
    except TesseraError as e:  # the devices stay marked "needs sync"; rotate syncs them first
        log.warning("recovery at start: %s", e)


async def _schedule(ops: Operations, every: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
        if stop.is_set():
            return
        log.info("scheduled master key update of every device")
        try:
            await ops.rotate(None, progress=log.info)
        except TesseraError as e:
            log.warning("scheduled update: %s", e)
