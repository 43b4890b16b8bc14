"""ASM responder (the remote SPB side): asyncio TLS server on port 1173 (clause 6.4 item 3)."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tessera.asm import codec
from tessera.asm.codec import (BadRequestResponse, CodecError, GeneralResponse, GetEventIDRequest,
                               GetEventIDResponse, GetEventListRequest, GetEventListResponse,
                               GetTimeRequest, GetTimeResponse, LEKeyLoadRequest, LEKeyLoadResponse,
                               LEKeyPurgeAllRequest, LEKeyPurgeAllResponse, LEKeyPurgeIDRequest,
                               LEKeyPurgeIDResponse, LEKeyQueryAllRequest, LEKeyQueryAllResponse,
                               LEKeyQueryIDRequest, LEKeyQueryIDResponse, Message, QuerySPBRequest,
                               QuerySPBResponse, SPBStatus)
from tessera.asm.engine import InvalidParameter, MalformedRequest, ProtocolError, RequestReceived, ResponderEngine
from tessera.asm.guard import OTHER, ConnectionLimiter, FailureAggregator
from tessera.asm.net import INITIATOR_ROLES, PeerRejected, Profile, RoleRefused, TLSStream
from tessera.asm.store import KeyStore, SecurityLog
from tessera.asm.tls import ASM_PORT, MAX_PLAINTEXT, MAX_TLS_PLAINTEXT, Credentials, TLSChannel, TLSProfileError

log = logging.getLogger("tessera.asm.responder")

# Clause 7.3 returns every Event ID of the window in one batch; a 4-byte BER length (6.2)
# caps the value at 16 MiB - 1, i.e. 4,194,300 IDs. A window holding more is answered with
# response 1 (Failed) and an empty batch: defined by this project (the initiator narrows it).
MAX_LIST_IDS = (codec.MAX_BER_VALUE - 13) // 4

# Event types / subtypes used in the security log (our mapping onto 430-5 names).
ASM, OPS = "ASM", "Operations"


@dataclass
class ResponderConfig:
    creds: Credentials
    db: Path
    host: str = "127.0.0.1"
    port: int = ASM_PORT
    key_capacity: int = 16
    persist_keys: Path | None = None  # None: LE keys live in memory only
    budget: float = 2.0  # clause 7 / 6.4 item 2: request-to-response latency limit
    handshake_timeout: float = 5.0  # project choice: drop clients stalling in the handshake
    request_timeout: float = 2.0  # project choice: drop clients stalling inside a request
    idle_timeout: float = 600.0  # project choice: drop connections idle between requests
    max_value: int = codec.MAX_VALUE_LEN
    clock: Callable[[], float] = time.time  # the responder's UTC clock (tests skew it)
    processing_delay: float = 0.0  # test/bench knob: simulated work per request
    initiator_roles: frozenset[str] = INITIATOR_ROLES  # leaf CN roles accepted from initiators
    # Limits against hostile peers (issue 11 #9/#10), all project choices:
    send_timeout: float = 2.0  # a response must be written (drained) within this; else dropped
    max_connections: int = 64  # in total; at the cap the oldest unauthenticated one is evicted
    max_connections_per_source: int = 8  # per source address
    failure_interval: float = 10.0  # unauthenticated failures are summed per source per interval
    failure_sources: int = 32  # sources tracked per interval; the rest share one bucket
    # Issue 10 opt-in: accept clear-text handshake records above 512 bytes (stock OpenSSL peers)
    large_handshake_records: bool = False


# Transport buffer high-water mark per connection (project choice): with send_timeout it
# bounds what a peer that never reads can make the responder hold.
WRITE_HIGH_WATER = 64 * 1024


_FAILURE_TEXT = {"RoleRefused": "initiator refused", "CertificateRefused": "certificate refused",
                 "Timeout": "timed out in the", "TLS": "TLS failure", "ConnectionLimit": "connection refused"}


class _Deadline(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class Responder:
    def __init__(self, cfg: ResponderConfig) -> None:
        self.cfg = cfg
        self.profile = Profile(cfg.creds, server=True, peer_roles=frozenset(cfg.initiator_roles))
        self.keys = KeyStore(cfg.key_capacity, clock=cfg.clock, persist=cfg.persist_keys)
        self.log = SecurityLog(cfg.db, clock=cfg.clock)
        self.work_lock = asyncio.Lock()  # one request is processed at a time (store + log)
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task] = set()
        self._flusher: asyncio.Task | None = None
        self.limiter: ConnectionLimiter[asyncio.StreamWriter] = ConnectionLimiter(
            cfg.max_connections, cfg.max_connections_per_source)
        self.failures = FailureAggregator(cfg.failure_interval, cfg.failure_sources)
        self.port = 0

    # -- lifecycle
    async def start(self) -> int:
        self._server = await asyncio.start_server(self._on_connect, self.cfg.host, self.cfg.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self.log.record(OPS, "SPBStartup", params={"Port": str(self.port)})
        log.info("ASM responder listening on %s:%d", self.cfg.host, self.port)
        if self.cfg.large_handshake_records:
            log.warning("ASM responder accepts TLS handshake records above 512 bytes (up to %d) from initiators "
                        "without a fragment limit; application data keeps the 512-byte limit of clause 6.1",
                        MAX_TLS_PLAINTEXT)
        self._flusher = asyncio.create_task(self._flush_failures_periodically())
        return self.port

    async def stop(self) -> None:
        if self._flusher:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        if self._server:
            self._server.close()
            for t in list(self._conns):
                t.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        self.flush_failures()  # counted failures are never lost on a clean stop
        self.log.close()
        self.keys.close()

    async def serve_forever(self) -> None:
        assert self._server
        await self._server.serve_forever()

    # -- SPB status (clause 7.5): driven by the API or by `tessera asm status`
    def set_status(self, status: SPBStatus, reason: str = "") -> None:
        self.log.set_status(status)
        if status is SPBStatus.SECURITY_ALERT:
            self.log.record(OPS, "SPBSecurityAlert", exceptions={"Reason": reason or "raised by operator"})

    # -- unauthenticated failures: counted per source, summarised per interval (guard.py)
    def _unauth_failure(self, peer: tuple, kind: str, detail: str, thumbprint: str | None = None) -> None:
        source = str(peer[0])
        if self.failures.note(source, kind, asyncio.get_running_loop().time()):
            log.warning("security: %s:%s: %s: %s (further such failures from %s are counted and summarised "
                        "every %.0f s)", source, peer[1], _FAILURE_TEXT.get(kind, kind), detail[:300], source,
                        self.cfg.failure_interval)
            self.log.record(ASM, "LinkException", thumbprint=thumbprint,
                            params={"Peer": f"{source}:{peer[1]}", "Count": "1"}, exceptions={kind: detail})
        else:
            log.debug("%s:%s: %s: %s (counted)", source, peer[1], kind, detail[:300])

    def flush_failures(self) -> int:
        """Write one summary record per source for the interval's counted failures."""
        summaries = self.failures.flush()
        for sm in summaries:
            kinds = ", ".join(f"{k}={n}" for k, n in sorted(sm.kinds.items()))
            self.log.record(ASM, "LinkException",
                            params={"Peer": sm.source, "Count": str(sm.count), "Interval": f"{self.cfg.failure_interval:g}s"},
                            exceptions={"UnauthenticatedFailures": f"{sm.count} more connection failure(s) "
                                        f"before authentication from {sm.source}: {kinds}"})
        if summaries:
            n = sum(sm.count for sm in summaries)
            others = " (including an 'other sources' bucket)" if any(sm.source == OTHER for sm in summaries) else ""
            log.warning("security: %d further unauthenticated connection failure(s) from %d source(s)%s in the "
                        "last interval; summarised in the security log", n, len(summaries), others)
        return len(summaries)

    async def _flush_failures_periodically(self) -> None:
        while True:
            await asyncio.sleep(min(self.cfg.failure_interval, 1.0))
            if self.failures.due(asyncio.get_running_loop().time()):
                self.flush_failures()

    # -- connections
    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task
        peer = writer.get_extra_info("peername") or ("?", 0)
        admitted, victim = self.limiter.admit(writer, str(peer[0]), asyncio.get_running_loop().time(),
                                              self.failures.failures)
        if victim is not None:  # the oldest connection still in its handshake makes room
            victim.transport.abort()
        if not admitted:
            writer.transport.abort()
            self._unauth_failure(peer, "ConnectionLimit", f"over {self.cfg.max_connections} connections in total "
                                 f"or {self.cfg.max_connections_per_source} from this source")
            return
        self._conns.add(task)
        try:
            await self._connection(reader, writer, peer)
        except asyncio.CancelledError:  # stop(): asyncio's stream callback must not see it
            pass
        finally:
            self.limiter.release(writer)
            self._conns.discard(task)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: tuple) -> None:
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        stream = TLSStream(reader, writer, TLSChannel(self.profile.ctx, server=True,
                                                      large_handshake_records=self.cfg.large_handshake_records))
        engine = ResponderEngine(self.cfg.max_value)
        thumb: str | None = None
        try:
            # Before authentication: every failure is counted, not logged one by one.
            try:
                await asyncio.wait_for(stream.handshake(), self.cfg.handshake_timeout)
                thumb, _ = self.profile.check_peer(stream.chan.peer_certificate())
            except asyncio.TimeoutError:
                return self._unauth_failure(peer, "Timeout", "handshake")
            except RoleRefused as exc:
                return self._unauth_failure(peer, "RoleRefused", exc.violations[0][:2000], exc.thumbprint)
            except PeerRejected as exc:
                return self._unauth_failure(peer, "CertificateRefused", "; ".join(exc.violations)[:2000], exc.thumbprint)
            except (TLSProfileError, ProtocolError, ConnectionError, asyncio.IncompleteReadError) as exc:
                return self._unauth_failure(peer, "TLS", str(exc)[:500] or type(exc).__name__)
            self.limiter.authenticated(writer)
            params = {"Peer": f"{peer[0]}:{peer[1]}"}
            big = stream.chan.largest_handshake_record
            if big > MAX_PLAINTEXT:
                params["LargeHandshakeRecords"] = f"up to {big} bytes, accepted by configuration"
                log.info("%s: handshake records of up to %d bytes accepted (large handshake records enabled)", peer, big)
            self.log.record(ASM, "LinkOpened", thumbprint=thumb, params=params)
            try:
                await self._serve(stream, engine, thumb)
            except _Deadline as exc:
                log.info("%s: %s deadline passed; connection closed", peer, exc.what)
                self.log.record(ASM, "LinkException", thumbprint=thumb, exceptions={"Timeout": exc.what})
            except (TLSProfileError, ProtocolError) as exc:
                log.info("%s: %s", peer, exc)
                self.log.record(ASM, "LinkException", thumbprint=thumb, exceptions={"TLS": str(exc)[:500]})
            except CodecError as exc:
                log.info("%s: unframeable stream: %s", peer, exc)
                self.log.record(ASM, "LinkException", thumbprint=thumb, exceptions={"Framing": exc.kind})
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
        finally:
            await stream.aclose()
            if thumb is not None:
                extra = {"RepeatedRequestIDs": str(engine.repeats)} if engine.repeats else {}
                self.log.record(ASM, "LinkClosed", thumbprint=thumb, params=extra)

    async def _serve(self, stream: TLSStream, engine: ResponderEngine, thumb: str) -> None:
        """Deadlines (project choices): a request must arrive whole within request_timeout of
        its first byte (a TLS record fragment counts), the link may idle idle_timeout between
        requests, and each response must be written within send_timeout."""
        loop = asyncio.get_running_loop()
        last_app = loop.time()
        req_start: float | None = None
        while True:
            if req_start is not None:
                what, deadline = "request", req_start + self.cfg.request_timeout
            else:
                what, deadline = "idle", last_app + self.cfg.idle_timeout
            try:
                app = await asyncio.wait_for(stream.recv(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                raise _Deadline(what) from None
            t_end = loop.time()  # clause 6.4 item 2: latency runs from the end of the request
            if app:
                last_app = t_end
            engine.receive_data(app)  # fatal CodecError closes the connection
            served = False
            while (ev := engine.next_event()) is not None:
                served = True
                resp = await self._respond(ev, t_end, thumb)
                if isinstance(resp, GetTimeResponse):  # clause 7.2: time taken when queued
                    resp = dataclasses.replace(resp, time=int(self.cfg.clock()))
                try:
                    await asyncio.wait_for(stream.send(engine.send_response(resp)), self.cfg.send_timeout)
                except asyncio.TimeoutError:
                    raise _Deadline("send") from None
                last_app = loop.time()
            if not (engine.mid_request or stream.chan.pending_in):
                req_start = None
            elif served or req_start is None:  # a new request has begun; time spent serving
                req_start = t_end if not served else loop.time()  # earlier ones is not its fault

    async def _respond(self, ev: RequestReceived | MalformedRequest | InvalidParameter, t_end: float,
                       thumb: str) -> Message:
        if isinstance(ev, MalformedRequest):
            self.log.record(ASM, "LinkException", thumbprint=thumb, exceptions={"BadRequest": ev.error.kind})
            return BadRequestResponse(ev.raw, GeneralResponse.INVALID)  # clause 7.1: complete copy
        if isinstance(ev, InvalidParameter):
            self.log.record(ASM, "LinkException", thumbprint=thumb, exceptions={"InvalidParameter": ev.error.kind})
            return ev.response
        if ev.repeat:
            self._repeated_id(ev, thumb)
        loop = asyncio.get_running_loop()
        left = self.cfg.budget - (loop.time() - t_end) - 0.05  # answer busy before the budget runs out
        try:
            return await asyncio.wait_for(self._work(ev.request, thumb), max(left, 0.0))
        except asyncio.TimeoutError:
            log.info("busy: request not served within %.1fs", self.cfg.budget)
            self.log.record(ASM, "LinkException", thumbprint=thumb, exceptions={"ResponderBusy": ev.request.NAME})
            return BadRequestResponse(b"", GeneralResponse.BUSY)  # clause 7.1: busy -> empty copy

    def _repeated_id(self, ev: RequestReceived, thumb: str) -> None:
        """Clause 6.3 makes unique Request_IDs a *should* for the SM: serve the request, but
        record the first repeat on a link as a security event (later ones are counted in
        that link's LinkClosed record, so a faulty SM cannot flood the log)."""
        if ev.repeat != 1:
            return
        rid = ev.request.request_id  # type: ignore[attr-defined]
        log.warning("security: Request_ID %d repeated on one connection (%s); served anyway", rid, ev.request.NAME)
        self.log.record(ASM, "LinkException", thumbprint=thumb,
                        exceptions={"RepeatedRequestID": f"{rid} ({ev.request.NAME}); first repeat on this link, "
                                    "later ones are counted in LinkClosed"})

    async def _work(self, req: Message, thumb: str) -> Message:
        async with self.work_lock:
            if self.cfg.processing_delay:
                await asyncio.sleep(self.cfg.processing_delay)
            return self.handle(req, thumb)  # synchronous: cancellation cannot split it

    # -- the message set (clauses 7, 8)
    def handle(self, req: Message, thumb: str | None = None) -> Message:
        ok = GeneralResponse.SUCCESSFUL
        rid = req.request_id  # type: ignore[attr-defined]
        match req:
            case GetTimeRequest():
                return GetTimeResponse(rid, int(self.cfg.clock()), ok)
            case GetEventListRequest(time_start=a, time_stop=b):
                ids = self.log.window(a, b)
                if len(ids) > MAX_LIST_IDS:  # cannot be expressed in one KLV (defined by this project)
                    return GetEventListResponse(rid, (), GeneralResponse.FAILED)
                return GetEventListResponse(rid, tuple(ids), ok)
            case GetEventIDRequest(event_id=eid):
                rec = self.log.get(eid)
                if rec is None:
                    return GetEventIDResponse(rid, b"", GeneralResponse.FAILED)
                return GetEventIDResponse(rid, rec, ok)
            case QuerySPBRequest():
                return QuerySPBResponse(rid, 1, self.log.get_status(), ok)
            case LEKeyLoadRequest(keys=keys):
                if not self.keys.load(keys):  # clause 8.1: overflow -> refused, response 1
                    self.log.record(ASM, "KeyTransfer", thumbprint=thumb,
                                    params={"Action": "LEKeyLoad", "KeyIDs": _ids(k.key_id for k in keys)},
                                    exceptions={"Overflow": f"capacity {self.keys.capacity}"})
                    return LEKeyLoadResponse(rid, 1, GeneralResponse.FAILED)
                self.log.record(ASM, "KeyTransfer", thumbprint=thumb,
                                params={"Action": "LEKeyLoad", "KeyIDs": _ids(k.key_id for k in keys)})
                return LEKeyLoadResponse(rid, 0, ok)
            case LEKeyQueryIDRequest(key_id=kid):
                return LEKeyQueryIDResponse(rid, 1 if self.keys.has(kid) else 0, ok)
            case LEKeyQueryAllRequest():
                return LEKeyQueryAllResponse(rid, tuple(self.keys.ids()), ok)
            case LEKeyPurgeIDRequest(key_id=kid):
                found = self.keys.purge(kid)
                self.log.record(ASM, "KeyTransfer", thumbprint=thumb,
                                params={"Action": "LEKeyPurgeID", "KeyIDs": str(kid), "Found": str(found).lower()})
                return LEKeyPurgeIDResponse(rid, 0 if found else 1, ok)
            case LEKeyPurgeAllRequest():
                n = self.keys.purge_all()
                self.log.record(ASM, "KeyTransfer", thumbprint=thumb,
                                params={"Action": "LEKeyPurgeAll", "Count": str(n)})
                return LEKeyPurgeAllResponse(rid, ok)
        raise AssertionError(f"unhandled request {req.NAME}")


def _ids(ids) -> str:
    return ",".join(str(i) for i in ids)
