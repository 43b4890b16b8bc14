"""LTKM generator: the EMMG role of TS 103 197 clause 6 as a TCP client of the MUX (BCAST
SP-4 14.1.1.3.4, DRM profile only). Sets up a channel and an LTKM stream (data_type 0x00),
asks for bandwidth, then sends LTKMs with data_provision over TCP or UDP, paced to stay
within the allocated bandwidth."""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from ssl import SSLContext

from tessera.simulcrypt import ltkm
from tessera.simulcrypt.aio import close_writer, flush, flush_and_drain, read_loop
from tessera.simulcrypt.engine import (
    Alive, BandwidthAllocated, ChannelOpen, EmmgConnection, ErrorSent, Event, PeerError, State, StreamClosed,
    StreamOpen,
)
from tessera.simulcrypt.keystore import KeyStore
from tessera.simulcrypt.stkm import KeyKind
from tessera.simulcrypt.tables import ME, Interface

log = logging.getLogger("tessera.simulcrypt.emmg")


class EmmgError(Exception):
    pass


# error_status values only a data_provision can earn: such a stream_error is never the
# answer to a control request (stream_close_request, stream_BW_request, ...), however late
# it arrives.
DATA_ONLY_ERRORS = frozenset({int(ME.EXCEEDED_BANDWIDTH)})
ERRORS_KEPT = 256  # the last MUX errors kept for inspection; `error_count` counts them all


class LtkmGenerator:
    def __init__(self, client_id: int, channel_id: int = 1, stream_id: int = 1, data_id: int = 1, *,
                 timeout: float = 2.0, version: int = 3, ssl: SSLContext | None = None,
                 server_hostname: str | None = None) -> None:
        """ssl: mutual TLS on the MUX link, a Tessera option beyond TS 103 197 (which has
        no TLS); see docs/simulcrypt.md "Access control and TLS"."""
        if version == 1:
            # protocol_version 1 has no data_id, which BCAST needs to route LTKMs (14.1.1.3.4)
            raise ValueError("EMMG<->MUX protocol_version 1 is not supported (no data_id; BCAST 14.1.1.3.4 "
                             "routes LTKM streams by data_id): use 2 to 5")
        self.conn = EmmgConnection(client_id, channel_id, version)  # refuses non-DRM client_id
        self.stream_id, self.data_id = stream_id, data_id
        self.timeout = timeout
        self.ssl, self.server_hostname = ssl, server_hostname
        self.kbps: int | None = None
        self.errors: deque[PeerError] = deque(maxlen=ERRORS_KEPT)
        self.error_count = 0
        self.sent_bytes = 0
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None
        self._wait: asyncio.Future | None = None
        self._expect: tuple[type, ...] = ()
        self._udp: asyncio.DatagramTransport | None = None

    async def connect(self, host: str, port: int) -> None:
        reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=self.ssl,
                                    server_hostname=self.server_hostname if self.ssl else None), self.timeout)
        self._task = asyncio.create_task(self._reader(reader, self._writer))
        self.conn.setup()
        await self._request(ChannelOpen)
        self.conn.stream_setup(self.stream_id, self.data_id)
        await self._request(StreamOpen)

    async def _request(self, *expect: type) -> Event:
        """Sends what the engine queued and waits for the answer: an event of one of the
        `expect` types, or an error the MUX sends before it (TS 103 197 answers in order)."""
        assert self._writer is not None
        self._wait = asyncio.get_running_loop().create_future()
        self._expect = expect
        flush(self.conn, self._writer)
        try:
            return await asyncio.wait_for(self._wait, self.timeout)
        finally:
            self._expect = ()

    async def _reader(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def answer(result: Event | None = None, exc: Exception | None = None) -> None:
            if self._wait is None or self._wait.done():
                return
            if exc is not None:
                self._wait.set_exception(exc)
            else:
                self._wait.set_result(result)

        def on_events(events: list[Event]) -> None:
            for ev in events:
                if isinstance(ev, PeerError):
                    self.errors.append(ev)
                    self.error_count += 1
                    log.debug("MUX reports %s", ev.describe(Interface.EMMG))
                    # a late answer to an earlier data_provision is not the answer to the
                    # pending request; nor is anything while only a barrier is pending
                    if set(ev.statuses) <= DATA_ONLY_ERRORS or self._expect == (Alive,):
                        continue
                    answer(exc=EmmgError(ev.describe(Interface.EMMG)))
                elif isinstance(ev, ErrorSent):
                    answer(exc=EmmgError(f"bad answer from the MUX: {ev.detail}"))
                elif isinstance(ev, BandwidthAllocated):
                    self.kbps = ev.kbps
                    if BandwidthAllocated in self._expect:
                        answer(ev)
                elif isinstance(ev, self._expect or ()) and (not isinstance(ev, Alive) or ev.stream_id is None):
                    answer(ev)

        try:
            await read_loop(self.conn, reader, writer, on_events)
        except (ConnectionError, OSError) as exc:
            log.warning("MUX connection lost: %s", exc)
        finally:
            self.conn.state = State.CLOSED
            answer(exc=ConnectionError("MUX connection closed"))

    async def request_bandwidth(self, kbps: int | None) -> int:
        self.conn.bw_request(self.stream_id, kbps)
        await self._request(BandwidthAllocated)
        return self.kbps or 0

    async def test(self) -> bool:
        self.conn.test()
        try:
            await self._request(Alive)
            return True
        except (asyncio.TimeoutError, ConnectionError, EmmgError):
            return False

    async def sync(self) -> int:
        """Barrier: channel_test, then wait for its channel_status. The MUX answers in order,
        so every error about the data_provisions sent before over TCP has arrived by then.
        Returns the number of errors the MUX reported so far. (Errors about UDP
        data_provisions come on the TCP link whenever the MUX reads the datagram: a datagram
        still in flight may be reported after the barrier.)"""
        if not await self.test():
            raise EmmgError("no channel_status from the MUX")
        return self.error_count

    async def open_udp(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=(host, port))

    async def send(self, ltkms: list[bytes], *, via: str = "tcp", per_message: int = 1, pace: bool = True) -> None:
        """data_provision of the LTKMs, per_message datagrams per message. With pace, waits
        so the datagram bytes never exceed the allocated bandwidth (kbit/s x 125 bytes/s);
        with no bandwidth allocated (0 kbit/s, or a stream_BW_allocation without a
        bandwidth) nothing may be sent, and EmmgError says so before anything goes out."""
        if self._writer is None or self.conn.state is not State.OPEN:
            raise EmmgError("not connected")
        rate = (self.kbps or 0) * 125.0  # bytes per second
        if pace and rate <= 0:
            raise EmmgError(f"the MUX allocated no bandwidth ({self.kbps or 0} kbit/s): no LTKM sent")
        if via == "udp" and self._udp is None:
            raise EmmgError("UDP not opened")
        loop = asyncio.get_running_loop()
        t = loop.time()
        for i in range(0, len(ltkms), per_message):
            chunk = ltkms[i:i + per_message]
            size = sum(len(x) for x in chunk)
            if via == "udp":
                assert self._udp is not None
                self._udp.sendto(self.conn.data_provision_msg(self.stream_id, chunk).encode())
            else:
                self.conn.data_provision(self.stream_id, chunk)
                flush(self.conn, self._writer)
                await self._writer.drain()
            self.sent_bytes += size
            if pace:
                t += size / rate
                await asyncio.sleep(max(0.0, t - loop.time()))

    async def close(self) -> None:
        if self._writer and self.conn.state is State.OPEN:
            if self.stream_id in self.conn.streams:
                self.conn.stream_close(self.stream_id)
                try:
                    await self._request(StreamClosed)  # stream_close_response before channel_close
                except (asyncio.TimeoutError, ConnectionError, EmmgError) as exc:
                    log.warning("no stream_close_response from the MUX: %s", exc or type(exc).__name__)
            self.conn.close()
            await flush_and_drain(self.conn, self._writer)
        if self._udp:
            self._udp.close()
        if self._writer:
            await close_writer(self._writer)
        if self._task:
            await asyncio.gather(self._task, return_exceptions=True)


def make_ltkms(ks: KeyStore, client_id: int, data_id: int, group_id: int, key_owner: int, key_scope: int,
               count: int = 1) -> list[bytes]:
    """LTKMs that deliver the current service key of (key_owner, key_scope) to a group."""
    ltk = ks.current("LTK", client_id, group_id) or ks.add("LTK", client_id, group_id)
    sek = ks.current("SEK", key_owner, key_scope)
    if sek is None:
        raise EmmgError("no service key to deliver")
    rec = ltkm.Ltkm(client_id, data_id, group_id, ltk.key_id, KeyKind.SEK, key_owner, key_scope, sek.key_id, sek.material)
    return [ltkm.build(rec, ltk.material) for _ in range(count)]
