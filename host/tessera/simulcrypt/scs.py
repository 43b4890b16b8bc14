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
from ssl import SSLContext
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from tessera.simulcrypt import stkm
from tessera.simulcrypt.aio import close_writer, flush, flush_and_drain, read_loop
from tessera.simulcrypt.engine import (
    Alive, ChannelOpen, EcmgCaps, EcmResponse, ErrorSent, Event, PeerError, ScsConnection, State, StreamClosed,
    StreamOpen,
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


@dataclass(frozen=True)
class PeriodTiming:
    """One generator's schedule for one crypto-period (loop time, seconds)."""
    provision_at: float      # CW_provision goes out: broadcast_start - max_comp_time
    broadcast_start: float   # crypto-period start + the start delay that applies
    broadcast_stop: float    # crypto-period end + the stop delay that applies
    start_delay: str         # which channel_status parameter gave the start delay
    stop_delay: str


def plan_period(caps: EcmgCaps, start: float, end: float, *, after_clear: bool = False,
                before_clear: bool = False, ac_changed: bool = False, ac_changes_next: bool = False) -> PeriodTiming:
    """Schedule of one crypto-period [start, end) on a channel with these caps.

    TS 103 197 channel_status delays (the reference gives only their names and types; this
    reading of them is the published meaning of the parameters): transition_delay_start
    replaces delay_start for the first crypto-period after a clear->scrambled transition,
    transition_delay_stop replaces delay_stop for the last one before a scrambled->clear
    transition; AC_delay_start replaces delay_start for the first crypto-period after an
    access-criteria change, AC_delay_stop replaces delay_stop for the last one before it.
    A delay the generator did not advertise falls back to delay_start / delay_stop. When
    both rules hit the same period, the transition wins (our choice)."""
    if after_clear and caps.transition_delay_start is not None:
        d_start, r_start = caps.transition_delay_start, "transition_delay_start"
    elif ac_changed and caps.ac_delay_start is not None:
        d_start, r_start = caps.ac_delay_start, "AC_delay_start"
    else:
        d_start, r_start = caps.delay_start, "delay_start"
    if before_clear and caps.transition_delay_stop is not None:
        d_stop, r_stop = caps.transition_delay_stop, "transition_delay_stop"
    elif ac_changes_next and caps.ac_delay_stop is not None:
        d_stop, r_stop = caps.ac_delay_stop, "AC_delay_stop"
    else:
        d_stop, r_stop = caps.delay_stop, "delay_stop"
    b_start = start + d_start / 1000
    return PeriodTiming(b_start - caps.max_comp_time / 1000, b_start, end + d_stop / 1000, r_start, r_stop)


@dataclass(frozen=True)
class _Change:
    """Where a crypto-period sits relative to transitions and access-criteria changes."""
    after_clear: bool = False
    before_clear: bool = False
    ac_changed: bool = False
    ac_changes_next: bool = False


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
    access_rule: bytes = b""
    timing: dict[int, PeriodTiming] = field(default_factory=dict)   # Super_CAS_id -> schedule
    provisioned_at: dict[int, float] = field(default_factory=dict)  # first CW_provision actually sent
    # Super_CAS_id -> (CP_number, STKM) of an earlier STKM from that generator that already
    # carries this period's TEK (lead_CW >= 1): the scrambler keeps repeating it when the
    # period's own STKM is missing
    fallback: dict[int, tuple[int, bytes]] = field(default_factory=dict)


@dataclass
class ScsStats:
    late: dict[int, int] = field(default_factory=dict)  # Super_CAS_id -> ECM_responses not within max_comp_time
    retries: int = 0      # CW_provisions sent again after a late answer
    discarded: int = 0    # answers that came after the SCS had given up on their CW_provision
    fallbacks: int = 0    # missing STKMs covered by an earlier STKM


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
        self.abandoned: dict[int, int] = {}  # CP_number -> CW_provisions given up on, answer still due
        self.last_stkm: tuple[int, bytes, frozenset[int]] | None = None  # CP, STKM, CPs of the TEKs in it

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
                 keepalive: float | None = None, retries: int = 1, ssl: SSLContext | None = None) -> None:
        """ssl: a client context (aio.tls_context) for mutual TLS to the generators, a
        Tessera option beyond TS 103 197 (which has no TLS); the generator's certificate must
        name the host given in its GeneratorSpec."""
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
        self.retries = retries  # CW_provision resends after a late answer, while there is time (see _provision)
        self.scrambled = False  # False: the next crypto-period follows a clear->scrambled transition
        self.stats = ScsStats()
        self.ssl = ssl

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
        reader, writer = await asyncio.wait_for(asyncio.open_connection(spec.host, spec.port, ssl=self.ssl),
                                                self.timeout)
        link.conn = conn = ScsConnection(spec.channel_id, spec.super_cas_id, self.version)
        link.writer = writer
        link.sent_ac = None
        link.abandoned.clear()
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
                    if link.abandoned.get(ev.cp_number):
                        self._forget(link, ev.cp_number, "ECM_response")
                        continue
                    fut = link.pending.pop(ev.cp_number, None)
                    if fut and not fut.done():
                        fut.set_result(ev.datagram)
                elif isinstance(ev, Alive) and link.alive and not link.alive.done():
                    link.alive.set_result(True)
                elif isinstance(ev, PeerError) and ev.stream_id is not None and link.abandoned:
                    # a generator answers its CW_provisions in order: this error answers the
                    # oldest one the SCS has already given up on
                    self._forget(link, next(iter(link.abandoned)), f"stream_error ({ev.describe(Interface.ECMG)})")
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

    def _forget(self, link: _Link, cp: int, what: str) -> None:
        n = link.abandoned.get(cp, 0) - 1
        if n > 0:
            link.abandoned[cp] = n
        else:
            link.abandoned.pop(cp, None)
        self.stats.discarded += 1
        log.info("%s: %s from 0x%08x for CP %d came after max_comp_time, discarded", self.service, what,
                 link.spec.super_cas_id, cp)

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
                await flush_and_drain(link.conn, link.writer)
            await self._drop(link)

    # ---------------------------------------------------------------- crypto-periods
    def _lead(self) -> float:
        """Seconds between 'now' and the first crypto-period start so every generator can be
        provisioned in time: max over channels of -(most negative start delay) + max_comp_time."""
        lead = 0.0
        for link in self.links:
            if link.conn and link.conn.caps:
                c = link.conn.caps
                earliest = min(d for d in (c.delay_start, c.ac_delay_start, c.transition_delay_start) if d is not None)
                lead = max(lead, max(0, -earliest) / 1000 + c.max_comp_time / 1000)
        return lead + 0.05

    async def run(self, periods: int, first_cp: int = 0, *, access_rules: Mapping[int, bytes] | None = None,
                  clear_after: bool = False) -> list[CryptoPeriod]:
        """Scrambles `periods` crypto-periods. access_rules maps a period index (0-based in this
        run) to the access rule that applies from that period on (an access-criteria change).
        The first period of a run follows a clear->scrambled transition unless the previous
        run ended scrambled; clear_after makes the last period the one before a
        scrambled->clear transition. The delays of plan_period apply accordingly."""
        loop = asyncio.get_running_loop()
        dur = self.cp_duration / 10
        outside = sorted(k for k in (access_rules or {}) if not 0 <= k < periods)
        if outside:
            raise ValueError(f"access_rules names period indexes {outside} outside this run of {periods}")
        rules = [self.access_rule]
        for k in range(periods):
            rules.append((access_rules or {}).get(k, rules[-1]))
        t0 = loop.time() + self._lead()
        out = []
        for k in range(periods):
            cp = (first_cp + k) & 0xFFFF
            start = t0 + k * dur
            rule = rules[k + 1]
            change = _Change(after_clear=k == 0 and not self.scrambled, before_clear=clear_after and k == periods - 1,
                             ac_changed=rule != rules[k] and not (k == 0 and not self.scrambled),
                             ac_changes_next=k + 1 < periods and rules[k + 2] != rule)
            period = CryptoPeriod(self.service, cp, self.tekgen.tek(cp), start, start + dur,
                                  self.tekgen.protection, self.tekgen.traffic_params, access_rule=rule)
            await asyncio.gather(*(self._provision(link, period, change) for link in self.links))
            self.periods.append(period)
            out.append(period)
            if self.sink is not None:
                res = self.sink(period)
                if asyncio.iscoroutine(res):
                    await res
        if periods:
            self.access_rule = rules[-1]
            self.scrambled = not clear_after
        return out

    def _fail(self, link: _Link, period: CryptoPeriod, why: str) -> None:
        """No STKM from this generator for this crypto-period. If the last STKM it delivered
        already carries this period's TEK (lead_CW >= 1), the scrambler can keep repeating it."""
        scid = link.spec.super_cas_id
        period.missing[scid] = why
        last = link.last_stkm
        if last is not None and period.cp_number in last[2]:
            period.fallback[scid] = (last[0], last[1])
            self.stats.fallbacks += 1
        log.warning("%s: no STKM from 0x%08x for CP %d: %s%s", self.service, scid, period.cp_number, why,
                    f"; falling back to the STKM of CP {last[0]}" if scid in period.fallback and last else "")

    async def _provision(self, link: _Link, period: CryptoPeriod, change: _Change = _Change()) -> None:
        """CW_provision for one crypto-period on one generator, at the time the channel's
        delays ask for. An ECM_response must come within max_comp_time: if it does not, the
        attempt counts as failed (logged, `stats.late`), the answer is discarded if it still
        comes, and the SCS sends the same CW_provision again (up to `retries` times) as long
        as a new answer within max_comp_time would still arrive before the crypto-period
        starts. Otherwise the period's STKM from this generator is missing, and `_fail`
        falls back to the previous STKM when that one carries this period's TEK."""
        loop = asyncio.get_running_loop()
        scid = link.spec.super_cas_id
        if not link.up:
            try:  # the generator vanished earlier: try once per crypto-period to come back
                await self._connect(link)
            except (OSError, asyncio.TimeoutError, ScsError, ConnectionError) as exc:
                self._fail(link, period, f"generator unavailable ({type(exc).__name__})")
                return
        conn, writer = link.conn, link.writer
        assert conn is not None and writer is not None and conn.caps is not None
        caps = conn.caps
        timing = plan_period(caps, period.start, period.end, after_clear=change.after_clear,
                             before_clear=change.before_clear, ac_changed=change.ac_changed,
                             ac_changes_next=change.ac_changes_next)
        period.timing[scid] = timing
        need = timing.broadcast_start
        budget = caps.max_comp_time / 1000
        await asyncio.sleep(max(0.0, timing.provision_at - loop.time()))
        cp = period.cp_number
        # CW_per_msg CWs ending lead_CW periods after the current one
        cps = [(cp + i) & 0xFFFF for i in range(caps.lead_cw - caps.cw_per_msg + 1, caps.lead_cw + 1)]
        cws = [self.tekgen.tek(c) for c in cps]
        cwe = None
        if link.spec.cw_key is not None:  # layout v2: encrypted and authenticated (docs/bcast-profile.md)
            cwe, cws = stkm.seal_cws(link.spec.cw_key.material, link.spec.cw_key.key_id,
                                     stkm.CwContext(scid, link.spec.ecm_id, cp), list(zip(cps, cws)))
        ac = stkm.AccessCriteria(self.tekgen.protection, self.tekgen.traffic_params, period.access_rule).encode()
        stream = conn.streams.get(link.spec.stream_id)
        send_ac = ac if (link.sent_ac != ac or (stream and stream.access_criteria_transfer_mode)) else None
        attempt = 0
        while True:
            fut = loop.create_future()
            link.pending[cp] = fut
            t_sent = loop.time()
            period.provisioned_at.setdefault(scid, t_sent)
            try:
                conn.cw_provision(link.spec.stream_id, cp, list(zip(cps, cws)), cw_encryption=cwe,
                                  cp_duration=self.cp_duration, access_criteria=send_ac)
                flush(conn, writer)
                link.sent_ac = ac
                datagram = await asyncio.wait_for(fut, budget)
                break
            except asyncio.TimeoutError:
                link.pending.pop(cp, None)
                link.abandoned[cp] = link.abandoned.get(cp, 0) + 1
                self.stats.late[scid] = self.stats.late.get(scid, 0) + 1
                log.warning("%s: no ECM_response from 0x%08x for CP %d within max_comp_time %d ms (attempt %d)",
                            self.service, scid, cp, caps.max_comp_time, attempt + 1)
                if attempt < self.retries and loop.time() + budget <= period.start and link.up:
                    attempt += 1
                    self.stats.retries += 1
                    continue
                self._fail(link, period, f"ECM_response exceeded max_comp_time ({caps.max_comp_time} ms)")
                return
            except (ConnectionError, ScsError, RuntimeError) as exc:
                link.pending.pop(cp, None)
                self._fail(link, period, f"{type(exc).__name__}: {exc}")
                return
        now = loop.time()
        link.last_stkm = (cp, datagram, frozenset(cps))
        period.stkms[scid] = datagram
        period.latency[scid] = now - t_sent
        period.in_time[scid] = now <= need
        period.windows[scid] = (timing.broadcast_start, timing.broadcast_stop)
        period.rep_period_ms[scid] = caps.ecm_rep_period
