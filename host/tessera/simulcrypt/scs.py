"""SimulCrypt synchroniser (SCS): one instance per encrypted service (BCAST SP-4
14.1.1.3.3). Connects to one or more STKM generators, sets up a channel and one STKM
stream on each (ECM_id = the service's stkmstream for that KMS), takes a TEK per
crypto-period from the TEK generator, provisions the generators ahead of each
crypto-period as their channel_status asks (delay_start / delay_stop, lead_CW /
CW_per_msg, max_comp_time, ECM_rep_period) and hands every crypto-period's STKMs on with
the matching TEK for the scrambler."""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tessera.simulcrypt import stkm
from tessera.simulcrypt.aio import close_writer, flush, read_loop
from tessera.simulcrypt.engine import (
    Alive, ChannelOpen, EcmResponse, ErrorSent, Event, PeerError, ScsConnection, State, StreamClosed, StreamOpen,
)
from tessera.simulcrypt.keystore import Key
from tessera.simulcrypt.tables import Interface

log = logging.getLogger("tessera.simulcrypt.scs")


class ScsError(Exception):
    pass


@dataclass
class GeneratorSpec:
    host: str
    port: int
    super_cas_id: int
    channel_id: int
    stream_id: int
    ecm_id: int                    # = stkmstream, unique per KMS (14.1.1.3.1)
    cw_key: Key | None = None      # CWT key: CW_provision TEKs are then sent encrypted


class TekGenerator:
    """The CWG: a fresh random TEK per crypto-period and the traffic-protection parameters of
    the service. Parameter contents are ours: IPsec SPI (4 bytes), SRTP master salt (14) +
    MKI (4), ISMACryp salt (8)."""

    def __init__(self, protection: stkm.Protection, tek_len: int = 16) -> None:
        self.protection = protection
        self.tek_len = tek_len
        size = {stkm.Protection.IPSEC: 4, stkm.Protection.SRTP: 18, stkm.Protection.ISMACRYP: 8}[protection]
        self.traffic_params = os.urandom(size)
        self._teks: dict[int, bytes] = {}

    def tek(self, cp: int) -> bytes:
        if cp not in self._teks:
            self._teks[cp] = secrets.token_bytes(self.tek_len)
            for old in [c for c in self._teks if c < cp - 4]:
                del self._teks[old]
        return self._teks[cp]


@dataclass
class CryptoPeriod:
    """What the SCS hands to the scrambler and MUX for one crypto-period."""
    service: str
    cp_number: int
    tek: bytes = field(repr=False)
    start: float = 0.0               # loop time the crypto-period starts
    end: float = 0.0
    protection: stkm.Protection = stkm.Protection.SRTP
    traffic_params: bytes = b""
    stkms: dict[int, bytes] = field(default_factory=dict)          # Super_CAS_id -> STKM
    windows: dict[int, tuple[float, float]] = field(default_factory=dict)  # STKM broadcast start/stop
    rep_period_ms: dict[int, int] = field(default_factory=dict)
    latency: dict[int, float] = field(default_factory=dict)        # CW_provision -> ECM_response, s
    in_time: dict[int, bool] = field(default_factory=dict)         # STKM there before its broadcast start
    missing: dict[int, str] = field(default_factory=dict)          # Super_CAS_id -> why


class _Link:
    def __init__(self, spec: GeneratorSpec) -> None:
        self.spec = spec
        self.conn: ScsConnection | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task | None = None
        self.pending: dict[int, asyncio.Future] = {}
        self.setup: asyncio.Future | None = None
        self.alive: asyncio.Future | None = None
        self.sent_ac: bytes | None = None

    @property
    def up(self) -> bool:
        return self.conn is not None and self.conn.state is State.OPEN and self.writer is not None \
            and not self.writer.is_closing()

    def fail_all(self, exc: Exception) -> None:
        for fut in [*self.pending.values(), self.setup, self.alive]:
            if fut is not None and not fut.done():
                fut.set_exception(exc)
        self.pending.clear()


Sink = Callable[[CryptoPeriod], Awaitable[None] | None]


class Scs:
    def __init__(self, service: str, generators: list[GeneratorSpec], *, cp_duration: int = 10,
                 protection: stkm.Protection = stkm.Protection.SRTP, access_rule: bytes = b"",
                 sink: Sink | None = None, timeout: float = 2.0, version: int = 3,
                 keepalive: float | None = None) -> None:
        if not generators:
            raise ValueError("an SCS needs at least one STKM generator")
        self.service = service
        self.links = [_Link(g) for g in generators]
        self.cp_duration = cp_duration  # nominal_CP_duration, 100 ms units
        self.tekgen = TekGenerator(protection)
        self.access_rule = access_rule
        self.sink = sink
        self.timeout = timeout
        self.version = version
        self.periods: list[CryptoPeriod] = []
        self.keepalive = keepalive  # seconds between channel_test/stream_test rounds; None: off
        self._keepalive_task: asyncio.Task | None = None

    # ---------------------------------------------------------------- connections
    async def start(self) -> None:
        results = await asyncio.gather(*(self._connect(l) for l in self.links), return_exceptions=True)
        reasons = []
        for link, res in zip(self.links, results):
            if isinstance(res, BaseException):
                log.warning("%s: generator 0x%08x at %s:%d unavailable: %s", self.service, link.spec.super_cas_id,
                            link.spec.host, link.spec.port, res)
                reasons.append(f"0x{link.spec.super_cas_id:08x}: {res or type(res).__name__}")
                await self._drop(link)  # half set up (e.g. stream refused): start over next period
        if not any(l.up for l in self.links):
            raise ScsError(f"{self.service}: no STKM generator usable ({'; '.join(reasons)})")
        if self.keepalive:
            self._keepalive_task = asyncio.create_task(self._keepalive_loop(self.keepalive))

    async def _keepalive_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            for scid, ok in (await self.test_channels()).items():
                if not ok:
                    log.warning("%s: generator 0x%08x failed the keep-alive", self.service, scid)

    async def _connect(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        spec = link.spec
        reader, writer = await asyncio.wait_for(asyncio.open_connection(spec.host, spec.port), self.timeout)
        link.conn = conn = ScsConnection(spec.channel_id, spec.super_cas_id, self.version)
        link.writer = writer
        link.sent_ac = None
        link.setup = loop.create_future()
        link.task = asyncio.create_task(self._reader(link, reader, writer))
        conn.setup()
        flush(conn, writer)
        await asyncio.wait_for(link.setup, self.timeout)
        link.setup = loop.create_future()
        conn.stream_setup(spec.stream_id, spec.ecm_id, self.cp_duration)
        flush(conn, writer)
        await asyncio.wait_for(link.setup, self.timeout)
        caps = conn.caps
        assert caps is not None
        if self.cp_duration < caps.min_cp_duration:
            raise ScsError("crypto-period shorter than the generator's min_CP_duration")
        log.info("%s: channel %d / stream %d to Super_CAS_id 0x%08x (ECM_id %d) open", self.service,
                 spec.channel_id, spec.stream_id, spec.super_cas_id, spec.ecm_id)

    async def _reader(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = link.conn
        assert conn is not None

        def on_events(events: list[Event]) -> None:
            for ev in events:
                if isinstance(ev, (ChannelOpen, StreamOpen, StreamClosed)) and link.setup and not link.setup.done():
                    link.setup.set_result(ev)
                elif isinstance(ev, EcmResponse):
                    fut = link.pending.pop(ev.cp_number, None)
                    if fut and not fut.done():
                        fut.set_result(ev.datagram)
                elif isinstance(ev, Alive) and link.alive and not link.alive.done():
                    link.alive.set_result(True)
                elif isinstance(ev, PeerError):
                    exc = ScsError(f"generator reports {ev.describe(Interface.ECMG)}")
                    if link.setup and not link.setup.done():
                        link.setup.set_exception(exc)
                    for fut in link.pending.values():
                        if not fut.done():
                            fut.set_exception(exc)
                    link.pending.clear()
                elif isinstance(ev, ErrorSent) and link.setup and not link.setup.done():
                    link.setup.set_exception(ScsError(f"rejected the generator's answer: {ev.detail}"))

        try:
            await read_loop(conn, reader, writer, on_events)
        except (ConnectionError, OSError) as exc:
            log.warning("%s: generator 0x%08x lost: %s", self.service, link.spec.super_cas_id, exc)
        finally:
            conn.state = State.CLOSED
            link.fail_all(ConnectionError("STKM generator connection closed"))
            await close_writer(writer)

    async def test_channels(self) -> dict[int, bool]:
        """channel_test on every link (keep-alive); a link that does not answer in time is dropped."""
        loop = asyncio.get_running_loop()
        out = {}
        for link in self.links:
            ok = False
            if link.alive is not None and not link.alive.done():
                continue  # a test is already in flight on this link
            if link.up:
                assert link.conn and link.writer
                link.alive = loop.create_future()
                link.conn.test()
                link.conn.stream_test(link.spec.stream_id)
                flush(link.conn, link.writer)
                try:
                    ok = await asyncio.wait_for(link.alive, self.timeout)
                except (asyncio.TimeoutError, ConnectionError, ScsError):
                    await self._drop(link)
            out[link.spec.super_cas_id] = ok
        return out

    async def _drop(self, link: _Link) -> None:
        if link.writer:
            await close_writer(link.writer)
        if link.task:
            await asyncio.gather(link.task, return_exceptions=True)

    async def close(self) -> None:
        if self._keepalive_task:
            self._keepalive_task.cancel()
            await asyncio.gather(self._keepalive_task, return_exceptions=True)
        for link in self.links:
            if link.up and link.conn and link.writer:
                # stream_close_request, wait for the response, then channel_close (TS 103 197 5.4)
                link.setup = asyncio.get_running_loop().create_future()
                link.conn.stream_close(link.spec.stream_id)
                flush(link.conn, link.writer)
                try:
                    await asyncio.wait_for(link.setup, self.timeout)
                except (asyncio.TimeoutError, ConnectionError, ScsError):
                    log.warning("%s: no stream_close_response from 0x%08x", self.service, link.spec.super_cas_id)
                link.conn.close()
                flush(link.conn, link.writer)
                try:
                    await link.writer.drain()
                except (ConnectionError, OSError):
                    pass
            await self._drop(link)

    # ---------------------------------------------------------------- crypto-periods
    def _lead(self) -> float:
        """Seconds between 'now' and the first crypto-period start so every generator can be
        provisioned in time: max over channels of -delay_start + max_comp_time."""
        lead = 0.0
        for link in self.links:
            if link.conn and link.conn.caps:
                c = link.conn.caps
                lead = max(lead, max(0, -c.delay_start) / 1000 + c.max_comp_time / 1000)
        return lead + 0.05

    async def run(self, periods: int, first_cp: int = 0) -> list[CryptoPeriod]:
        loop = asyncio.get_running_loop()
        dur = self.cp_duration / 10
        t0 = loop.time() + self._lead()
        out = []
        for k in range(periods):
            cp = (first_cp + k) & 0xFFFF
            start = t0 + k * dur
            period = CryptoPeriod(self.service, cp, self.tekgen.tek(cp), start, start + dur,
                                  self.tekgen.protection, self.tekgen.traffic_params)
            await asyncio.gather(*(self._provision(link, period) for link in self.links))
            self.periods.append(period)
            out.append(period)
            if self.sink is not None:
                res = self.sink(period)
                if asyncio.iscoroutine(res):
                    await res
        return out

    async def _provision(self, link: _Link, period: CryptoPeriod) -> None:
        loop = asyncio.get_running_loop()
        scid = link.spec.super_cas_id
        if not link.up:
            try:  # the generator vanished earlier: try once per crypto-period to come back
                await self._connect(link)
            except (OSError, asyncio.TimeoutError, ScsError, ConnectionError) as exc:
                period.missing[scid] = f"generator unavailable ({type(exc).__name__})"
                return
        conn, writer = link.conn, link.writer
        assert conn is not None and writer is not None and conn.caps is not None
        caps = conn.caps
        need = period.start + caps.delay_start / 1000  # STKM broadcast starts (TS 103 197 5.3 delay_start)
        send_at = need - caps.max_comp_time / 1000
        await asyncio.sleep(max(0.0, send_at - loop.time()))
        cp = period.cp_number
        # CW_per_msg CWs ending lead_CW periods after the current one
        cps = [(cp + i) & 0xFFFF for i in range(caps.lead_cw - caps.cw_per_msg + 1, caps.lead_cw + 1)]
        cws = [self.tekgen.tek(c) for c in cps]
        cwe = None
        if link.spec.cw_key is not None:
            counter = os.urandom(16)
            cws = stkm.crypt_cws(link.spec.cw_key.material, counter, cws)
            cwe = stkm.cw_encryption_param(link.spec.cw_key.key_id, counter)
        ac = stkm.AccessCriteria(self.tekgen.protection, self.tekgen.traffic_params, self.access_rule).encode()
        stream = conn.streams.get(link.spec.stream_id)
        send_ac = ac if (link.sent_ac != ac or (stream and stream.access_criteria_transfer_mode)) else None
        fut = loop.create_future()
        link.pending[cp] = fut
        t_sent = loop.time()
        try:
            conn.cw_provision(link.spec.stream_id, cp, list(zip(cps, cws)), cw_encryption=cwe,
                              cp_duration=self.cp_duration, access_criteria=send_ac)
            flush(conn, writer)
            link.sent_ac = ac
            datagram = await asyncio.wait_for(fut, max(self.timeout, caps.max_comp_time / 1000))
        except (asyncio.TimeoutError, ConnectionError, ScsError, RuntimeError) as exc:
            link.pending.pop(cp, None)
            period.missing[scid] = f"{type(exc).__name__}: {exc}"
            log.warning("%s: no STKM from 0x%08x for CP %d: %s", self.service, scid, cp, exc)
            return
        now = loop.time()
        period.stkms[scid] = datagram
        period.latency[scid] = now - t_sent
        period.in_time[scid] = now <= need
        period.windows[scid] = (need, period.end + caps.delay_stop / 1000)
        period.rep_period_ms[scid] = caps.ecm_rep_period
