"""The SCPM key setting node (KSN): enrol devices, install keys, rotate master keys, and read
and write application properties, with results as values and failures as exceptions.

    async with await AsyncKsn.open("ksn.sqlite", create=True) as ksn:
        await ksn.enrol(0x0A000002, setup_key, "192.0.2.7", 24767)
        await ksn.rotate()

`Ksn` is the same API for plain synchronous scripts. When a `tessera ksn serve` (or
`serve_ksn`) is running on the database, every operation goes to it through its control
socket (one process owns a database); else the KSN runs in this process, on its own UDP
port, for as long as the object is open. Keys are `bytes` (16); they are never logged.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tessera.api._sync import _LoopOwner
from tessera.api.errors import (BatchFailed, DeviceError, InvalidKey, KsnBusy, KsnError, NoDatabase,
                                UnknownDevice)
from tessera.errors import TesseraError
from tessera.scpm import codec as _C
from tessera.scpm.codec import ErrorCode, KeyKind, ScpmError
from tessera.scpm.ksn import Timing

Progress = Callable[[str], None]
"""A callback for progress lines ("0x0A000002 enrolled: ..."); None stays silent."""

KSN_PORT = _C.PORT
KSN_ADDRESS = _C.KSN_ADDRESS
_KINDS = {"sp": KeyKind.SP, "maker": KeyKind.MAKER, "user": KeyKind.USER}


@dataclass(frozen=True)
class Enrolled:
    addr: int
    master_gen: int


@dataclass(frozen=True)
class KeyInstalled:
    addr: int
    kind: str  # "sp", "maker" or "user"
    index: int
    gen: int


@dataclass(frozen=True)
class Rotated:
    addr: int
    old_gen: int
    new_gen: int


@dataclass(frozen=True)
class Synced:
    addr: int
    result: str  # what the synchronisation found or did, e.g. "update completed, ..."


@dataclass(frozen=True)
class DeviceInfo:
    addr: int
    name: str
    host: str
    port: int
    state: str  # "enrolling", "enrolled"
    master_gen: int
    pending_gen: int  # a master key update in flight (0: none)
    needs_sync: bool  # an update was interrupted; `sync` (or `rotate`) resolves it
    keys: dict[str, int] = field(default_factory=dict)  # "sp[1]", "user", "maker" -> generation held
    last_error: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # `tessera ksn list --json`

    @property
    def address(self) -> str:
        return format_addr(self.addr)


@dataclass(frozen=True)
class KsnEndpoint:
    """Where a serving KSN is: given to `serve_ksn(ready=...)`."""

    host: str
    port: int
    address: int
    db: Path


def parse_addr(text: str) -> int:
    """A node address from text: "0x0A000002", "167772162" or "10.0.0.2"."""
    from tessera.scpm.server import parse_addr as parse

    return parse(text)


def format_addr(addr: int) -> str:
    """0x0A000002"""
    return f"0x{addr:08X}"


def _key_name(k: str) -> str:
    kind, idx = (int(x) for x in k.split("/"))
    name = KeyKind(kind).name.lower()
    return f"{name}[{idx}]" if kind == KeyKind.SP else name


def _info(d: dict) -> DeviceInfo:
    host, _, port = d["endpoint"].rpartition(":")
    return DeviceInfo(d["addr"], d["name"], host, int(port), d["state"], d["master_gen"], d["pending_gen"],
                      d["needs_sync"], {_key_name(k): g for k, g in sorted(d["held"].items())}, d["last_error"], d)


def _check_key(key: bytes, what: str) -> str:
    if not isinstance(key, (bytes, bytearray)) or len(key) != 16:
        raise InvalidKey(f"{what} must be 16 bytes")
    return bytes(key).hex()


def _kind(kind: str | KeyKind) -> str:
    if isinstance(kind, KeyKind):
        return kind.name.lower()
    if kind not in _KINDS:
        raise ValueError(f"key kind {kind!r}: use 'sp', 'maker' or 'user'")
    return kind


def list_devices(db: str | Path) -> list[DeviceInfo]:
    """The devices in a KSN database, read-only (works while a server runs on it)."""
    from tessera.scpm.ksn import KsnEngine
    from tessera.scpm.server import Operations
    from tessera.scpm.store import Store

    path = Path(db)
    if not path.exists():
        raise NoDatabase(f"no KSN database at {path}")
    store = Store(path)
    try:
        ops = Operations.__new__(Operations)
        ops.engine = KsnEngine(store)  # read-only: no socket, nothing sent
        return [_info(d) for d in ops.devices()]
    finally:
        store.close()


class AsyncKsn:
    """A KSN database opened for operations (asyncio). Open with `await AsyncKsn.open(db)`;
    close with `await ksn.close()` or `async with`."""

    def __init__(self) -> None:  # use AsyncKsn.open
        self.db: Path = Path()
        self._conn_path: Path | None = None
        self._server = None
        self._ops = None
        self._lock = None

    @classmethod
    async def open(cls, db: str | Path, *, create: bool = False, host: str = "127.0.0.1", port: int = KSN_PORT,
                   address: int = KSN_ADDRESS, timing: Timing | None = None, use_server: bool = True) -> AsyncKsn:
        """Open the database `db` (`create=True` makes a new one, with its storage key in
        <db>.key, mode 0600). With a server running on it (and `use_server`), operations go
        there; else this process binds UDP `host`:`port` (0: any free port) as the KSN.
        `timing` sets retransmission (tessera.scpm.ksn.Timing; Timing.configured(timeout,
        retries, dh_timeout) for the common knobs)."""
        from tessera.scpm import control
        from tessera.scpm.control import control_path

        self = cls()
        self.db = Path(db)
        if not create and not self.db.exists():
            raise NoDatabase(f"no KSN database at {self.db} (`create=True` makes one)")
        ctl = control_path(self.db)
        if use_server:
            conn = await control.connect(ctl)
            if conn is not None:
                conn[1].close()
                self._conn_path = ctl
                return self
        await self._open_local(host, port, address, timing)
        return self

    async def _open_local(self, host: str, port: int, address: int, timing: Timing | None) -> None:
        from tessera.scpm.ksn import KsnEngine
        from tessera.scpm.server import DbLock, KsnServer, Operations
        from tessera.scpm.store import Store

        store = Store(self.db)
        lock = DbLock(store.path)
        try:
            lock.acquire()
        except TesseraError as e:
            store.close()
            raise KsnBusy(str(e)) from None
        engine = KsnEngine(store, address=address, timing=timing)
        server = KsnServer(engine, host, port)
        try:
            await server.start()
        except TesseraError as e:
            store.close()
            lock.release()
            raise KsnError(str(e)) from None
        self._server, self._ops, self._lock = server, Operations(server), lock

    @property
    def via_server(self) -> bool:
        """True when operations go to a running `tessera ksn serve`."""
        return self._conn_path is not None

    @property
    def port(self) -> int | None:
        """The UDP port this process serves the KSN on (None through a running server)."""
        return self._server.port if self._server else None

    async def close(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop()
            server.engine.store.close()
            self._lock.release()

    async def __aenter__(self) -> AsyncKsn:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ the transport
    async def _call(self, op: str, args: dict, progress: Progress | None) -> Any:
        """One operation: through the control socket, or on the in-process operations; a
        device's failure becomes DeviceError, the failures of a batch BatchFailed."""
        quiet = progress or (lambda s: None)
        if self._conn_path is not None:
            from tessera.scpm import control

            conn = await control.connect(self._conn_path)
            if conn is None:
                raise KsnError(f"the KSN server on {self.db} has stopped")
            wire = {**args, "value": args["value"].hex()} if "value" in args else args
            try:
                return await control.request(conn, op, wire, quiet)
            except KsnError:
                raise
            except TesseraError as e:
                raise KsnError(str(e)) from None
        if self._ops is None:
            raise KsnError("this KSN is closed")
        for a in args.get("addrs") or ([args["addr"]] if "addr" in args and op != "enrol" else []):
            if self._ops.engine.peer(a) is None:
                raise UnknownDevice(a)
        failed: dict[int, ScpmError | None] = {}

        def watch(t) -> None:  # every transaction the engine ends, for the per-device outcome
            if t.error is not None:
                failed[t.addr] = t.error
            elif t.kind in ("mku", "sync", "sp", "maker", "user", "enrol"):
                failed.pop(t.addr, None)

        engine = self._ops.engine
        engine.listeners.append(watch)
        try:
            return await getattr(self._ops, op)(**args, progress=quiet)
        except ScpmError as e:
            addr = args.get("addr")
            raise DeviceError(addr, e.code, str(e)) from None
        except (KsnError, InvalidKey):
            raise
        except TesseraError as e:
            if "addrs" in args:
                raise BatchFailed(str(e), sorted(failed)) from None
            raise KsnError(str(e)) from None
        finally:
            engine.listeners.remove(watch)

    # ------------------------------------------------------------------ operations
    async def enrol(self, addr: int, setup_key: bytes, host: str, port: int = KSN_PORT, name: str = "",
                    progress: Progress | None = None) -> Enrolled:
        """User key initialisation (profile 6.1) of the device `addr` at UDP `host`:`port`
        with the 16-byte setup key from its label; it gets its master key and the home's user
        key."""
        r = await self._call("enrol", {"addr": addr, "setup_key": _check_key(setup_key, "the setup key"),
                                       "host": host, "port": port, "name": name}, progress)
        return Enrolled(r["addr"], r["master_gen"])

    async def install_key(self, kind: str | KeyKind, devices: list[int] | None = None, index: int = 0,
                          new: bool = False, key: bytes | None = None,
                          progress: Progress | None = None) -> list[KeyInstalled]:
        """Install the home's `kind` key ("sp", "maker", "user"; index for SP keys) on
        `devices` (None: every enrolled device). The key is made on first use; `new` makes
        the next generation; `key` sets its value (16 bytes; also a new generation)."""
        k = _kind(kind)
        raw = _check_key(key, f"the {k} key") if key is not None else None
        r = await self._call("provision", {"addrs": devices, "kind": k, "idx": index, "new": new, "key": raw},
                             progress)
        return [KeyInstalled(x["addr"], k, index, x["gen"]) for x in r]

    async def install_sp_key(self, index: int, devices: list[int] | None = None, **kw: Any) -> list[KeyInstalled]:
        """A service provider key (index 0-255); see install_key."""
        return await self.install_key("sp", devices, index, **kw)

    async def install_maker_key(self, devices: list[int] | None = None, **kw: Any) -> list[KeyInstalled]:
        return await self.install_key("maker", devices, 0, **kw)

    async def install_user_key(self, devices: list[int] | None = None, **kw: Any) -> list[KeyInstalled]:
        return await self.install_key("user", devices, 0, **kw)

    async def rotate(self, devices: list[int] | None = None, parallel: int = 16,
                     progress: Progress | None = None) -> list[Rotated]:
        """Master key update with Diffie-Hellman (profile 6.3) of `devices` (None: every
        enrolled one), `parallel` at a time; a device left mid-update is synchronised first."""
        if not 1 <= parallel <= 1024:
            raise ValueError("parallel must be between 1 and 1024")
        r = await self._call("rotate", {"addrs": devices, "parallel": parallel}, progress)
        return sorted((Rotated(x["addr"], x["old"], x["new"]) for x in r), key=lambda x: x.addr)

    async def sync(self, devices: list[int] | None = None, progress: Progress | None = None) -> list[Synced]:
        """Key synchronisation (profile 6.5): finish or discard interrupted updates."""
        r = await self._call("sync", {"addrs": devices}, progress)
        return [Synced(x["addr"], x["result"]) for x in r]

    async def get(self, addr: int, prop: int, *, kind: str = "user", index: int = 0, service: int = 3,
                  progress: Progress | None = None) -> bytes:
        """Read application property `prop` of device `addr` under the home's `kind` key.
        A refusal raises DeviceError with the device's code (e.g. ErrorCode.AUTHORITY)."""
        r = await self._call("app", {"addr": addr, "op": "get", "prop": prop, "kind": _kind(kind), "idx": index,
                                     "service": service}, progress)
        return bytes.fromhex(r["value"])

    async def set(self, addr: int, prop: int, value: bytes, *, kind: str = "user", index: int = 0,
                  service: int = 3, progress: Progress | None = None) -> bytes:
        """Write application property `prop`; returns the value the device now holds."""
        r = await self._call("app", {"addr": addr, "op": "set", "prop": prop, "value": bytes(value),
                                     "kind": _kind(kind), "idx": index, "service": service}, progress)
        return bytes.fromhex(r["value"])

    async def devices(self) -> list[DeviceInfo]:
        """Every device in the registry with its state and the key generations it holds."""
        if self._ops is not None:
            return [_info(d) for d in self._ops.devices()]
        return list_devices(self.db)


async def serve_ksn(db: str | Path, host: str = "127.0.0.1", port: int = KSN_PORT, *,
                    address: int = KSN_ADDRESS, every: float | None = None, timing: Timing | None = None,
                    ready: Callable[[KsnEndpoint], None] | None = None, stop: asyncio.Event | None = None) -> None:
    """Serve the KSN until `stop` is set: UDP on `host`:`port` (0: any free port), the
    control socket other processes' `AsyncKsn`/`Ksn` and `tessera ksn` commands use, a
    SYNC at start for every device left mid-update, device-requested master key updates,
    and (`every` seconds) scheduled rotation. `ready` is called once it serves."""
    from tessera.scpm.server import serve

    def on_ready(server) -> None:
        if ready:
            ready(KsnEndpoint(server.host, server.port, server.engine.address, server.engine.store.path))

    try:
        await serve(Path(db), host, port, address, every, on_ready, stop, timing)
    except KsnError:
        raise
    except TesseraError as e:
        raise (KsnBusy if "another KSN process" in str(e) else KsnError)(str(e)) from None


class Ksn(_LoopOwner):
    """The synchronous KSN for short scripts: the same operations as AsyncKsn, each a plain
    call. The UDP socket is served only during a call (answers arriving between calls wait
    in the socket). Use `with Ksn(db) as ksn:`."""

    def __init__(self, db: str | Path, *, create: bool = False, host: str = "127.0.0.1", port: int = KSN_PORT,
                 address: int = KSN_ADDRESS, timing: Timing | None = None, use_server: bool = True) -> None:
        super().__init__()
        try:
            self._ksn: AsyncKsn = self._run(AsyncKsn.open(db, create=create, host=host, port=port, address=address,
                                                          timing=timing, use_server=use_server))
        except BaseException:
            self._close_loop()
            raise

    @property
    def db(self) -> Path:
        return self._ksn.db

    @property
    def via_server(self) -> bool:
        return self._ksn.via_server

    @property
    def port(self) -> int | None:
        return self._ksn.port

    def close(self) -> None:
        if not self._loop.is_closed():
            try:
                self._run(self._ksn.close())
            finally:
                self._close_loop()

    def __enter__(self) -> Ksn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def enrol(self, addr: int, setup_key: bytes, host: str, port: int = KSN_PORT, name: str = "",
              progress: Progress | None = None) -> Enrolled:
        return self._run(self._ksn.enrol(addr, setup_key, host, port, name, progress))

    def install_key(self, kind: str | KeyKind, devices: list[int] | None = None, index: int = 0, new: bool = False,
                    key: bytes | None = None, progress: Progress | None = None) -> list[KeyInstalled]:
        return self._run(self._ksn.install_key(kind, devices, index, new, key, progress))

    def install_sp_key(self, index: int, devices: list[int] | None = None, **kw: Any) -> list[KeyInstalled]:
        return self._run(self._ksn.install_sp_key(index, devices, **kw))

    def install_maker_key(self, devices: list[int] | None = None, **kw: Any) -> list[KeyInstalled]:
        return self._run(self._ksn.install_maker_key(devices, **kw))

    def install_user_key(self, devices: list[int] | None = None, **kw: Any) -> list[KeyInstalled]:
        return self._run(self._ksn.install_user_key(devices, **kw))

    def rotate(self, devices: list[int] | None = None, parallel: int = 16,
               progress: Progress | None = None) -> list[Rotated]:
        return self._run(self._ksn.rotate(devices, parallel, progress))

    def sync(self, devices: list[int] | None = None, progress: Progress | None = None) -> list[Synced]:
        return self._run(self._ksn.sync(devices, progress))

    def get(self, addr: int, prop: int, **kw: Any) -> bytes:
        return self._run(self._ksn.get(addr, prop, **kw))

    def set(self, addr: int, prop: int, value: bytes, **kw: Any) -> bytes:
        return self._run(self._ksn.set(addr, prop, value, **kw))

    def devices(self) -> list[DeviceInfo]:
        return self._run(self._ksn.devices())


__all__ = ["AsyncKsn", "DeviceInfo", "Enrolled", "ErrorCode", "KSN_ADDRESS", "KSN_PORT", "KeyInstalled", "Ksn",
           "KsnEndpoint", "Rotated", "Synced", "Timing", "format_addr", "list_devices", "parse_addr", "serve_ksn"]
