"""ASM initiator (the Security Manager side): Python API, clock offset and log collector."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sqlite3
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tessera.asm.codec import (MAX_BER_VALUE, MAX_VALUE_LEN, BadRequestResponse, GeneralResponse,
                               GetEventIDRequest, GetEventListRequest, GetTimeRequest, LEKey, LEKeyLoadRequest, LEKeyPurgeAllRequest,
                               LEKeyPurgeIDRequest, LEKeyQueryAllRequest, LEKeyQueryIDRequest, Message,
                               QuerySPBRequest)
from tessera.asm.engine import InitiatorEngine, ProtocolError, ResponseTooLarge
from tessera.asm.net import PeerRejected, Profile, RoleRefused, TLSStream
from tessera.asm.store import NS_LOG
from tessera.asm.tls import ASM_PORT, MAX_PLAINTEXT, Credentials, TLSChannel, TLSProfileError

log = logging.getLogger("tessera.asm.initiator")
security_log = logging.getLogger("tessera.asm.security")


class LinkFailure(Exception):
    """The link failed (no answer within the budget, TLS failure, connection lost).

    The TLS session has been closed; the next request opens a new one (clause 6.4.2 note:
    the initiator may restart the TLS session). Nothing is reopened eagerly, so a one-shot
    command that is about to exit does not open a session it will never use.
    """


class PeerProtocolError(Exception):
    """The responder answered, but its answer breaks clause 6/7/8: a frame that cannot be
    decoded, a response of the wrong type, a Request_ID not echoed, an unsolicited frame.

    This is a fault of the peer, not of the network: it is not retried and the session is
    not restarted (the connection is closed, since the stream can no longer be trusted to
    be in step; a later request opens a new one).
    """


class CollectError(RuntimeError):
    """The responder refused a GetEventList / GetEventID the collector needed."""


class RequestRefused(Exception):
    """The responder answered BadRequest."""

    def __init__(self, resp: BadRequestResponse) -> None:
        code = GeneralResponse(resp.response).name if resp.response in GeneralResponse._value2member_map_ else resp.response
        super().__init__(f"responder answered BadRequest ({code})")
        self.response = resp


@dataclass(frozen=True)
class ClockOffset:
    offset: float  # responder clock minus ours, seconds
    uncertainty: float  # half the round trip plus the 1-second resolution of GetTime
    responder_time: int


class Initiator:
    """One TLS connection to a responder; every request of clauses 7 and 8 as a coroutine.

    A request unanswered within `timeout` (2 s, clause 7) is a link failure: the session is
    closed, LinkFailure is raised for that request, and the next call opens a new session.
    A response that breaks the protocol raises PeerProtocolError (not retried).
    """

    def __init__(self, host: str, port: int = ASM_PORT, *, creds: Credentials, timeout: float = 2.0,
                 connect_timeout: float = 5.0, responder_roles: frozenset[str] | None = None,
                 large_handshake_records: bool = False) -> None:
        """`responder_roles`: leaf CN roles accepted from the responder (default net.RESPONDER_ROLES).
        `large_handshake_records`: accept clear-text TLS handshake records above 512 bytes (a
        responder without a 512-byte fragment limit, e.g. stock OpenSSL); off by default,
        application data always keeps the 512-byte limit of clause 6.1."""
        self.host, self.port = host, port
        self.large_handshake_records = large_handshake_records
        self.profile = Profile(creds, server=False, peer_roles=responder_roles)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._stream: TLSStream | None = None
        self._engine: InitiatorEngine | None = None
        self.peer_thumbprint: str | None = None
        self.link_restarts = 0
        self.protocol_errors = 0
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> Initiator:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        await self.close()
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.connect_timeout)
        stream = TLSStream(reader, writer, TLSChannel(self.profile.ctx, server=False,
                                                      large_handshake_records=self.large_handshake_records))
        try:
            await asyncio.wait_for(stream.handshake(), self.connect_timeout)
            if stream.chan.largest_handshake_record > MAX_PLAINTEXT:
                log.warning("responder %s:%d sent TLS handshake records of up to %d bytes (clause 6.1: 512); "
                            "accepted because large handshake records are enabled", self.host, self.port,
                            stream.chan.largest_handshake_record)
            self.peer_thumbprint, _ = self.profile.check_peer(stream.chan.peer_certificate())
        except RoleRefused as exc:
            security_log.warning("security event: responder %s:%d refused (thumbprint %s): %s",
                                 self.host, self.port, exc.thumbprint, exc.violations[0])
            await stream.aclose()
            raise
        except PeerRejected as exc:
            security_log.warning("security event: responder %s:%d certificate refused (thumbprint %s): %s",
                                 self.host, self.port, exc.thumbprint, "; ".join(exc.violations[:4]))
            await stream.aclose()
            raise
        except BaseException:
            await stream.aclose()
            raise
        self._stream, self._engine = stream, InitiatorEngine()
        log.debug("connected to %s:%d", self.host, self.port)

    async def close(self) -> None:
        if self._stream is not None:
            s, self._stream, self._engine = self._stream, None, None
            await s.aclose()

    async def _restart(self, why: str) -> None:
        """Clause 6.4.2 note: close the failed session; the next request opens a new one."""
        self.link_restarts += 1
        log.warning("link failure (%s): TLS session closed, the next request opens a new one", why)
        await self.close()

    async def request(self, build, retries: int = 0, max_value: int | None = None) -> Message:
        """`build(request_id) -> request`. Raises LinkFailure (retried `retries` times),
        PeerProtocolError (never retried), RequestRefused, or ResponseTooLarge when the
        response value exceeds `max_value` (default codec.MAX_VALUE_LEN; the response is
        skipped unread and the connection stays usable)."""
        async with self._lock:
            for attempt in range(retries + 1):
                if self._stream is None:
                    await self.connect()
                assert self._stream and self._engine
                req = build(self._engine.new_request_id())
                try:
                    resp = await asyncio.wait_for(self._exchange(req, max_value), self.timeout)
                except ProtocolError as exc:
                    self.protocol_errors += 1
                    log.warning("protocol error from responder %s:%d: %s", self.host, self.port, exc)
                    await self.close()
                    raise PeerProtocolError(f"responder {self.host}:{self.port} broke the protocol: {exc}") from None
                except (asyncio.TimeoutError, TLSProfileError, ConnectionError) as exc:
                    why = "no answer within the budget" if isinstance(exc, asyncio.TimeoutError) else str(exc)
                    await self._restart(why)
                    if attempt == retries:
                        raise LinkFailure(why) from None
                    continue
                if isinstance(resp, BadRequestResponse):
                    raise RequestRefused(resp)
                return resp
        raise AssertionError("unreachable")

    async def _exchange(self, req: Message, max_value: int | None = None) -> Message:
        assert self._stream and self._engine
        await self._stream.send(self._engine.send_request(req, max_value))
        while True:
            resp = self._engine.receive_data(await self._stream.recv())
            if resp is not None:
                return resp

    # -- clause 7
    async def get_time(self):
        return await self.request(GetTimeRequest)

    async def get_event_list(self, start: int, stop: int):
        return await self.request(lambda r: GetEventListRequest(r, start, stop))

    async def get_event_id(self, event_id: int):
        return await self.request(lambda r: GetEventIDRequest(r, event_id))

    async def query_spb(self):
        return await self.request(QuerySPBRequest)

    # -- clause 8
    async def le_key_load(self, keys: list[LEKey]):
        return await self.request(lambda r: LEKeyLoadRequest(r, tuple(keys)))

    async def le_key_query_id(self, key_id: int):
        return await self.request(lambda r: LEKeyQueryIDRequest(r, key_id))

    async def le_key_query_all(self):
        return await self.request(LEKeyQueryAllRequest)

    async def le_key_purge_id(self, key_id: int):
        return await self.request(lambda r: LEKeyPurgeIDRequest(r, key_id))

    async def le_key_purge_all(self):
        return await self.request(LEKeyPurgeAllRequest)

    async def clock_offset(self, retries: int = 0) -> ClockOffset:
        """Clause 7.2 note: the SM measures the responder's clock against its own."""
        t0 = time.time()
        resp = await self.request(GetTimeRequest, retries=retries)
        t1 = time.time()
        mid = (t0 + t1) / 2
        return ClockOffset(resp.time + 0.5 - mid, (t1 - t0) / 2 + 0.5, resp.time)


# --------------------------------------------------------------------------- collector
def _fit(width: int, held: int, per_page: int) -> int:
    """A span expected to hold ~80 % of a page, if `held` IDs spread evenly over `width` s."""
    if held * 5 <= per_page * 4:
        return width
    return max(1, min(width // 2, width * per_page * 4 // (5 * held)))


def record_timestamp(xml: bytes) -> int | None:
    """The 430-4 style LogRecordHeader/TimeStamp of a record, as UTC epoch seconds."""
    try:
        root = ET.fromstring(xml)
        text = root.findtext(f"{{{NS_LOG}}}LogRecordHeader/{{{NS_LOG}}}TimeStamp")
        if not text:
            return None
        t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.timezone.utc)
        return int(t.timestamp())
    except (ET.ParseError, ValueError):
        return None


@dataclass(frozen=True)
class CollectResult:
    window: tuple[int, int] | None
    listed: int
    stored: int
    duplicates: int
    clock_offset: ClockOffset | None = None


@dataclass(frozen=True)
class CollectedRecord:
    event_id: int
    ts_raw: int | None  # the responder's own TimeStamp (its clock)
    ts_corrected: float | None  # ts_raw minus the offset measured at collection (the SM's "true time")
    clock_offset: float | None
    offset_uncertainty: float | None
    xml: bytes


_COLUMNS = (("ts_raw", "INTEGER"), ("ts_corrected", "REAL"), ("clock_offset", "REAL"), ("offset_uncertainty", "REAL"))


class LogCollector:
    """Pulls a responder's security log into the initiator's SQLite, window after window.

    Windows are inclusive (clause 7.3) and book-ended: each run asks [next_start, T - 1]
    where T is the responder's own GetTime, so the last second is complete before it is
    asked for, the next run starts at T, and nothing falls between runs. Records are keyed
    by (responder, Event ID), so a window asked twice (a crash between storing and
    advancing) stores no duplicate.

    Clause 7.2 note: the SM removes the responder's clock delta in log reporting. Each run
    measures the offset with that same GetTime and stores, next to the untouched XML, the
    record's raw TimeStamp, the corrected time (raw - offset) and the offset used.
    """

    def __init__(self, db: Path | str, responder: str, page_bytes: int = MAX_VALUE_LEN) -> None:
        """`page_bytes`: the largest GetEventList response value accepted for a multi-second
        page (default 64 KiB, 16,380 Event IDs)."""
        if page_bytes < 13 + 4:
            raise ValueError("page_bytes must hold at least one Event ID")
        self.responder = responder
        self.page_bytes = page_bytes
        self.pages_split = 0  # windows narrowed because their list was too large
        self._db = sqlite3.connect(str(db), timeout=5.0)
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS collected (responder TEXT, event_id INTEGER, window_start INTEGER, "
            "window_stop INTEGER, collected_at INTEGER, xml BLOB, ts_raw INTEGER, ts_corrected REAL, "
            "clock_offset REAL, offset_uncertainty REAL, PRIMARY KEY (responder, event_id));"
            "CREATE TABLE IF NOT EXISTS collector_state (responder TEXT PRIMARY KEY, next_start INTEGER);")
        have = {r[1] for r in self._db.execute("PRAGMA table_info(collected)")}
        for col, typ in _COLUMNS:  # databases made before times were corrected
            if col not in have:
                self._db.execute(f"ALTER TABLE collected ADD COLUMN {col} {typ}")
        self._db.commit()

    def close(self) -> None:
        self._db.close()

    def next_start(self) -> int:
        row = self._db.execute("SELECT next_start FROM collector_state WHERE responder=?", (self.responder,)).fetchone()
        return int(row[0]) if row else 0

    def records(self) -> list[tuple[int, bytes]]:
        return [(r[0], bytes(r[1])) for r in self._db.execute(
            "SELECT event_id, xml FROM collected WHERE responder=? ORDER BY event_id", (self.responder,))]

    def timed_records(self) -> list[CollectedRecord]:
        return [CollectedRecord(r[0], r[1], r[2], r[3], r[4], bytes(r[5])) for r in self._db.execute(
            "SELECT event_id, ts_raw, ts_corrected, clock_offset, offset_uncertainty, xml FROM collected "
            "WHERE responder=? ORDER BY event_id", (self.responder,))]

    async def collect(self, ini: Initiator, progress: Callable[[int, int, tuple[int, int]], None] | None = None
                      ) -> CollectResult:
        """Collect everything stamped in [next_start, T - 1], page by page.

        Paging (defined by this project; clause 7.3 puts no restriction on the windows an
        initiator asks for): the window is asked whole first; a GetEventList response above
        `page_bytes` is skipped unread (ResponseTooLarge) and the page's time span shrinks in
        proportion to the count its length announced (to ~80 % of a page, at least halved),
        down to one second; the rest of such a window is then paged with the count left
        (known from that length), without asking the crowded window again; elsewhere,
        after a page of fewer than a quarter of a page of IDs the span doubles. A one-second window cannot be split: it is asked again accepting up
        to the largest value a 4-byte BER length allows (4,194,300 Event IDs). Each page is
        committed with the new next_start, so an interrupted run resumes after the last
        complete page. `progress(stored_so_far, listed_so_far, page_window)` is called
        after each page.
        """
        start = self.next_start()
        off = await ini.clock_offset(retries=1)
        stop = off.responder_time - 1
        if stop < start:
            return CollectResult(None, 0, 0, 0, off)
        listed = stored = dups = 0
        per_page = (self.page_bytes - 13) // 4  # Request_ID + batch header + response byte
        lo, span = start, stop - start + 1
        known: tuple[int, int] | None = None  # (end, IDs in [lo, end]) learnt from a skipped list
        while lo <= stop:
            hi = min(stop, lo + span - 1)
            limit = self.page_bytes if hi > lo else MAX_BER_VALUE
            try:
                lst = await ini.request(lambda r, a=lo, b=hi: GetEventListRequest(r, a, b), retries=1, max_value=limit)
            except ResponseTooLarge as exc:
                # the skipped value's length says how many IDs [lo, hi] holds: shrink the span
                # in proportion (to ~80 % of a page), at least by half
                known = (hi, max(1, (exc.length - 13) // 4))
                span = _fit(hi - lo + 1, known[1], per_page)
                self.pages_split += 1
                continue
            if lst.response != GeneralResponse.SUCCESSFUL:
                raise CollectError(f"GetEventList [{lo}, {hi}] failed with response {lst.response}")
            s, d = await self._store_page(ini, lst.event_ids, lo, hi, off)
            listed, stored, dups = listed + len(lst.event_ids), stored + s, dups + d
            if progress:
                progress(stored, listed, (lo, hi))
            lo = hi + 1
            if known is not None and hi < known[0]:  # the rest of a window known to be crowded
                known = (known[0], max(1, known[1] - len(lst.event_ids)))
                span = _fit(known[0] - hi, known[1], per_page)
            else:
                known = None
                if len(lst.event_ids) < per_page // 4:
                    span = min(span * 2, 1 << 32)
        return CollectResult((start, stop), listed, stored, dups, off)

    async def _store_page(self, ini: Initiator, ids: tuple[int, ...], lo: int, hi: int, off: ClockOffset
                          ) -> tuple[int, int]:
        stored = dups = 0
        for eid in sorted(ids):
            if self._db.execute("SELECT 1 FROM collected WHERE responder=? AND event_id=?",
                                (self.responder, eid)).fetchone():
                dups += 1
                continue
            rec = await ini.request(lambda r, e=eid: GetEventIDRequest(r, e), retries=1)
            if rec.response != GeneralResponse.SUCCESSFUL:
                raise CollectError(f"GetEventID {eid} failed with response {rec.response}")
            raw = record_timestamp(rec.log_record)
            if raw is None:
                log.info("event %d: no readable TimeStamp; stored without times", eid)
            corrected = None if raw is None else raw - off.offset
            self._db.execute("INSERT OR IGNORE INTO collected (responder, event_id, window_start, window_stop, "
                             "collected_at, xml, ts_raw, ts_corrected, clock_offset, offset_uncertainty) "
                             "VALUES (?,?,?,?,?,?,?,?,?,?)",
                             (self.responder, eid, lo, hi, int(time.time()), rec.log_record, raw, corrected,
                              off.offset, off.uncertainty))
            stored += 1
        self._db.execute("INSERT OR REPLACE INTO collector_state VALUES (?, ?)", (self.responder, hi + 1))
        self._db.commit()
        return stored, dups
