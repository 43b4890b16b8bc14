"""The SMA's tree service: the DMAs' upstream links, the content key schedule and the content
source (docs/rmcp2-profile.md B.15 "Upstream link", B.16, B.17; defined by this project).

`SmaCore` is sans-IO. It binds a DMA's link when its first message, PPROBREQ (NT DMA) under
Ks with CONTENT_ADDR, verifies: PPROBANS RESULT ACCEPTED + STATUS under Ks, then KEYDELIVER(Kc)
for that DMA (the current Kc and, if announced, the next). One link per DMA MAID (a new one
replaces the old). It runs contentkey.KcSchedule: every announce goes to every bound DMA, a
KCREQ on a link bound to that DMA asks for an urgent rotation, a switch moves the content
Encoder to the new Kc. HB both ways under Ks every T_HB; a DMA silent for 3 T_HB is unbound.
Content goes to (peer IP of the bound link, its CONTENT_ADDR ports): never an address from a
message. Bounds: at most `max_dmas` bound links (contentkey.MAX_DMAS), `max_unbound` links
not bound yet (closed after T_IDLE without a message, by the adapter), replay windows per
(DMA MAID, Ks generation), at most 2 x max_dmas.

`SmaTreeServer` is the asyncio adapter (TCP listener, the loop's clock) with the content
sender (relay.SmaSender): `stream(payload)` and `await send_object(data)`.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable

from tessera.errors import TesseraError
from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2.codec import Rmcp2Error
from tessera.rmcp2.content import Encoder
from tessera.rmcp2.contentkey import MAX_DMAS, KcAnnounce, KcSchedule, KcSwitch, kc_message
from tessera.rmcp2.dmatree import LinkListener, agent_ks_lookup, policy_of
from tessera.rmcp2.relay import SmaSender
from tessera.rmcp2.upstream import HB_MISSED, MAX_LINK_MESSAGE, T_HB, KsSeq, KsWindows, seal_ks, seq_base

log = logging.getLogger("tessera.rmcp2.smatree")
N, M = C.NodeType, C.MsgType

TREE_PORT = 26032  # B.10
MAX_UNBOUND = 64
T_IDLE = 60.0

Out = tuple[Hashable, "bytes | None"]


@dataclass
class _DmaLink:
    peer_ip: str | None
    opened: float
    maid: bytes | None = None
    ports: tuple[int, int] = (0, 0)
    last_rx: float = 0.0
    next_hb: float = 0.0


@dataclass(frozen=True)
class DmaTarget:
    """A bound DMA: where its content goes (the link's peer IP, its CONTENT_ADDR ports)."""

    maid: bytes
    host: str
    udp: int
    tcp: int


class KcGenFile:
    """The newest Kc generation an SMA made, kept in a small file (mode 0600; the generation
    number only, never a key) so that a restarted SMA starts at the next one: DMAs and RMAs
    refuse a Gen that is not ahead of the newest they hold (B.16), so an SMA that started
    again at Gen 1 reached nobody until the session restarted. Written to a temporary name and
    renamed, so a crash leaves the old number or the new one."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def load(self) -> int:
        """The newest generation saved, 0 if none (a first start)."""
        try:
            gen = int(self.path.read_text().strip())
        except FileNotFoundError:
            return 0
        except ValueError:
            raise TesseraError(f"{self.path}: not a Kc generation number") from None
        if not 1 <= gen <= 255:
            raise TesseraError(f"{self.path}: Kc generation {gen} outside 1..255")
        return gen

    def first_gen(self) -> int:
        """Where a (re)started SMA begins: after the newest saved, else 1."""
        saved = self.load()
        return P.next_gen(saved) if saved else 1

    def save(self, gen: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{gen}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class SmaCore:
    """The SMA's tree, sans-IO (module docstring). Events in (`opened`, `receive`, `closed`,
    `tick`), `(link, bytes)` out, `(link, None)` = close that link after what precedes."""

    def __init__(self, session_id: int, maid: bytes, *, suite: P.Suite, content: tuple[int, int],
                 ks_current: Callable[[], P.ProtKey | None], ks_lookup: Callable[[int], P.ProtKey | None],
                 rand: Callable[[int], bytes], now: float, seq: KsSeq | None = None, t_hb: float = T_HB,
                 max_dmas: int = MAX_DMAS, **kc) -> None:
        self.sid, self.maid, self.suite, self.t_hb, self.max_dmas = session_id, bytes(maid), suite, t_hb, max_dmas
        self.ks_current, self.ks_lookup, self.rand = ks_current, ks_lookup, rand
        self.kc = KcSchedule(session_id, maid, rand, now, ks_suite=suite, **kc)
        enc, auth = content
        try:
            self.encoder = Encoder(session_id.to_bytes(8, "big"), self.maid, enc, auth, rand)
        except Rmcp2Error:
            raise TesseraError(f"content algorithm {enc}/{auth}: Tessera's content layer runs AES-CBC/CTR-128 "
                               "with HMAC-SHA1/MD5 (B.17)") from None
        self.encoder.set_key(*self.kc.current())
        self.seq = seq or KsSeq()
        self.windows = KsWindows(2 * max_dmas)
        self._links: dict[Hashable, _DmaLink] = {}
        self._bound: dict[bytes, Hashable] = {}
        self.on_targets: Callable[[list[DmaTarget]], None] | None = None
        self.errors: Counter = Counter()
        self.gone: Counter = Counter()  # DMAs unbound: closed, heartbeat, replaced
        self.kc_sent = 0

    # ------------------------------------------------------------------ views
    def targets(self) -> list[DmaTarget]:
        out = []
        for maid, conn in self._bound.items():
            link = self._links[conn]
            if link.peer_ip is not None:
                out.append(DmaTarget(maid, link.peer_ip, *link.ports))
        return out

    def dmas(self) -> list[bytes]:
        return list(self._bound)

    def is_bound(self, conn: Hashable) -> bool:
        link = self._links.get(conn)
        return link is not None and link.maid is not None

    @property
    def unbound(self) -> int:
        return len(self._links) - len(self._bound)

    def _changed(self) -> None:
        if self.on_targets is not None:
            self.on_targets(self.targets())

    # ------------------------------------------------------------------ events
    def opened(self, conn: Hashable, now: float, peer_ip: str | None) -> None:
        self._links[conn] = _DmaLink(peer_ip, now, last_rx=now)

    def closed(self, conn: Hashable, now: float, why: str = "closed") -> list[Out]:
        link = self._links.pop(conn, None)
        if link is not None and link.maid is not None and self._bound.get(link.maid) == conn:
            del self._bound[link.maid]
            self.gone[why] += 1
            log.info("rmcp2 sma: DMA %s unbound (%s); %d bound", link.maid.hex(), why, len(self._bound))
            self._changed()
        return []

    def receive(self, conn: Hashable, data: bytes, now: float) -> list[Out]:
        link = self._links.get(conn)
        if link is None:
            return []
        try:
            msg = self.windows.unseal(data, self.suite, self.ks_lookup)
        except Rmcp2Error as e:
            self.errors[e.code.name] += 1
            return []
        if msg.nt != N.DMA or msg.session_id != self.sid:
            self.errors["not a DMA of this session"] += 1
            return []
        if link.maid is None:
            if msg.type != M.PPROBREQ or msg.get(C.ContentAddr) is None:
                self.errors["unbound link: PPROBREQ + CONTENT_ADDR first"] += 1
                return []
            return self._bind(conn, link, msg, now)
        if msg.maid != link.maid:  # a link speaks for the DMA it is bound to, no other (B.16)
            self.errors["another DMA's MAID on a bound link"] += 1
            return []
        link.last_rx = now
        if msg.type == M.KCREQ:
            log.info("rmcp2 sma: KCREQ from DMA %s (%s)", link.maid.hex(), msg.get(C.ResultCtl).value.name)
            return self.rotate(now)
        if msg.type == M.PPROBREQ:  # its CONTENT_ADDR again (the newest counts)
            ca = msg.get(C.ContentAddr)
            if ca is not None and (ca.udp, ca.tcp) != link.ports:
                link.ports = (ca.udp, ca.tcp)
                self._changed()
            return []
        if msg.type != M.HB:
            self.errors[f"{msg.type.name} on an upstream link"] += 1
        return []

    def tick(self, now: float) -> list[Out]:
        out = self._events(self.kc.tick(now))
        for maid, conn in list(self._bound.items()):
            link = self._links[conn]
            if now - link.last_rx >= HB_MISSED * self.t_hb:
                self.closed(conn, now, "heartbeat")
                out.append((conn, None))
            elif now >= link.next_hb:
                link.next_hb = now + self.t_hb
                out += self._to(conn, C.Message(M.HB, N.SMA, self.sid, self.maid))
        return out

    def rotate(self, now: float) -> list[Out]:
        """An urgent Kc rotation asked locally (as a KCREQ would): announced to every bound DMA."""
        return self._events(self.kc.request_rotation(now))

    # ------------------------------------------------------------------ internals
    def _bind(self, conn: Hashable, link: _DmaLink, msg: C.Message, now: float) -> list[Out]:
        out: list[Out] = []
        old = self._bound.get(msg.maid)
        if old is None and len(self._bound) >= self.max_dmas:
            self.errors["too many DMAs"] += 1
            return self._to(conn, C.Message(M.PPROBANS, N.SMA, self.sid, msg.maid,
                                            (C.ResultCtl(C.Result.REJECTED),))) + [(conn, None)]
        if old is not None and old != conn:  # one link per DMA: the new one replaces the old
            self._links[old].maid = None
            del self._bound[msg.maid]
            self.gone["replaced"] += 1
            out.append((old, None))
        ca = msg.get(C.ContentAddr)
        link.maid, link.ports, link.last_rx, link.next_hb = msg.maid, (ca.udp, ca.tcp), now, now + self.t_hb
        self._bound[msg.maid] = conn
        log.info("rmcp2 sma: DMA %s bound (%s, content UDP %d TCP %d); %d bound", msg.maid.hex(), link.peer_ip,
                 ca.udp, ca.tcp, len(self._bound))
        status = C.Status(0, len(self._bound), self.kc.cur)
        out += self._to(conn, C.Message(M.PPROBANS, N.SMA, self.sid, msg.maid,
                                        (C.ResultCtl(C.Result.ACCEPTED), status)))
        for gen, _key in filter(None, (self.kc.current(), self.kc.next())):
            out += self._kc_to(conn, msg.maid, gen)
        self._changed()
        return out

    def _events(self, events: list) -> list[Out]:
        out: list[Out] = []
        for e in events:
            if isinstance(e, KcAnnounce):
                for maid, conn in self._bound.items():
                    out += self._kc_to(conn, maid, e.gen)
            elif isinstance(e, KcSwitch):
                self.encoder.set_key(*self.kc.current())
        return out

    def _kc_to(self, conn: Hashable, dma: bytes, gen: int) -> list[Out]:
        key = self.kc.key(gen)
        ks = self.ks_current()
        if key is None or ks is None:
            self.errors["no Ks" if ks is None else "no Kc"] += 1
            return []
        self.kc_sent += 1
        plain = kc_message(self.sid, dma, gen, key)
        return [(conn, P.seal(plain, ks, self.suite, self.seq.next(ks), self.rand(P.IV_LEN)))]

    def _to(self, conn: Hashable, msg: C.Message) -> list[Out]:
        ks = self.ks_current()
        if ks is None:
            self.errors["no Ks"] += 1
            return []
        return [(conn, seal_ks(msg, ks, self.suite, self.seq, self.rand))]


class SmaTreeServer(LinkListener):
    """The SMA's tree-control listener (B.10 port 26032; 0 picks one) over an SmaCore, and its
    content sender. Sends never wait (a link more than `max_queued` bytes behind is dropped)."""

    max_message = MAX_LINK_MESSAGE
    kind = "dma"

    def __init__(self, core: SmaCore, host: str = "127.0.0.1", port: int = TREE_PORT, *, tick: float = 0.5,
                 idle: float = T_IDLE, max_unbound: int = MAX_UNBOUND, max_queued: int = 64 * 1024) -> None:
        super().__init__(core, host, port, tick=tick, idle=idle, max_unbound=max_unbound, max_queued=max_queued)
        self.sender = SmaSender([])
        self.stream_sent = 0
        self.objects_sent = 0
        core.on_targets = self._targets

    def _unbound(self) -> int:
        return self.core.unbound

    def _bound(self, conn: Hashable) -> bool:
        return self.core.is_bound(conn)

    def _targets(self, targets: list[DmaTarget]) -> None:
        # a DMA that announced no port (a child DMA, fed by its parent: B.15) takes Kc only
        self.sender.dmas = [(t.host, t.udp, t.tcp) for t in targets if t.udp or t.tcp]

    async def start(self) -> None:
        await self._listen()
        log.info("rmcp2 sma: tree port %s:%d (DMAs link here)", self.host, self.port)

    async def close(self) -> None:
        await self._stop_listening()
        await self.sender.close()
        await self._abort_all()

    # -- content --
    def stream(self, payload: bytes) -> int:
        """Encrypt one stream payload (at most 1024 bytes) under the current Kc and send it to
        every bound DMA by UDP; returns how many DMAs it went to."""
        pkt = self.core.encoder.stream(payload)
        self.sender.stream(pkt)
        self.stream_sent += 1
        return len(self.sender.dmas)

    async def send_object(self, data: bytes) -> int:
        """Encrypt one object (OBJ_BEGIN, chunks, OBJ_END) and send it over TCP to every bound
        DMA (waits for the links to take it); returns how many DMAs it was sent to."""
        n = len(self.sender.dmas)
        await self.sender.object(self.core.encoder.object(data))
        self.objects_sent += 1
        return n


def from_agent(agent, rand: Callable[[int], bytes], now: float, wall: float | None = None, **kw) -> SmaCore:
    """An SmaCore for an SMA agent (agent.Agent) that agreed on the policy: its MAID, Ks, the
    suite of Ks messages (GK_EN_DEC_ID, AUTH_ID) and the content algorithm (CON_EN_DEC_ID)."""
    if agent.state != "ready" or agent.policy is None:
        raise ValueError("the SMA has not agreed on a security policy yet")
    _mecha, suite = policy_of(agent.policy)
    content = (int(agent.policy.get(C.ConEnDecAlg).value), int(agent.policy.get(C.AuthAlg).value))
    return SmaCore(agent.cfg.session_id, agent.cfg.maid, suite=suite, content=content,
                   ks_current=lambda: agent.ks, ks_lookup=agent_ks_lookup(agent), rand=rand, now=now,
                   seq=KsSeq(seq_base(time.time() if wall is None else wall)), **kw)
