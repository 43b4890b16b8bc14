"""asyncio adapters: the session manager over mutual TLS and plain TCP, and the agents'
control planes (docs/rmcp2.md). Thin: framing, deadlines, bounds and the clock live here,
every protocol decision in sm.py / agent.py.

Framing: RMCP-2 messages carry their total length in the header (A.4), so a stream is read
as header (4 bytes) + the rest; a Length below 20 or above `max_message` closes the link.

Bounds (hostile-input rules): at most `max_conns` connections on both listeners together
(one more is closed before its TLS handshake starts); T_TLS for the handshake (asyncio's
ssl_handshake_timeout); T_IDLE for a complete message; T_ADMIT (the engine) up to SUBSANS.
No engine state exists for a connection before its TLS handshake verified a client
certificate, and the engine itself keeps no member state before an authenticated SUBSREQ.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import socket
import ssl
import time
from dataclasses import dataclass

from tessera.rmcp2 import opreq
from tessera.rmcp2 import sm as S
from tessera.rmcp2.agent import Agent
from tessera.rmcp2.store import SmStore

log = logging.getLogger("tessera.rmcp2.server")
HEADER = 4
MIN_MESSAGE = 20


@dataclass
class Limits:
    max_conns: int = 1024
    tls_timeout: float = 15.0  # T_TLS (B.10: a board-speed Pico W handshake measured 3.2 s)
    idle_timeout: float = 60.0  # T_IDLE (B.10)
    max_message: int = 0xFFFF
    tick: float = 0.5


async def _read_frame(reader: asyncio.StreamReader, max_message: int) -> bytes | None:
    head = await reader.readexactly(HEADER)
    n = int.from_bytes(head[2:4], "big")
    if not MIN_MESSAGE <= n <= max_message:
        log.info("rmcp2: frame length %d refused", n)
        return None
    return head + await reader.readexactly(n - HEADER)


async def read_message(reader: asyncio.StreamReader, idle: float, max_message: int) -> bytes | None:
    """One whole RMCP-2 message within `idle` seconds (T_IDLE), or None on EOF / timeout /
    bad length. One wait_for for the whole message: each wait_for costs a task."""
    try:
        return await asyncio.wait_for(_read_frame(reader, max_message), idle)
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, ssl.SSLError, OSError):
        return None


class SmServer:
    """The SM service: TLS admission listener and plain Ks-phase listener on one engine."""

    def __init__(self, engine: S.SessionManager, store: SmStore | None, ctx: ssl.SSLContext, host: str = "127.0.0.1",
                 tls_port: int = 26030, plain_port: int = 26031, limits: Limits | None = None,
                 auto_open: bool = True) -> None:
        self.sm, self.store, self.ctx = engine, store, ctx
        self.host, self.tls_port, self.plain_port = host, tls_port, plain_port
        self.limits = limits or Limits()
        self.auto_open = auto_open
        self.writers: dict[int, asyncio.StreamWriter] = {}
        self.conns = 0
        self.refused = 0
        self._ids = itertools.count(1)
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task] = set()
        self._stop = asyncio.Event()
        self._queue: list = []  # actions waiting for the next group commit (_flush)
        self._flush_due = False

    async def start(self) -> None:
        # TLS: our own accept loop, so the connection bound applies before any handshake work
        self._lsock = socket.create_server((self.host, self.tls_port), backlog=128)
        self._lsock.setblocking(False)
        plain = await asyncio.start_server(self._on_plain, self.host, self.plain_port, limit=self.limits.max_message)
        self._servers = [plain]
        self.tls_port = self._lsock.getsockname()[1]
        self.plain_port = plain.sockets[0].getsockname()[1]
        self._tasks.add(asyncio.create_task(self._ticker()))
        self._tasks.add(asyncio.create_task(self._accept_tls()))
        log.info("rmcp2 sm: session %#018x, TLS admission on %s:%d, Ks control on %s:%d",
                 self.sm.cfg.session_id, self.host, self.tls_port, self.host, self.plain_port)

    def stop(self) -> None:
        self._stop.set()

    async def serve_until_stopped(self) -> None:
        await self._stop.wait()
        await self.close()

    async def close(self) -> None:
        for s in self._servers:
            s.close()
        self._lsock.close()
        for w in list(self.writers.values()):
            w.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for s in self._servers:
            await s.wait_closed()
        commits = 0
        if self.store is not None:
            self.store.close()  # commits what a last turn left pending
            commits = self.store.commits
        log.info("rmcp2 sm: stopped (%d members kept in the store, %d commits)", len(self.sm.members), commits)

    def _now(self) -> float:
        return time.time()  # wall clock: stored deadlines keep their meaning across restarts

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.limits.tick)
            if self.store is not None:  # the CP's CLI adds/removes identifiers in the store
                self.sm.service_user_ids = self.store.service_user_ids()
                self._act(opreq.handle(self.sm, self.store, self._now()))  # rekey/truncate requests
            self._act(self.sm.tick(self._now()))

    def _act(self, actions: list) -> None:
        if self.auto_open and self.sm.policy is not None and not self.sm.open_to_rmas:
            self.sm.open_session()  # as soon as the policy is set (10.1.4.2 follows 10.1.4.1)
            log.info("rmcp2 sm: policy set, the session is open to RMAs")
        self._queue += actions
        if not self._flush_due and (self._queue or (self.store is not None and self.store.pending)):
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Group commit, then the answers: the engine's journal writes for every message of
        the last loop turn are committed (fsync) in one transaction before any message that
        acknowledges them is written to a socket, in the order the engine produced them."""
        self._flush_due = False
        if self.store is not None:
            self.store.commit()
        actions, self._queue = self._queue, []
        for a in actions:
            w = self.writers.get(a.conn)
            if w is None:
                continue
            if isinstance(a, S.Send):
                if w.is_closing():  # the peer went away in this loop turn: nothing to answer
                    continue
                try:
                    w.write(a.data)
                except (AttributeError, OSError, RuntimeError) as e:  # a TLS transport torn down under us
                    log.debug("rmcp2 sm: link %s gone while answering: %s", a.conn, e)
            else:
                log.debug("rmcp2 sm: closing link %s: %s", a.conn, a.reason)
                self.writers.pop(a.conn, None)
                t = asyncio.ensure_future(self._close_after_drain(w))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)

    async def _close_after_drain(self, w: asyncio.StreamWriter) -> None:
        """Close once what was written (SUBSANS, KEYDELIVER) has left, bounded by T_IDLE."""
        try:
            await asyncio.wait_for(w.drain(), self.limits.idle_timeout)
        except (ConnectionError, OSError, asyncio.TimeoutError):
            pass
        w.close()

    async def _accept_tls(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self._lsock)
            if self.conns >= self.limits.max_conns:  # refused before any TLS work is spent on it
                self.refused += 1
                sock.close()
                continue
            self.conns += 1
            t = asyncio.create_task(self._handshake(sock))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _handshake(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=self.limits.max_message)
        proto = asyncio.StreamReaderProtocol(reader)
        try:  # mutual TLS; a peer without a certificate from the CA fails here (T_TLS bounds it)
            transport, _ = await loop.connect_accepted_socket(lambda: proto, sock, ssl=self.ctx,
                                                              ssl_handshake_timeout=self.limits.tls_timeout)
        except (ssl.SSLError, asyncio.TimeoutError, ConnectionError, OSError) as e:
            self.conns -= 1
            self.sm._count(f"TLS handshake failed: {type(e).__name__}")
            sock.close()
            return
        writer = asyncio.StreamWriter(transport, proto, reader, loop)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        await self._serve(reader, writer, der, counted=True)

    async def _on_plain(self, reader, writer) -> None:
        try:
            await self._serve(reader, writer, None)
        except asyncio.CancelledError:
            pass  # close(): Python 3.11's start_server logs a handler task that ends cancelled as an error

    async def _serve(self, reader, writer, der: bytes | None, counted: bool = False) -> None:
        tls = der is not None
        if not counted:
            if self.conns >= self.limits.max_conns:
                self.refused += 1
                writer.close()
                return
            self.conns += 1
        conn = next(self._ids)
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            self.writers[conn] = writer
            self._act(self.sm.connect(conn, self._now(), cert_der=der, tls=tls))
            while conn in self.writers:
                data = await read_message(reader, self.limits.idle_timeout, self.limits.max_message)
                if data is None or conn not in self.writers:
                    break
                with self.store.deferred() if self.store is not None else contextlib.nullcontext():
                    actions = self.sm.receive(conn, data, self._now())
                self._act(actions)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._tasks.discard(task)
            self.conns -= 1
            self.sm.disconnect(conn)
            self.writers.pop(conn, None)
            writer.close()


async def serve(server: SmServer) -> None:
    """Run until SIGTERM/SIGINT; then close listeners and links and the store."""
    loop = asyncio.get_running_loop()
    await server.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    await server.serve_until_stopped()


# ---------------------------------------------------------------------------- agents
class AgentRunner:
    """Runs one agent against the SM: TLS admission, then (SMA/DMA) the plain Ks link, kept
    up with reconnection; an RMA keeps its TLS link (10.1.1.1)."""

    def __init__(self, agent: Agent, ctx: ssl.SSLContext, host: str, tls_port: int, plain_port: int,
                 tick: float = 0.5, idle: float = 120.0, retry: float = 1.0) -> None:
        self.agent, self.ctx = agent, ctx
        self.host, self.tls_port, self.plain_port = host, tls_port, plain_port
        self.tick, self.idle, self.retry = tick, idle, retry
        self._stop = asyncio.Event()
        self.links = 0

    def stop(self) -> None:
        self._stop.set()

    async def _pump(self, reader, writer, first: list[bytes]) -> None:
        """Send `first`, then feed messages to the agent and tick it until EOF or stop."""
        a = self.agent
        pending = asyncio.ensure_future(read_message(reader, self.idle, 0xFFFF))
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            for d in first:
                writer.write(d)
            await writer.drain()
            while not self._stop.is_set():
                done, _ = await asyncio.wait({pending, stop}, timeout=self.tick, return_when=asyncio.FIRST_COMPLETED)
                out = a.tick(time.time())
                if pending in done:
                    data = pending.result()
                    if data is None:
                        break
                    out += a.receive(data, time.time())
                    pending = asyncio.ensure_future(read_message(reader, self.idle, 0xFFFF))
                for d in out:
                    writer.write(d)
                await writer.drain()
                if a.state in ("refused", "failed", "expelled"):
                    break
        except (ConnectionError, OSError):
            pass  # the SM closed the link (after Ks delivery: 10.1.1.1) or went away
        finally:
            pending.cancel()
            stop.cancel()
            writer.close()

    async def admit(self) -> None:
        """TLS up to SUBSANS (and for an SMA/DMA the Ks delivery, after which the SM closes)."""
        reader, writer = await asyncio.open_connection(self.host, self.tls_port, ssl=self.ctx)
        self.links += 1
        await self._pump(reader, writer, self.agent.start(time.time()))

    async def run(self, attempts: int = 3) -> None:
        a = self.agent
        for _ in range(attempts):
            await self.admit()
            # an SMA/DMA whose TLS link ended before KEYDELIVER arrived subscribes again (B.13)
            if a.cfg.nt == S.N.RMA or a.ks is not None or a.state not in ("subscribed", "policy"):
                break
            log.info("rmcp2 %s: TLS link closed before Ks arrived; subscribing again", a.cfg.nt.name)
        await self.run_plain()

    async def run_plain(self) -> None:
        """The SMA/DMA's plain Ks link, reconnected after `retry` whenever it drops."""
        a = self.agent
        while (not self._stop.is_set() and a.cfg.nt != S.N.RMA and a.ks is not None
               and a.state in ("subscribed", "policy", "ready")):
            try:
                reader, writer = await asyncio.open_connection(self.host, self.plain_port)
                self.links += 1
                await self._pump(reader, writer, a.plain_up(time.time()))
            except OSError as e:
                log.info("rmcp2 %s: SM unreachable (%s); retrying", a.cfg.nt.name, e)
            if not self._stop.is_set():
                try:
                    await asyncio.wait_for(self._stop.wait(), self.retry)
                except asyncio.TimeoutError:
                    pass
