"""Multiplexer side of EMMG<->MUX (TS 103 197 clause 6, BCAST SP-4 14.1.1.3.4): a TCP
server for LTKM generator channels and streams, bandwidth allocation out of a fixed pool
with "exceeded bandwidth" enforced per stream, and a UDP port for data_provision.
data_id maps a stream to an output IP address and port (routes); received LTKMs are
forwarded there as UDP datagrams when a route is configured."""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from ssl import SSLContext

from tessera.simulcrypt.aio import (
    Admission, Deadline, Limits, Summary, close_writer, flush, normalise, read_loop, serve_admitted,
)
from tessera.simulcrypt.engine import CloseConnection, DataReceived, ErrorSent, Event, MuxConnection, MuxCore
from tessera.simulcrypt.tables import ErrorInfo, Interface, error_name

log = logging.getLogger("tessera.simulcrypt.mux")

RECEIVED_KEPT = 1024  # LTKMs kept in Multiplexer.received for inspection; received_count counts all


@dataclass
class Received:
    t: float
    client_id: int
    data_id: int
    datagram: bytes = field(repr=False)
    via: str


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, mux: Multiplexer) -> None:
        self.mux = mux

    def datagram_received(self, data: bytes, addr) -> None:
        conn, events = self.mux.core.receive_udp(data, normalise(addr[0]))
        if conn is None:  # counted in core.udp_dropped by reason; summarised, never a line each
            self.mux.dropped.count("UDP datagram reached no channel")
            return
        self.mux._record(conn, events)
        w = self.mux._writers.get(conn)
        if w is None:
            return
        # errors for UDP data go back on the channel's TCP connection, but never pile up in
        # front of a peer that does not read them: past the write limit they are dropped
        if w.transport.get_write_buffer_size() >= self.mux.limits.write_buffer:
            conn.data_to_send()
            self.mux.dropped.count("answer to UDP data not sent (TCP peer does not read)")
            return
        flush(conn, w)


class Multiplexer:
    def __init__(self, total_kbps: int = 2000, *, clients: set[int] | None = None, host: str = "127.0.0.1",
                 port: int = 0, udp: bool = True, routes: dict[int, tuple[str, int]] | None = None,
                 max_streams_per_channel: int = 16, channels_per_client: int | None = None,
                 limits: Limits | None = None, allow: dict[str, set[int] | None] | None = None,
                 udp_sources: dict[int, set[str]] | None = None, ssl: SSLContext | None = None,
                 error_info: ErrorInfo = ErrorInfo.PARAM) -> None:
        """limits: per-connection deadlines and caps (aio.Limits); allow: peer IP address ->
        the client_ids it may use (None: any), None: any address (default host: loopback);
        udp_sources: client_id -> the IP addresses its UDP data_provision may come from
        (default: the address of the TCP connection that set up the channel); ssl: mutual
        TLS on the TCP side, a Tessera option beyond TS 103 197 (which has no TLS; UDP data
        stays plain, bound to its source address)."""
        self.core = MuxCore(total_kbps, clients, max_streams_per_channel=max_streams_per_channel,
                            channels_per_client=channels_per_client, error_info=error_info)
        self.host, self.port = host, port
        self.udp_enabled = udp
        self.udp_port: int | None = None
        self.routes = routes or {}
        self.received: deque[Received] = deque(maxlen=RECEIVED_KEPT)
        self.received_count = 0
        self.limits = limits or Limits()
        self.admission = Admission(self.limits, allow)
        self.udp_sources = {c: frozenset(normalise(h) for h in hs) for c, hs in (udp_sources or {}).items()}
        self.ssl = ssl
        self.dropped = Summary(log, "MUX: connections or data refused")
        self.answered = Summary(log, "MUX: errors answered")
        self._writers: dict[MuxConnection, asyncio.StreamWriter] = {}
        self._server: asyncio.AbstractServer | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, ssl=self.ssl,
                                                  ssl_handshake_timeout=self.limits.setup_timeout if self.ssl else None)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.udp_enabled:
            loop = asyncio.get_running_loop()
            self._udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=(self.host, 0))
            self.udp_port = self._udp.get_extra_info("sockname")[1]
        log.info("MUX listening on %s:%d (UDP %s), %d kbit/s for LTKM streams", self.host, self.port,
                 self.udp_port, self.core.total_kbps)
        return self.port

    async def close(self) -> None:
        if self._server:
            self._server.close()
        if self._udp:
            self._udp.close()
        for w in list(self._writers.values()):
            await close_writer(w)
        if self._server:
            await self._server.wait_closed()
        self._out.close()
        self.dropped.flush()
        self.answered.flush()

    def _record(self, conn: MuxConnection, events: list[Event]) -> None:
        now = time.monotonic()
        for ev in events:
            if isinstance(ev, DataReceived):
                for d in ev.datagrams:
                    self.received.append(Received(now, conn.client_id or 0, ev.data_id, d, ev.via))
                    self.received_count += 1
                    route = self.routes.get(ev.data_id)
                    if route:
                        self._out.sendto(d, route)
            elif isinstance(ev, ErrorSent):
                self.answered.count(error_name(Interface.EMMG, ev.status))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_admitted(self.admission, self.dropped, self._session, reader, writer)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str,
                       ids: frozenset[int] | None) -> None:
        conn = MuxConnection(self.core, frozenset({host}), allowed_ids=ids)
        self._writers[conn] = writer

        def on_events(events: list[Event]) -> bool:
            if conn.client_id in self.udp_sources:  # a configured UDP source replaces the TCP peer's
                conn.udp_sources = self.udp_sources[conn.client_id]
            self._record(conn, events)
            return any(isinstance(e, CloseConnection) for e in events)

        abort = False
        try:
            await read_loop(conn, reader, writer, on_events, self.limits)
        except Deadline as exc:
            self.dropped.count(str(exc))
            abort = True
        except (ConnectionError, OSError) as exc:
            self.dropped.count(f"lost ({type(exc).__name__})")
            log.debug("LTKM generator %s lost: %s", host, exc)
        finally:
            conn.close("transport closed")  # frees ids and bandwidth; other channels go on
            self._writers.pop(conn, None)
            await close_writer(writer, abort=abort)

    def stream_stats(self) -> list[dict]:
        out = []
        for conn in list(self._writers):
            for s in conn.streams.values():
                out.append({"client_id": conn.client_id, "channel": conn.channel_id, "stream": s.stream_id,
                            "data_id": s.data_id, "kbps": s.kbps, "bytes": s.bytes_in, "dropped": s.dropped})
        return out
