"""STKM generator: the ECMG role of TS 103 197 clause 5 as a TCP server (BCAST SP-4
14.1.1.3.1). Builds binary STKMs (stkm.py) from the TEKs in CW_provision with the
service / program key of the stream's ECM_id (stkmstream) from the key store."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from ssl import SSLContext
from collections.abc import Callable
from dataclasses import dataclass, field

from tessera.simulcrypt import stkm
from tessera.simulcrypt.aio import (
    Admission, Deadline, Limits, Summary, close_writer, flush, read_loop, serve_admitted,
)
from tessera.simulcrypt.engine import (
    CloseConnection, CwProvision, EcmgCaps, EcmgConnection, EcmgCore, ErrorSent, Event, PeerError, UserMessage,
)
from tessera.simulcrypt.keystore import KeyStore
from tessera.simulcrypt.tables import EE, EP, ErrorInfo, error_name, Interface, profile_of

log = logging.getLogger("tessera.simulcrypt.ecmg")

# Bench only: a user-defined message type (0x8000-0xFFFF, TS 103 197) the generator echoes
# unchanged when echo is enabled, as the bare-TLV baseline of bench_simulcrypt.py.
ECHO_TYPE = 0x8F01
COMP_TIMES_KEPT = 100_000


@dataclass
class GeneratorStats:
    stkms: int = 0
    errors: int = 0
    reads: int = 0      # socket reads handled (for messages-per-read figures)
    messages: int = 0   # CW_provision + echo messages handled
    # seconds, CW_provision -> STKM built: the last COMP_TIMES_KEPT (a long-running generator
    # must not keep one float per STKM forever)
    comp_times: deque[float] = field(default_factory=lambda: deque(maxlen=COMP_TIMES_KEPT))
    refused: int = 0    # CW_provisions answered with out of computational resources (max_comp_time)
    over_time: int = 0  # STKMs sent later than max_comp_time after their CW_provision was read


class StkmGenerator:
    def __init__(self, keystore: KeyStore, super_cas_ids: set[int], caps: EcmgCaps | None = None, *,
                 host: str = "127.0.0.1", port: int = 0, echo: bool = False, max_channels: int = 64,
                 estimate_window: float = 1.0, clock: Callable[[], float] = time.perf_counter,
                 accept_cwe_v1: bool = False, limits: Limits | None = None,
                 allow: dict[str, set[int] | None] | None = None, ssl: SSLContext | None = None,
                 error_info: ErrorInfo = ErrorInfo.PARAM) -> None:
        """estimate_window: how long (s) a measured STKM build time counts towards the
        admission estimate (see `_provision`); clock: seconds, injectable for tests;
        accept_cwe_v1: also accept the legacy CW_encryption layout 0x01, which has no
        integrity protection (off: such a CW_provision gets invalid value).
        limits: per-connection deadlines and connection caps (aio.Limits);
        allow: peer IP address -> the Super_CAS_ids it may use (None: any served here);
        None: any address (the default host is loopback, so only local peers);
        ssl: a server context with client certificates required (aio.tls_context): mutual
        TLS, a Tessera option beyond TS 103 197, which has no TLS;
        error_info: the error_information form (tables.ErrorInfo, 2-byte by default)."""
        self.keystore = keystore
        self.accept_cwe_v1 = accept_cwe_v1
        self.core = EcmgCore(super_cas_ids, caps, max_channels=max_channels, error_info=error_info,
                             ecm_id_known=lambda scid, ecm_id: keystore.traffic_key(scid, ecm_id) is not None)
        self.limits = limits or Limits()
        self.admission = Admission(self.limits, allow)
        self.ssl = ssl
        # what peers cause, summarised (one log line per interval, not one per message)
        self.refusals = Summary(log, "STKM generator: connections refused or dropped")
        self.answered = Summary(log, "STKM generator: errors answered")
        self.host, self.port = host, port
        self.user_types = frozenset({ECHO_TYPE}) if echo else frozenset()
        self.stats = GeneratorStats()
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self.clock = clock
        self.estimate_window = estimate_window
        self._recent: deque[tuple[float, float]] = deque(maxlen=32)  # (when, build seconds)

    @property
    def caps(self) -> EcmgCaps:
        return self.core.caps

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, ssl=self.ssl,
                                                  ssl_handshake_timeout=self.limits.setup_timeout if self.ssl else None)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("STKM generator listening on %s:%d for Super_CAS_id %s", self.host, self.port,
                 ", ".join(f"0x{s:08x}" for s in sorted(self.core.super_cas_ids)))
        return self.port

    async def close(self) -> None:
        if self._server:
            self._server.close()
        for w in list(self._conns):
            await close_writer(w)
        if self._server:
            await self._server.wait_closed()
        self.refusals.flush()
        self.answered.flush()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_admitted(self.admission, self.refusals, self._session, reader, writer)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str,
                       ids: frozenset[int] | None) -> None:
        conn = EcmgConnection(self.core, self.user_types, allowed_ids=ids)
        self._conns.add(writer)

        def on_events(events: list[Event]) -> bool:
            stop = False
            received = self.clock()  # the whole chunk was read now; its messages queue behind each other
            self.stats.reads += 1
            for ev in events:
                if isinstance(ev, CwProvision):
                    self.stats.messages += 1
                    self._provision(conn, ev, received)
                elif isinstance(ev, UserMessage):
                    self.stats.messages += 1
                    conn.send(ev.msg.type, list(ev.msg.params))  # bench echo
                elif isinstance(ev, CloseConnection):
                    stop = True
                elif isinstance(ev, PeerError):
                    self.stats.errors += 1
                elif isinstance(ev, ErrorSent):
                    self.answered.count(error_name(Interface.ECMG, ev.status))
            return stop

        abort = False
        try:
            await read_loop(conn, reader, writer, on_events, self.limits)
        except Deadline as exc:
            self.refusals.count(str(exc))
            abort = True
        except (ConnectionError, OSError) as exc:
            self.refusals.count(f"lost ({type(exc).__name__})")
            log.debug("SCS %s lost: %s", peer, exc)
        finally:
            # the peer may vanish mid-crypto-period: free its ids, other channels go on
            conn.close("transport closed")
            self._conns.discard(writer)
            await close_writer(writer, abort=abort)

    def estimate(self, now: float) -> float:
        """Expected build time of the next STKM: the longest build measured within the last
        estimate_window seconds (0 when there is none, so a recovered generator is probed
        again). Conservative on purpose: max_comp_time is a promise to the SCS."""
        return max((dt for t, dt in self._recent if now - t <= self.estimate_window), default=0.0)

    def _provision(self, conn: EcmgConnection, ev: CwProvision, received: float | None = None) -> None:
        """Answers one CW_provision. If the time it already waited since it was read plus the
        expected build time exceeds max_comp_time, the generator knows it cannot keep its
        promise and answers stream_error `out of computational resources` (0x000D) at once
        instead of a late ECM_response. TS 103 197 (as the reference lists it) has no code
        for an exceeded max_comp_time; 0x000D is this project's choice."""
        t0 = self.clock()
        received = t0 if received is None else received
        budget = self.caps.max_comp_time / 1000
        if (t0 - received) + self.estimate(t0) > budget:
            self.stats.refused += 1
            self.stats.errors += 1
            log.debug("channel %s stream %d CP %d: cannot answer within max_comp_time %d ms, refused",
                      conn.channel_id, ev.stream_id, ev.cp_number, self.caps.max_comp_time)
            conn.send_stream_error(ev.stream_id, EE.OUT_OF_COMPUTATION,
                                   f"cannot answer within max_comp_time {self.caps.max_comp_time} ms".encode())
            return
        scid = conn.super_cas_id or 0
        try:
            datagram = self.build_stkm(scid, ev)
        except stkm.StkmError as exc:
            self.stats.errors += 1
            conn.send_stream_error(ev.stream_id, EE.INVALID_VALUE, str(exc).encode(), param=exc.param)
            return
        except LookupError as exc:
            self.stats.errors += 1
            conn.send_stream_error(ev.stream_id, EE.UNKNOWN_ECM_ID, str(exc).encode())
            return
        except Exception as exc:  # noqa: BLE001 - one bad CW_provision never drops the connection
            self.stats.errors += 1
            log.warning("channel %s stream %d CP %d: STKM build failed (%s), answered unknown error",
                        conn.channel_id, ev.stream_id, ev.cp_number, type(exc).__name__)
            conn.send_stream_error(ev.stream_id, EE.UNKNOWN_ERROR, b"STKM build failed")
            return
        done = self.clock()
        self._recent.append((done, done - t0))
        if done - received > budget:
            # already built: send it and let the SCS judge; the estimate now refuses what follows
            self.stats.over_time += 1
            self.answered.count("STKM later than max_comp_time")
            log.debug("channel %s stream %d CP %d: STKM took %.1f ms, max_comp_time is %d ms",
                      conn.channel_id, ev.stream_id, ev.cp_number, (done - received) * 1000,
                      self.caps.max_comp_time)
        conn.ecm_response(ev.stream_id, ev.cp_number, datagram)
        self.stats.stkms += 1
        self.stats.comp_times.append(done - t0)

    def build_stkm(self, scid: int, ev: CwProvision) -> bytes:
        key = self.keystore.traffic_key(scid, ev.ecm_id)
        if key is None:
            raise LookupError(f"no service or program key for ECM_id {ev.ecm_id}")
        cws = [cw for _, cw in ev.cws]
        if len(cws) > 255:
            raise stkm.StkmError(f"{len(cws)} CWs in one CW_provision: an STKM carries at most 255",
                                 EP.CP_CW_COMBINATION)
        if ev.cw_encryption is not None:
            try:
                _, key_id = stkm.cw_encryption_header(ev.cw_encryption)
                cwt = self.keystore.get("CWT", scid, key_id)
                if cwt is None:
                    raise stkm.StkmError(f"unknown CW transport key id {key_id}")
                cws = stkm.open_cws(cwt.material, ev.cw_encryption, stkm.CwContext(scid, ev.ecm_id, ev.cp_number),
                                    ev.cws, accept_v1=self.accept_cwe_v1)
            except stkm.StkmError as exc:
                raise stkm.StkmError(str(exc), exc.param or EP.CW_ENCRYPTION) from None
        if ev.access_criteria is None:
            raise stkm.StkmError("no access_criteria received for this stream (protection type unknown)",
                                 EP.ACCESS_CRITERIA)
        try:
            ac = stkm.AccessCriteria.decode(ev.access_criteria)
        except stkm.StkmError as exc:
            raise stkm.StkmError(str(exc), EP.ACCESS_CRITERIA) from None
        record = stkm.Stkm(profile=profile_of(scid), super_cas_id=scid, ecm_id=ev.ecm_id, cp_number=ev.cp_number,
                           key_kind=stkm.KeyKind.PEK if key.kind == "PEK" else stkm.KeyKind.SEK, key_id=key.key_id,
                           protection=ac.protection, traffic_params=ac.traffic_params, access_rule=ac.access_rule,
                           teks=[(cp, cw) for (cp, _), cw in zip(ev.cws, cws)])
        return stkm.build(record, key.material)


__all__ = ["ECHO_TYPE", "StkmGenerator", "flush"]
