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
from dataclasses import dataclass, field

from tessera.simulcrypt.aio import close_writer, flush, read_loop
from tessera.simulcrypt.engine import CloseConnection, DataReceived, Event, MuxConnection, MuxCore

log = logging.getLogger("tessera.simulcrypt.mux")


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
        conn, events = self.mux.core.receive_udp(data)
        if conn is not None:
            self.mux._record(conn, events)
            w = self.mux._writers.get(conn)
            if w is not None:
                flush(conn, w)  # errors for UDP data go back on the channel's TCP connection


class Multiplexer:
    def __init__(self, total_kbps: int = 2000, *, clients: set[int] | None = None, host: str = "127.0.0.1",
                 port: int = 0, udp: bool = True, routes: dict[int, tuple[str, int]] | None = None,
                 max_streams_per_channel: int = 16, channels_per_client: int | None = None) -> None:
        self.core = MuxCore(total_kbps, clients, max_streams_per_channel=max_streams_per_channel,
                            channels_per_client=channels_per_client)
        self.host, self.port = host, port
        self.udp_enabled = udp
        self.udp_port: int | None = None
        self.routes = routes or {}
        self.received: list[Received] = []
        self._writers: dict[MuxConnection, asyncio.StreamWriter] = {}
        self._server: asyncio.AbstractServer | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
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

    def _record(self, conn: MuxConnection, events: list[Event]) -> None:
        now = time.monotonic()
        for ev in events:
            if isinstance(ev, DataReceived):
                for d in ev.datagrams:
                    self.received.append(Received(now, conn.client_id or 0, ev.data_id, d, ev.via))
                    route = self.routes.get(ev.data_id)
                    if route:
                        self._out.sendto(d, route)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = MuxConnection(self.core)
        self._writers[conn] = writer

        def on_events(events: list[Event]) -> bool:
            self._record(conn, events)
            return any(isinstance(e, CloseConnection) for e in events)

        try:
            await read_loop(conn, reader, writer, on_events)
        except (ConnectionError, OSError) as exc:
            log.warning("LTKM generator lost: %s", exc)
        finally:
            conn.close("transport closed")  # frees ids and bandwidth; other channels go on
            self._writers.pop(conn, None)
            await close_writer(writer)

    def stream_stats(self) -> list[dict]:
        out = []
        for conn in list(self._writers):
            for s in conn.streams.values():
                out.append({"client_id": conn.client_id, "channel": conn.channel_id, "stream": s.stream_id,
                            "data_id": s.data_id, "kbps": s.kbps, "bytes": s.bytes_in, "dropped": s.dropped})
        return out
