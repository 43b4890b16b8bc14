"""The DMA's upstream link to the SMA (docs/rmcp2-profile.md B.15 "Upstream link", B.16, B.17;
defined by this project), and the Ks-link pieces the SMA's side (smatree.py) shares.

The DMA dials the SMA's tree-control port. First message: PPROBREQ (NT DMA, MAID = the DMA)
under Ks with CONTENT_ADDR (the relay's content UDP and TCP ports). The SMA answers PPROBANS
RESULT ACCEPTED (+ STATUS) under Ks and binds the link to that DMA, then sends KEYDELIVER(Kc)
(current and next) and every later announce; the DMA feeds them to TreeCore.kc_from_sma (the
re-wrap under Kg for its members) and sends KCREQ (B.16) for the reasons TreeCore queued. HB
both ways under Ks every T_HB; nothing authentic for 3 T_HB = the other side is gone. A lost
link is dialled again after a jittered backoff doubling from `backoff[0]` to `backoff[1]`.

`UpstreamCore` is sans-IO (events in, bytes out); `UpstreamLink` the asyncio adapter.

**Seq under Ks across restarts** (B.7 windows, defined here): the receiver keeps its replay
window per (sender MAID, Ks generation) for the process's life, so a replayed PPROBREQ cannot
steal a DMA's binding on a fresh TCP link. A sender's first Seq under each Ks generation is
`seq_base(wall clock)` = 4 x the Unix seconds modulo 2^27, plus 1, so a restarted process starts
above what it sent before (it sends far fewer than 4 messages a second on this link) and the
count stays below 0x3FFFFFFF. Once every 2^27 s (4.25 years) the base wraps: a process started
just after that is refused until the next Ks generation (B.6 hash step, at most an hour).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2.codec import ErrorCode, Rmcp2Error

if TYPE_CHECKING:
    from tessera.rmcp2.dmatree import DmaTreeServer, TreeCore

log = logging.getLogger("tessera.rmcp2.upstream")
N, M = C.NodeType, C.MsgType

T_HB = 30.0  # B.10, as on the members' control links
HB_MISSED = 3
MAX_LINK_MESSAGE = 2048  # KEYDELIVER(Kc) under Ks is ~110 bytes; anything larger is not ours
BACKOFF = (0.5, 30.0)  # re-dial: from 0.5 s doubling to 30 s, each draw jittered to 50..100 %
T_CONNECT = 10.0


def seq_base(wall: float) -> int:
    """The first Seq under a Ks generation for a process started at `wall` (module docstring)."""
    return (int(wall) % (1 << 27)) * 4 + 1


class KsSeq:
    """One sender's Seq under Ks: counted per Ks generation from `base`."""

    def __init__(self, base: int = 1) -> None:
        if not 1 <= base <= P.SEQ_MAX // 2:
            raise ValueError("Seq base 1..0x1FFFFFFF")
        self.base, self.gen, self.seq = base, -1, 0

    def next(self, ks: P.ProtKey) -> int:
        if ks.gen != self.gen:
            self.gen, self.seq = ks.gen, self.base - 1
        self.seq += 1
        if self.seq > P.SEQ_MAX:
            raise Rmcp2Error(ErrorCode.REPLAY, "Seq under this Ks exhausted")
        return self.seq


class KsWindows:
    """Replay windows per (sender MAID, Ks generation), at most `limit` (the oldest goes); a
    window is created only for a message whose Tag verified (no state before authentication)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._w: dict[tuple[bytes, int], P.ReplayWindow] = {}

    def __len__(self) -> int:
        return len(self._w)

    def unseal(self, data: bytes, suite: P.Suite, ks: Callable[[int], P.ProtKey | None]) -> C.Message:
        fresh: dict[tuple[bytes, int], P.ReplayWindow] = {}

        def keys(maid: bytes, sec: P.SecHeader) -> P.ProtKey | None:
            return ks(sec.gen) if sec.ref == P.KeyRef.KS else None

        def windows(maid: bytes, key: P.ProtKey) -> P.ReplayWindow:
            k = (bytes(maid), key.gen)
            return self._w.get(k) or fresh.setdefault(k, P.ReplayWindow())

        msg = P.unseal_decode(data, suite, keys, windows)
        for k, w in fresh.items():
            while len(self._w) >= self.limit:
                self._w.pop(next(iter(self._w)))
            self._w[k] = w
        return msg


def seal_ks(msg: C.Message, ks: P.ProtKey, suite: P.Suite, seq: KsSeq, rand: Callable[[int], bytes]) -> bytes:
    return P.seal(msg.encode(), ks, suite, seq.next(ks), rand(P.IV_LEN))


@dataclass
class UpstreamCore:
    """The DMA's side of its link to the SMA, sans-IO. `connected(now)` gives the PPROBREQ;
    `receive(data, now)` returns (bytes for the SMA, outputs for the members' links);
    `tick(now)` returns bytes for the SMA, and sets `lost` when the SMA fell silent."""

    tree: TreeCore
    suite: P.Suite
    ks_current: Callable[[], P.ProtKey | None]
    ks_lookup: Callable[[int], P.ProtKey | None]
    ports: tuple[int, int]
    rand: Callable[[int], bytes]
    seq: KsSeq = field(default_factory=KsSeq)
    t_hb: float = T_HB
    state: str = "down"  # down, probing, bound, refused
    lost: bool = False
    last_rx: float = 0.0
    next_hb: float = 0.0
    sma_maid: bytes | None = None
    binds: int = 0
    kcreqs: int = 0
    errors: Counter = field(default_factory=Counter)
    windows: KsWindows = field(default_factory=lambda: KsWindows(16))

    def _seal(self, t: C.MsgType, *controls: C.Control) -> bytes | None:
        ks = self.ks_current()
        if ks is None:
            self.errors["no Ks"] += 1
            return None
        msg = C.Message(t, N.DMA, self.tree.sid, self.tree.maid, controls)
        return seal_ks(msg, ks, self.suite, self.seq, self.rand)

    def connected(self, now: float) -> list[bytes]:
        self.state, self.lost, self.last_rx, self.next_hb = "probing", False, now, now + self.t_hb
        probe = self._seal(M.PPROBREQ, C.ContentAddr(*self.ports))
        return [probe] if probe is not None else []

    def disconnected(self) -> None:
        if self.state != "refused":
            self.state = "down"

    def receive(self, data: bytes, now: float) -> tuple[list[bytes], list]:
        if self.state not in ("probing", "bound") or len(data) < C.HEADER_LEN:
            return [], []
        if data[1] == M.KEYDELIVER:  # Kc under Ks, for TreeCore's re-wrap (its own window per Ks gen)
            if self.state != "bound":
                self.errors["KEYDELIVER before PPROBANS"] += 1
                return [], []
            before = sum(self.tree.relay.errors.values())
            down = self.tree.kc_from_sma(data, now)
            if sum(self.tree.relay.errors.values()) == before:
                self.last_rx = now  # authentic (a new key or the same one again)
            return [], down
        try:
            msg = self.windows.unseal(data, self.suite, self.ks_lookup)
        except Rmcp2Error as e:
            self.errors[e.code.name] += 1
            return [], []
        if msg.nt != N.SMA or msg.session_id != self.tree.sid:
            self.errors["not from the SMA"] += 1
            return [], []
        if msg.type == M.PPROBANS and self.state == "probing" and msg.maid == self.tree.maid:
            res = msg.get(C.ResultCtl)
            if res is None or res.value != C.Result.ACCEPTED:
                self.state = "refused"
                log.warning("rmcp2 dma: the SMA refused the upstream link (%s)", res.value.name if res else "?")
                return [], []
            self.state, self.last_rx, self.binds = "bound", now, self.binds + 1
            log.info("rmcp2 dma: upstream link to the SMA bound")
            return self.tick(now), []
        if msg.type == M.HB and self.state == "bound":
            self.last_rx, self.sma_maid = now, msg.maid
            return [], []
        self.errors[f"{msg.type.name} on the upstream link"] += 1
        return [], []

    def tick(self, now: float) -> list[bytes]:
        if self.state not in ("probing", "bound"):
            return []
        if now - self.last_rx >= HB_MISSED * self.t_hb:
            self.lost = True
            log.info("rmcp2 dma: nothing authentic from the SMA for %d heartbeats", HB_MISSED)
            return []
        if self.state != "bound":
            return []
        out = []
        for why in dict.fromkeys(self.tree.take_kcreqs()):  # one per reason: the SMA coalesces anyway
            d = self._seal(M.KCREQ, C.ResultCtl(why))
            if d is not None:
                out.append(d)
                self.kcreqs += 1
        if now >= self.next_hb:
            self.next_hb = now + self.t_hb
            hb = self._seal(M.HB)
            if hb is not None:
                out.append(hb)
        return out


class UpstreamLink:
    """The asyncio side: dial, PPROBREQ, read, tick; re-dial with a bounded jittered backoff.
    Its core: `connected(now)`, `receive(data, now) -> (up, down)`, `tick(now)`, `disconnected()`,
    `state` (down, probing, bound, refused), `lost`, `t_hb` (chain.ParentLink reuses it)."""

    peer = "the SMA"

    def __init__(self, tree: TreeCore, server: DmaTreeServer, sma: tuple[str, int], suite: P.Suite,
                 ports: tuple[int, int], *, t_hb: float = T_HB, tick: float = 0.5,
                 backoff: tuple[float, float] = BACKOFF, rand: Callable[[int], bytes] | None = None,
                 wall: Callable[[], float] | None = None) -> None:
        import os
        import time

        if tree.ks_lookup is None or tree.ks_current is None:
            raise ValueError("the upstream link needs the DMA's Ks")
        self._setup(server, sma, tick, backoff, UpstreamCore(
            tree, suite, tree.ks_current, tree.ks_lookup, ports, rand or os.urandom,
            KsSeq(seq_base((wall or time.time)())), t_hb=t_hb))

    def _setup(self, server: DmaTreeServer, peer: tuple, tick: float, backoff: tuple[float, float], core) -> None:
        self.server, self.sma, self.tick_s, self.backoff, self.core = server, peer, tick, backoff, core
        self.dials = 0
        self._was_bound = False
        self._task: asyncio.Task | None = None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def state(self) -> str:
        return self.core.state

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._drop()

    def _drop(self) -> None:
        if self._writer is not None:
            self._writer.transport.abort()
            self._writer = None
        self.core.disconnected()

    async def _run(self) -> None:
        failures = 0
        while True:
            await self._session()
            failures = 0 if self._was_bound else failures + 1  # a bound link that dropped starts over
            lo, hi = self.backoff
            if self.core.state == "refused":  # the SMA said no (e.g. full): ask again, but rarely
                failures, self.core.state = 16, "down"
            delay = min(hi, lo * 2 ** min(failures, 16)) * (0.5 + random.random() / 2)
            log.info("rmcp2 dma: link to %s down; dialling %s:%d again in %.1f s", self.peer, *self.sma[:2], delay)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        from tessera.rmcp2.server import read_message

        loop = asyncio.get_running_loop()
        self._was_bound = False
        self.dials += 1
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*self.sma[:2]), T_CONNECT)
        except (OSError, asyncio.TimeoutError) as e:
            log.info("rmcp2 dma: cannot reach %s at %s:%d: %s", self.peer, *self.sma[:2], e)
            return
        self._writer = writer
        ticker = asyncio.create_task(self._ticks(writer))
        try:
            for d in self.core.connected(loop.time()):
                writer.write(d)
            while not self.core.lost:
                data = await read_message(reader, (HB_MISSED + 1) * self.core.t_hb, MAX_LINK_MESSAGE)
                if data is None:
                    break
                up, down = self.core.receive(data, loop.time())
                self._was_bound = self._was_bound or self.core.state == "bound"
                for d in up:
                    writer.write(d)
                if down:
                    self.server._send(down)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            self._drop()

    async def _ticks(self, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.tick_s)
            for d in self.core.tick(loop.time()):
                writer.write(d)
            if self.core.lost:
                writer.transport.abort()
                return
