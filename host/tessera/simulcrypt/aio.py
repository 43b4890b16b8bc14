"""asyncio plumbing shared by the four role adapters: the read loop with its per-connection
deadlines and bounded send buffer, the admission checks of the two servers (connection
caps, peer allow-list), mutual TLS contexts, and rate-limited log summaries."""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tessera.simulcrypt.engine import Endpoint, Event, State

log = logging.getLogger("tessera.simulcrypt")

READ_SIZE = 65536


@dataclass(frozen=True)
class Limits:
    """Per-connection deadlines and caps of an ECMG / MUX server (project defaults; TS 103 197
    sets none). A connection that breaks one is closed; the others go on.

    setup_timeout: seconds from accept to an open channel (channel_setup answered by
    channel_status), so connections that never set one up cannot pile up.
    idle_timeout: seconds without a single byte from the peer on an open channel (the SCS /
    EMMG keeps a quiet channel alive with channel_test). None: no limit.
    message_timeout: seconds a started message may take to arrive completely (slow senders).
    drain_timeout: seconds the peer may leave our answers unread once write_buffer bytes
    are queued for it; the connection is not read meanwhile, so a peer that never reads
    stops being served and is dropped.
    max_connections / max_per_peer: open connections in total / per peer IP address (one
    channel per connection, TS 103 197 5.1.2, so this bounds channels per peer too). One SCS
    host runs an SCS per service, each with its own connection, hence 32 per address; the
    engines cap open channels separately (64 per generator, 32 per MUX).
    error_rate / error_burst: errors a connection may earn (token bucket: per second /
    depth); beyond, it is dropped, so a flood of bad messages costs a bounded amount of work
    and memory and cannot hold up the other connections.
    read_size: bytes read (and answered) per turn of a connection, so one peer's burst of
    small valid requests cannot hold the event loop for long (4096 B: ~370 minimal messages)."""
    setup_timeout: float = 10.0
    idle_timeout: float | None = 300.0
    message_timeout: float = 10.0
    drain_timeout: float = 10.0
    write_buffer: int = 256 * 1024
    max_connections: int = 96
    max_per_peer: int = 32
    error_rate: float = 20.0
    error_burst: int = 200
    read_size: int = 4096


class Summary:
    """Counts events by reason and logs one line per interval (never one per event): what
    unauthenticated peers cause must not fill the log (issue 11 #10)."""

    def __init__(self, logger: logging.Logger, what: str, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.what, self.interval, self.clock = logger, what, interval, clock
        self.total: dict[str, int] = {}
        self._pending: dict[str, int] = {}
        self._last = clock()

    def count(self, reason: str, n: int = 1) -> None:
        self.total[reason] = self.total.get(reason, 0) + n
        self._pending[reason] = self._pending.get(reason, 0) + n
        if self.clock() - self._last >= self.interval:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.logger.warning("%s in the last %.0f s: %s", self.what, self.clock() - self._last,
                                ", ".join(f"{n} x {r}" for r, n in sorted(self._pending.items())))
            self._pending.clear()
        self._last = self.clock()


def normalise(host: str) -> str:
    """One spelling per address (an IPv4-mapped IPv6 peer is its IPv4 address)."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


class Admission:
    """Who may connect: the allow-list of peer addresses (each with the ids it may use:
    Super_CAS_ids on an ECMG, client_ids on a MUX; None = any id), and the connection caps."""

    def __init__(self, limits: Limits, allow: Mapping[str, Iterable[int] | None] | None = None) -> None:
        self.limits = limits
        self.allow: dict[str, frozenset[int] | None] | None = None if allow is None else {
            normalise(h): (None if ids is None else frozenset(ids)) for h, ids in allow.items()}
        self.per_peer: dict[str, int] = {}
        self.total = 0
        self.peak_per_peer = 0  # most connections one peer ever held at once (figures, tests)

    def admit(self, host: str) -> tuple[bool, str, frozenset[int] | None]:
        """(admitted, reason if not, the ids this peer may use)."""
        host = normalise(host)
        ids = None
        if self.allow is not None:
            if host not in self.allow:
                return False, "peer not in the allow-list", None
            ids = self.allow[host]
        if self.total >= self.limits.max_connections:
            return False, "too many connections", None
        if self.per_peer.get(host, 0) >= self.limits.max_per_peer:
            return False, "too many connections from one peer", None
        self.total += 1
        self.per_peer[host] = self.per_peer.get(host, 0) + 1
        self.peak_per_peer = max(self.peak_per_peer, self.per_peer[host])
        return True, "", ids

    def release(self, host: str) -> None:
        host = normalise(host)
        self.total -= 1
        n = self.per_peer.get(host, 0) - 1
        if n > 0:
            self.per_peer[host] = n
        else:
            self.per_peer.pop(host, None)


Session = Callable[[asyncio.StreamReader, asyncio.StreamWriter, str, "frozenset[int] | None"], Awaitable[None]]


async def serve_admitted(admission: Admission, refusals: Summary, session: Session,
                         reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A server's connection callback: a peer the admission refuses is cut at once (and
    counted); an admitted one runs session(reader, writer, host, the ids it may use)."""
    host = peer_host(writer)
    ok, why, ids = admission.admit(host)
    if not ok:
        refusals.count(why)
        await close_writer(writer, abort=True)
        return
    try:
        await session(reader, writer, host, ids)
    finally:
        admission.release(host)


def peer_host(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return normalise(peer[0]) if isinstance(peer, tuple) and peer else "?"


def tls_context(cert: str | Path, key: str | Path, ca: str | Path, *, server: bool) -> ssl.SSLContext:
    """Mutual TLS (1.2 or later) for a SimulCrypt link: our certificate and key, and the CA
    the peer's certificate must chain to; the peer must present one. A Tessera option beyond
    the standard: DVB SimulCrypt (TS 103 197) itself runs over plain TCP, with no TLS."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(str(ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def flush(engine: Endpoint, writer: asyncio.StreamWriter) -> None:
    out = engine.data_to_send()
    if out and not writer.is_closing():
        writer.write(out)


async def flush_and_drain(engine: Endpoint, writer: asyncio.StreamWriter) -> None:
    """Send what the engine has queued (e.g. a closing channel_close) on a link that may
    already be gone; a dead link is not an error here."""
    flush(engine, writer)
    try:
        await writer.drain()
    except (ConnectionError, OSError):
        pass


class Deadline(Exception):
    """A peer broke a per-connection deadline (Limits); the reason is the message."""


async def read_loop(engine: Endpoint, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    on_events: Callable[[list[Event]], bool | None], limits: Limits | None = None) -> None:
    """Feeds the engine until EOF, or until on_events returns True (close requested).
    With limits (servers), raises Deadline when the peer is too slow to set up a channel,
    idle, too slow to finish a message, or does not read our answers."""
    loop = asyncio.get_running_loop()
    started = stamp = loop.time()
    if limits is not None:
        writer.transport.set_write_buffer_limits(high=limits.write_buffer)
        engine.error_budget = float(limits.error_burst)
    partial: float | None = None  # when the message now arriving started
    while True:
        timeout, why = None, ""
        if limits is not None:
            now = loop.time()
            if not engine.framer.pending():
                partial = None
            elif partial is None:
                partial = now
            if engine.state is not State.OPEN:
                timeout, why = started + limits.setup_timeout - now, "no channel set up in time"
            elif partial is not None:
                timeout, why = partial + limits.message_timeout - now, "message not completed in time"
            elif limits.idle_timeout is not None:
                timeout, why = limits.idle_timeout, "idle"
            if timeout is not None and timeout <= 0:
                raise Deadline(why)
        try:
            data = await asyncio.wait_for(reader.read(READ_SIZE if limits is None else limits.read_size), timeout)
        except asyncio.TimeoutError:
            raise Deadline(why) from None
        if not data:
            return
        if limits is not None:
            now = loop.time()
            engine.error_budget = min(float(limits.error_burst),
                                      (engine.error_budget or 0.0) + (now - stamp) * limits.error_rate)
            stamp = now
        frames = engine.framer.frames
        events = engine.receive_data(data)
        if engine.framer.frames != frames:
            partial = None  # a message completed: the timer is for the one now arriving
        stop = on_events(events)
        flush(engine, writer)
        if limits is None:
            await writer.drain()
        else:
            waited = loop.time()
            try:
                await asyncio.wait_for(writer.drain(), limits.drain_timeout)
            except asyncio.TimeoutError:
                raise Deadline("peer does not read its answers") from None
            waited = loop.time() - waited  # our wait, not the peer's: it does not count against it
            started += waited
            if partial is not None:
                partial += waited
        if engine.flooded:
            raise Deadline("too many bad messages")
        if stop:
            return


async def close_writer(writer: asyncio.StreamWriter, abort: bool = False) -> None:
    if abort:
        writer.transport.abort()  # a peer that does not read gets no graceful close
        return
    if writer.is_closing():
        return
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 2.0)
    except (OSError, asyncio.TimeoutError, ConnectionError, ssl.SSLError):
        pass
