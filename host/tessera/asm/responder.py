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
from tessera.asm.net import INITIATOR_ROLES, PeerRejected, Profile, RoleRefused, TLSStream
from tessera.asm.store import KeyStore, SecurityLog
from tessera.asm.tls import ASM_PORT, Credentials, TLSChannel, TLSProfileError

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


class Responder:
    def __init__(self, cfg: ResponderConfig) -> None:
        self.cfg = cfg
        self.profile = Profile(cfg.creds, server=True, peer_roles=frozenset(cfg.initiator_roles))
        self.keys = KeyStore(cfg.key_capacity, clock=cfg.clock, persist=cfg.persist_keys)
        self.log = SecurityLog(cfg.db, clock=cfg.clock)
        self.work_lock = asyncio.Lock()  # one request is processed at a time (store + log)
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task] = set()
        self.port = 0

    # -- lifecycle
    async def start(self) -> int:
        self._server = await asyncio.start_server(self._on_connect, self.cfg.host, self.cfg.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self.log.record(OPS, "SPBStartup", params={"Port": str(self.port)})
        log.info("ASM responder listening on %s:%d", self.cfg.host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            for t in list(self._conns):
                t.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
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

    # -- connections
    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task
        self._conns.add(task)
        try:
            await self._connection(reader, writer)
        finally:
            self._conns.discard(task)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        stream = TLSStream(reader, writer, TLSChannel(self.profile.ctx, server=True))
        engine = ResponderEngine(self.cfg.max_value)
        thumb: str | None = None
        try:
            await asyncio.wait_for(stream.handshake(), self.cfg.handshake_timeout)
            thumb, _ = self.profile.check_peer(stream.chan.peer_certificate())
            self.log.record(ASM, "LinkOpened", thumbprint=thumb, params={"Peer": f"{peer[0]}:{peer[1]}"})
            await self._serve(stream, engine, thumb)
        except asyncio.TimeoutError:
            what = "handshake" if thumb is None else "request"
            log.info("%s: timed out in the %s", peer, what)
            self.log.record(ASM, "LinkException", thumbprint=thumb, exceptions={"Timeout": what})
        except RoleRefused as exc:
            log.warning("security: %s: initiator refused: %s", peer, exc)
            self.log.record(ASM, "LinkException", thumbprint=exc.thumbprint,
                            params={"Peer": f"{peer[0]}:{peer[1]}"},
                            exceptions={"RoleRefused": exc.violations[0][:2000]})
        except PeerRejected as exc:
            log.warning("security: %s: certificate refused: %s", peer, exc)
            self.log.record(ASM, "LinkException", thumbprint=exc.thumbprint,
                            exceptions={"CertificateRefused": "; ".join(exc.violations)[:2000]})
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
        loop = asyncio.get_running_loop()
        while True:
            timeout = self.cfg.request_timeout if engine.mid_request else self.cfg.idle_timeout
            app = await asyncio.wait_for(stream.recv(), timeout)
            t_end = loop.time()  # clause 6.4 item 2: latency runs from the end of the request
            engine.receive_data(app)  # fatal CodecError closes the connection
            while (ev := engine.next_event()) is not None:
                resp = await self._respond(ev, t_end, thumb)
                if isinstance(resp, GetTimeResponse):  # clause 7.2: time taken when queued
                    resp = dataclasses.replace(resp, time=int(self.cfg.clock()))
                await stream.send(engine.send_response(resp))

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
