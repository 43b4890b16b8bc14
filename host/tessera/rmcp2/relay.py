"""DMA content relay (docs/rmcp2-profile.md B.17, figure 104): content packets from the SMA,
over UDP (stream) and TCP (reliable delivery), relayed unchanged to the DMA's RMAs by
unicast (multicast-disabled groups).

The relay holds no key and decrypts nothing: it can check only what is in the clear (size,
Length, Ver/NT, type, session; `content.check_relayable`). The subscriber list is injected
(`set_subscribers`, fed by the join layer). Every queue is bounded per RMA: over UDP a full
socket buffer drops that RMA's datagram, over TCP a full queue closes that RMA's link (a
reliable object cannot skip a packet) until the next object begins; both are counted, and
the SMA and the other RMAs never wait for one slow RMA. The SMA's TCP link is read as fast
as the fastest RMA link drains (backpressure only when every link is behind).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass

from tessera.rmcp2.codec import Rmcp2Error
from tessera.rmcp2.content import MAX_PACKET, Kind, check_relayable, frame_length

log = logging.getLogger("tessera.rmcp2.relay")

T_IDLE = 60.0  # B.10: an upstream TCP link without a complete frame this long is closed
T_CONNECT = 10.0
UDP_BATCH = 64  # datagrams read per readiness event
READ_CHUNK = 1 << 16
WRITE_BATCH = 64  # frames joined into one write per RMA link


@dataclass(frozen=True)
class Subscriber:
    """One RMA of this DMA: its MAID and where it takes content (None: not over that)."""

    maid: bytes
    udp: tuple[str, int] | None = None
    tcp: tuple[str, int] | None = None


class _TcpLink:
    """The relay's TCP link to one RMA: a queue bounded in bytes and one writer task."""

    def __init__(self, relay: Relay, sub: Subscriber) -> None:
        self.relay, self.sub = relay, sub
        self.queue: deque[tuple[bytes, int]] = deque()  # (run of whole frames, how many)
        self.queued = 0  # bytes in the queue
        self.ready = asyncio.Event()
        self.closed = False
        self.task = asyncio.get_running_loop().create_task(self._run())

    def offer(self, block: bytes, frames: int) -> None:
        if self.closed:
            return
        if self.queued + len(block) > self.relay.queue_bytes:
            self.relay.count("tcp_slow_closed", self.sub)
            self.close()
            return
        self.queue.append((block, frames))
        self.queued += len(block)
        self.ready.set()

    def close(self) -> None:
        self.closed = True
        self.queue.clear()
        self.queued = 0
        self.task.cancel()

    async def _run(self) -> None:
        assert self.sub.tcp is not None
        writer = None
        try:
            _r, writer = await asyncio.wait_for(asyncio.open_connection(*self.sub.tcp), T_CONNECT)
            sock = writer.get_extra_info("socket")
            if sock is not None and self.relay.link_sndbuf:  # bound the kernel's share per RMA too
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.relay.link_sndbuf)
            q = self.queue
            while True:
                if not q:
                    self.ready.clear()
                    await self.ready.wait()
                    continue
                batch = [q.popleft() for _ in range(min(len(q), WRITE_BATCH))]
                data = batch[0][0] if len(batch) == 1 else b"".join(b for b, _n in batch)
                self.queued -= len(data)
                if self.queued < self.relay.queue_bytes // 2:
                    self.relay.room.set()
                writer.write(data)
                await writer.drain()
                self.relay.stats["tcp_relayed"] += sum(n for _b, n in batch)
        except asyncio.CancelledError:
            pass
        except (OSError, asyncio.TimeoutError) as e:
            self.relay.count("tcp_link_failed", self.sub, e)
        finally:
            self.closed = True
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 1.0)


def _udp_socket(host: str, port: int, rcvbuf: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((host, port))
    return s


class Relay:
    """One DMA's content relay for one session. `start()` binds the upstream UDP and TCP
    ports (0 = a free port) and one downstream UDP socket; `close()` stops everything."""

    def __init__(self, session_id: bytes, *, queue_bytes: int = 1 << 20,
                 max_upstream: int = 4, upstream_hosts: Iterable[str] | None = None,
                 link_sndbuf: int = 64 * 1024, idle: float = T_IDLE,
                 multicast: tuple[str, int] | None = None, multicast_if: str | None = None,
                 multicast_ttl: int = 1, multicast_on: bool = True) -> None:
        if len(session_id) != 8:
            raise ValueError("session id is 8 bytes")
        self.session_id = session_id
        self.queue_bytes = queue_bytes
        self.max_upstream = max_upstream
        self.link_sndbuf = link_sndbuf
        self.idle = idle
        # multicast-enabled MM group (B.17): each stream packet is sent once to the group
        # address on the interface towards the RMAs, in addition to any unicast subscribers
        self.multicast, self.multicast_if, self.multicast_ttl = multicast, multicast_if, multicast_ttl
        self._mcast: socket.socket | None = None
        # only the HMA of the area sends to the group (B.18): hma.HmaService switches this
        self.multicast_on = multicast_on
        # a source address proves nothing (the RMAs' MAC check does); this only sheds load
        self.upstream_hosts = set(upstream_hosts) if upstream_hosts is not None else None
        self.stats: Counter[str] = Counter()
        self.per_rma: Counter[tuple[str, bytes]] = Counter()
        self._subs: dict[bytes, Subscriber] = {}
        self._links: dict[bytes, _TcpLink] = {}
        self._up_udp: socket.socket | None = None
        self._down_udp: socket.socket | None = None
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task] = set()
        self.room = asyncio.Event()  # set by a link writer whose queue fell below half
        self.udp_port = self.tcp_port = 0

    # -- subscribers (the join layer's view of this DMA's MM group) --
    def set_subscribers(self, subs: Iterable[Subscriber]) -> None:
        new = {s.maid: s for s in subs}
        for maid, link in list(self._links.items()):
            if maid not in new or new[maid].tcp != link.sub.tcp:
                link.close()
                del self._links[maid]
        self._subs = new

    @property
    def subscribers(self) -> list[Subscriber]:
        return list(self._subs.values())

    def count(self, what: str, sub: Subscriber | None = None, detail: object = "") -> None:
        self.stats[what] += 1
        if sub is not None:
            self.per_rma[(what, sub.maid)] += 1
        n = self.stats[what]
        if n in (1, 10, 100, 1000) or n % 10000 == 0:  # rate-limited, as B.13
            log.warning("relay: %s (%d so far)%s%s", what, n, f" RMA {sub.maid.hex()}" if sub else "",
                        f": {detail}" if detail else "")

    # -- lifecycle --
    async def start(self, host: str = "127.0.0.1", udp_port: int = 0, tcp_port: int = 0) -> None:
        # plain non-blocking sockets: a readiness event drains up to UDP_BATCH datagrams (an
        # asyncio datagram transport reads one per loop turn), and a send the kernel cannot
        # take at once is dropped and counted instead of being buffered
        self._up_udp = _udp_socket(host, udp_port, 1 << 20)
        self._down_udp = _udp_socket(host, 0, 1 << 16)
        if self.multicast is not None:
            m = self._mcast = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            m.setblocking(False)
            m.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, self.multicast_ttl)
            if self.multicast_if:
                m.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(self.multicast_if))
                m.bind((self.multicast_if, 0))
        asyncio.get_running_loop().add_reader(self._up_udp.fileno(), self._drain_udp)
        self._server = await asyncio.start_server(self._upstream_tcp, host, tcp_port)
        self.udp_port = self._up_udp.getsockname()[1]
        self.tcp_port = self._server.sockets[0].getsockname()[1]
        log.info("relay listening: content UDP %d, TCP %d", self.udp_port, self.tcp_port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        for link in self._links.values():
            link.close()
        tasks = [link.task for link in self._links.values()] + list(self._conns)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._links.clear()
        if self._up_udp is not None:
            asyncio.get_running_loop().remove_reader(self._up_udp.fileno())
        for sk in (self._up_udp, self._down_udp, self._mcast):
            if sk is not None:
                sk.close()
        if self._server is not None:
            await self._server.wait_closed()

    # -- stream: UDP in, UDP out --
    def _drain_udp(self) -> None:
        sk = self._up_udp
        assert sk is not None
        for _ in range(UDP_BATCH):
            try:
                data, addr = sk.recvfrom(MAX_PACKET + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. ICMP errors surfacing on the socket
                self.count("udp_recv_error", None, e.errno)
                return
            self.from_udp(data, addr)

    def from_udp(self, data: bytes, addr) -> None:
        if self.upstream_hosts is not None and addr[0] not in self.upstream_hosts:
            self.count("udp_foreign_source")
            return
        try:
            check_relayable(data, self.session_id)
        except Rmcp2Error as e:
            self.count(f"rejected_{e.code.name}")
            return
        self.stats["udp_in"] += 1
        if self._mcast is not None and self.multicast_on:
            try:
                self._mcast.sendto(data, self.multicast)  # unchanged, once for the whole group
                self.stats["mcast_relayed"] += 1
            except (BlockingIOError, InterruptedError):
                self.count("mcast_dropped")
            except OSError as e:
                self.count("mcast_send_error", None, e.errno)
        down = self._down_udp
        assert down is not None
        for sub in self._subs.values():
            if sub.udp is None:
                continue
            try:
                down.sendto(data, sub.udp)  # the bytes as received: never re-encoded
            except (BlockingIOError, InterruptedError):
                self.count("udp_dropped", sub)  # the kernel's send buffer is full: drop, never queue
                continue
            except OSError as e:
                self.count("udp_send_error", sub, e.errno)
                continue
            self.stats["udp_relayed"] += 1

    # -- reliable: TCP in, TCP out --
    async def _upstream_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._conns) >= self.max_upstream:
            self.count("tcp_upstream_refused")
            writer.close()
            return
        assert task is not None
        self._conns.add(task)
        loop = asyncio.get_running_loop()
        buf = bytearray()
        try:
            deadline = loop.time() + self.idle
            while True:
                # T_IDLE (B.10) bounds the time to each complete frame, so neither a silent
                # peer nor one trickling bytes holds a slot
                left = deadline - loop.time()
                if left <= 0:
                    raise asyncio.TimeoutError
                chunk = await asyncio.wait_for(reader.read(READ_CHUNK), left)
                if not chunk:
                    if buf:
                        raise asyncio.IncompleteReadError(bytes(buf), None)
                    break
                buf += chunk
                frames, used, begins, bad = 0, 0, False, None
                view = memoryview(buf)
                try:
                    while len(buf) - used >= 4:
                        n = frame_length(view[used:used + 4])  # checked before the body is awaited
                        if len(buf) - used < n:
                            break
                        check_relayable(view[used:used + n], self.session_id)
                        begins = begins or buf[used + 20] == Kind.OBJ_BEGIN  # Kind is in the clear
                        frames += 1
                        used += n
                except Rmcp2Error as e:
                    bad = e  # the good frames before it still go out; then the link closes
                view.release()
                if frames:
                    self.stats["tcp_in"] += frames
                    self._fan_out(bytes(buf[:used]), frames, begins)  # one copy, shared by every link
                if bad is not None:
                    raise bad
                if used:
                    del buf[:used]
                    deadline = loop.time() + self.idle
                    await self._backpressure()
        except Rmcp2Error as e:
            self.count(f"rejected_{e.code.name}")
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, OSError) as e:
            self.count("tcp_upstream_broken", None, type(e).__name__)
        except asyncio.CancelledError:
            pass
        finally:
            self._conns.discard(task)
            writer.close()

    async def _backpressure(self) -> None:
        """Read the SMA only as fast as the fastest RMA takes it: when every open link is at
        least half full the relay itself (or the network) is the bottleneck, and waiting is
        right; a link full while another has room is a slow RMA, closed in offer()."""
        half = self.queue_bytes // 2
        while True:
            open_ = [link for link in self._links.values() if not link.closed]
            if not open_ or min(link.queued for link in open_) < half:
                return
            self.room.clear()
            try:
                await asyncio.wait_for(self.room.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    def _fan_out(self, block: bytes, frames: int, begins: bool) -> None:
        for maid, sub in self._subs.items():
            if sub.tcp is None:
                continue
            link = self._links.get(maid)
            if link is None or (link.closed and begins):
                if link is not None:
                    self.count("tcp_reopened", sub)
                link = self._links[maid] = _TcpLink(self, sub)
            link.offer(block, frames)


class SmaSender:
    """The SMA's side of the content transport (B.17): stream packets by UDP to each DMA's
    content port, objects over one TCP link per DMA, the bytes from a content.Encoder.
    Stream sends never wait (a datagram the kernel refuses is counted as dropped); an
    object waits for every DMA link to take it (TCP backpressure from the relays)."""

    def __init__(self, dmas: Iterable[tuple[str, int, int]]) -> None:
        self.dmas = [(h, u, t) for h, u, t in dmas]  # (host, content UDP port, content TCP port)
        self.stats: Counter[str] = Counter()
        self._udp: socket.socket | None = None
        self._links: dict[tuple[str, int], asyncio.StreamWriter] = {}

    def stream(self, packet: bytes) -> None:
        if self._udp is None:
            self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # IPv4 MAs only (B.1)
            self._udp.setblocking(False)
        for host, port, _t in self.dmas:
            if not port:  # CONTENT_ADDR UDP 0: not over UDP (B.4)
                continue
            try:
                self._udp.sendto(packet, (host, port))
                self.stats["udp_sent"] += 1
            except (BlockingIOError, InterruptedError):
                self.stats["udp_dropped"] += 1
            except OSError:
                self.stats["udp_send_error"] += 1

    async def object(self, packets: Iterable[bytes]) -> None:
        """Send one object's packets (content.Encoder.object) to every DMA. A DMA whose link
        fails is counted and skipped for the rest of this object; the link is reopened for
        the next one."""
        writers = []
        for host, _u, port in self.dmas:
            if not port:  # CONTENT_ADDR TCP 0: not over TCP (B.4)
                continue
            w = self._links.get((host, port))
            if w is None or w.is_closing():
                try:
                    _r, w = await asyncio.wait_for(asyncio.open_connection(host, port), T_CONNECT)
                except (OSError, asyncio.TimeoutError):
                    self.stats["tcp_connect_failed"] += 1
                    continue
                self._links[(host, port)] = w
            writers.append(w)
        batch: list[bytes] = []
        for p in packets:
            batch.append(p)
            if len(batch) == WRITE_BATCH:
                writers = await self._write(writers, b"".join(batch))
                batch = []
        if batch:
            await self._write(writers, b"".join(batch))

    async def _write(self, writers: list[asyncio.StreamWriter], data: bytes) -> list[asyncio.StreamWriter]:
        alive = []
        for w in writers:
            try:
                w.write(data)
                # a DMA that stops reading is dropped for the rest of this object, never waited
                # for without end (T_IDLE, as the relay's own upstream bound)
                await asyncio.wait_for(w.drain(), T_IDLE)
                alive.append(w)
            except (OSError, asyncio.TimeoutError):
                self.stats["tcp_link_failed"] += 1
                w.close()
        self.stats["tcp_bytes"] += len(data) * len(alive)
        return alive

    async def close(self) -> None:
        for w in self._links.values():
            w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.wait_closed(), 1.0)
        self._links.clear()
        if self._udp is not None:
            self._udp.close()
            self._udp = None
