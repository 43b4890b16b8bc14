"""ASM (SMPTE 430-6): the initiator (Security Manager side), one call per request of
clauses 7 and 8, the log collector, and a responder for test harnesses.

    creds = pki_credentials("pki", "sm1")
    async with AsmClient("192.0.2.9", creds=creds) as asm:
        print(await asm.query_spb())
        result = await asm.collect("sm.db")

`Asm` is the same client for synchronous scripts. Every failure is an AsmError (a
TesseraError): AsmLinkError (no answer, TLS or network failure), AsmPeerRejected (the
peer's certificate or role is refused), AsmRefused (the responder answered with an error),
AsmProtocolError (the responder broke the protocol).
"""
from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tessera.api._sync import _LoopOwner
from tessera.asm.codec import GeneralResponse, LEKey, SPBStatus
from tessera.asm.initiator import ClockOffset, CollectedRecord, CollectResult
from tessera.asm.tls import ASM_PORT, Credentials
from tessera.errors import TesseraError

T = TypeVar("T")

CollectProgress = Callable[[int, int, tuple[int, int]], None]
"""Called after each page of a collection: (records stored so far, listed so far, (start, stop))."""


class AsmError(TesseraError):
    """An ASM request failed."""


class AsmLinkError(AsmError):
    """No answer in time, a TLS failure, or the network (clause 7: the link is restarted on
    the next call)."""


class AsmPeerRejected(AsmError):
    """The peer's certificate chain or role was refused."""


class AsmRefused(AsmError):
    """The responder answered the request with an error response; `response` names it
    ("invalid_parameter", ...) when the answer was a GeneralResponse code."""

    def __init__(self, message: str, response: str | None = None) -> None:
        self.response = response
        super().__init__(message)


class AsmProtocolError(AsmError):
    """The responder's answer broke the protocol."""


@dataclass(frozen=True)
class SpbStatus:
    protocol_version: int
    status: str  # "not-playing", "playing", "security-alert" (or the raw number)
    response: str  # "successful", ...


def pki_credentials(directory: str | Path, name: str) -> Credentials:
    """The credentials of leaf `name` in a directory made by `tessera pki create`
    (<name>.pem, <name>.key, root.pem)."""
    d = Path(directory)
    creds = Credentials(d / f"{name}.pem", d / f"{name}.key", d / "root.pem")
    for p in (creds.cert_chain, creds.key, creds.trust):
        if not p.exists():
            raise AsmError(f"missing file: {p}")
    return creds


def response_name(code: int) -> str:
    """A GeneralResponse code as text ("successful", ...)."""
    try:
        return GeneralResponse(code).name.lower()
    except ValueError:
        return str(code)


def _status_name(v: int) -> str:
    return SPBStatus(v).name.lower().replace("_", "-") if v in SPBStatus._value2member_map_ else str(v)


async def _mapped(aw: Awaitable[T], where: str) -> T:
    """Await an initiator call, turning its exceptions into the API's."""
    from tessera.asm.engine import ResponseTooLarge
    from tessera.asm.initiator import CollectError, LinkFailure, PeerProtocolError, RequestRefused
    from tessera.asm.net import PeerRejected
    from tessera.asm.tls import TLSProfileError

    try:
        return await aw
    except PeerRejected as e:
        raise AsmPeerRejected(str(e)) from None
    except (RequestRefused, CollectError, ResponseTooLarge) as e:
        raise AsmRefused(str(e)) from None
    except PeerProtocolError as e:
        raise AsmProtocolError(f"protocol error: {e}") from None
    except (LinkFailure, TLSProfileError, OSError, asyncio.TimeoutError, ssl.SSLError) as e:
        raise AsmLinkError(f"cannot talk to {where}: {e or type(e).__name__}") from None


class AsmClient:
    """An ASM initiator session with one responder (asyncio). `async with` connects and
    closes; a call after a link failure opens a new session."""

    def __init__(self, host: str, port: int = ASM_PORT, *, creds: Credentials, timeout: float = 2.0,
                 responder_roles: frozenset[str] | None = None, large_handshake_records: bool = False) -> None:
        """`timeout`: seconds before an unanswered request is a link failure (clause 7: 2).
        `responder_roles`: leaf CN roles accepted from the responder (default LD and the other
        responder roles of tessera.asm.net.RESPONDER_ROLES). `large_handshake_records`:
        accept TLS handshake records above 512 bytes (stock OpenSSL responders)."""
        from tessera.asm.initiator import Initiator
        from tessera.asm.net import RESPONDER_ROLES

        self.host, self.port = host, port
        self._ini = Initiator(host, port, creds=creds, timeout=timeout,
                              responder_roles=frozenset(responder_roles or RESPONDER_ROLES),
                              large_handshake_records=large_handshake_records)

    def _call(self, aw: Awaitable[T]) -> Awaitable[T]:
        return _mapped(aw, f"{self.host}:{self.port}")

    async def connect(self) -> None:
        await self._call(self._ini.connect())

    async def close(self) -> None:
        await self._ini.close()

    async def __aenter__(self) -> AsmClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def peer_thumbprint(self) -> str | None:
        """The responder's certificate thumbprint (once connected)."""
        return self._ini.peer_thumbprint

    async def get_time(self) -> int:
        """GetTime (clause 7.2): the responder's UTC time, seconds since 1970."""
        r = await self._call(self._ini.get_time())
        if r.response != 0:
            raise AsmRefused(f"GetTime: {response_name(r.response)}", response_name(r.response))
        return int(r.time)

    async def clock_offset(self) -> ClockOffset:
        """The responder's clock minus ours, measured with GetTime."""
        return await self._call(self._ini.clock_offset())

    async def event_ids(self, start: int = 0, stop: int = 0xFFFFFFFF) -> list[int]:
        """GetEventList (clause 7.3): Event IDs recorded in the inclusive UTC window."""
        r = await self._call(self._ini.get_event_list(start, stop))
        return sorted(r.event_ids)

    async def event(self, event_id: int) -> bytes:
        """GetEventID (clause 7.4): one log record (XML)."""
        r = await self._call(self._ini.get_event_id(event_id))
        if r.response != 0:
            raise AsmRefused(f"GetEventID {event_id}: {response_name(r.response)}", response_name(r.response))
        return bytes(r.log_record)

    async def query_spb(self) -> SpbStatus:
        """QuerySPB (clause 7.5)."""
        r = await self._call(self._ini.query_spb())
        return SpbStatus(r.protocol_version, _status_name(r.status), response_name(r.response))

    async def load_keys(self, keys: list[LEKey]) -> int:
        """LEKeyLoad (clause 8.1); returns the responder's overflow count (0: all stored)."""
        if not keys:
            raise ValueError("no keys to load")
        r = await self._call(self._ini.le_key_load(keys))
        if r.response != 0:
            raise AsmRefused(f"LEKeyLoad: {response_name(r.response)}", response_name(r.response))
        return int(r.overflow)

    async def has_key(self, key_id: int) -> bool:
        """LEKeyQueryID (clause 8.2)."""
        return bool((await self._call(self._ini.le_key_query_id(key_id))).present)

    async def key_ids(self) -> list[int]:
        """LEKeyQueryAll (clause 8.3)."""
        return sorted((await self._call(self._ini.le_key_query_all())).key_ids)

    async def purge_key(self, key_id: int) -> bool:
        """LEKeyPurgeID (clause 8.4); False when the responder had no such key."""
        return not (await self._call(self._ini.le_key_purge_id(key_id))).no_key_id

    async def purge_all_keys(self) -> None:
        """LEKeyPurgeAll (clause 8.5)."""
        r = await self._call(self._ini.le_key_purge_all())
        if r.response != 0:
            raise AsmRefused(f"LEKeyPurgeAll: {response_name(r.response)}", response_name(r.response))

    async def collect(self, db: str | Path, responder: str | None = None,
                      progress: CollectProgress | None = None) -> CollectResult:
        """Pull the responder's security log into the SQLite database `db`, from where the
        last collection of this responder (label `responder`, default host:port) stopped
        up to the responder's last complete second; no record is stored twice."""
        from tessera.asm.initiator import LogCollector

        col = LogCollector(Path(db), responder or f"{self.host}:{self.port}")
        try:
            return await self._call(col.collect(self._ini, progress))
        finally:
            col.close()


def collected_records(db: str | Path, responder: str) -> list[CollectedRecord]:
    """The records collected so far from `responder` (its label) in the database `db`."""
    from tessera.asm.initiator import LogCollector

    col = LogCollector(Path(db), responder)
    try:
        return col.timed_records()
    finally:
        col.close()


class Asm(_LoopOwner):
    """AsmClient for synchronous scripts: `with Asm(host, port, creds=...) as asm:` and the
    same methods as plain calls."""

    def __init__(self, host: str, port: int = ASM_PORT, **kw: Any) -> None:
        super().__init__()
        self._client = AsmClient(host, port, **kw)

    def __enter__(self) -> Asm:
        self._run(self._client.connect())
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.is_closed():
            try:
                self._run(self._client.close())
            finally:
                self._close_loop()

    def __getattr__(self, name: str) -> Any:
        fn = getattr(AsmClient, name, None)
        if name.startswith("_") or not asyncio.iscoroutinefunction(fn):
            raise AttributeError(name)

        @functools.wraps(fn)
        def call(*args: Any, **kw: Any) -> Any:
            return self._run(getattr(self._client, name)(*args, **kw))

        return call


class AsmResponder:
    """A responder (remote SPB with an LE key store and a security log) for test harnesses
    and demos: `async with AsmResponder(creds, "spb.db", port=0) as r: print(r.port)`."""

    def __init__(self, creds: Credentials, db: str | Path, host: str = "127.0.0.1", port: int = ASM_PORT,
                 **config: Any) -> None:
        """`config`: further tessera.asm.responder.ResponderConfig fields (key_capacity,
        budget, max_connections, ...)."""
        from tessera.asm.responder import Responder, ResponderConfig

        self.config = ResponderConfig(creds=creds, db=Path(db), host=host, port=port, **config)
        self._r = Responder(self.config)
        self.port = port

    async def start(self) -> int:
        """Listen; returns the port (useful with port=0)."""
        try:
            self.port = await self._r.start()
        except (OSError, ssl.SSLError, ValueError) as e:
            raise AsmError(f"responder: {e}") from None
        return self.port

    async def serve_forever(self) -> None:
        await self._r.serve_forever()

    async def stop(self) -> None:
        await self._r.stop()

    async def __aenter__(self) -> AsmResponder:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def set_status(self, status: str, reason: str | None = None) -> None:
        """The QuerySPB status: "not-playing", "playing" or "alert" (an alert is logged)."""
        set_spb_status(self.config.db, status, reason)


def set_spb_status(db: str | Path, status: str | None = None, reason: str | None = None) -> str:
    """Set (or with None only read) a responder's QuerySPB status through its database;
    returns the status now in force."""
    import sqlite3

    from tessera.asm.store import SecurityLog

    states = {"not-playing": SPBStatus.NOT_PLAYING, "playing": SPBStatus.PLAYING, "alert": SPBStatus.SECURITY_ALERT}
    if status is not None and status not in states:
        raise ValueError(f"status {status!r}: use one of {', '.join(states)}")
    try:
        slog = SecurityLog(Path(db))
    except sqlite3.Error as e:
        raise AsmError(f"cannot open the responder database {db}: {e}") from None
    try:
        if status is not None:
            st = states[status]
            slog.set_status(st)
            if st is SPBStatus.SECURITY_ALERT:
                slog.record("Operations", "SPBSecurityAlert", exceptions={"Reason": reason or "raised by operator"})
        return _status_name(slog.get_status())
    finally:
        slog.close()


__all__ = ["Asm", "AsmClient", "AsmError", "AsmLinkError", "AsmPeerRejected", "AsmProtocolError", "AsmRefused",
           "AsmResponder", "ClockOffset", "CollectProgress", "CollectResult", "CollectedRecord", "Credentials",
           "LEKey", "SpbStatus", "collected_records", "pki_credentials", "response_name", "set_spb_status"]
