"""The DMA's tree service: join, group key and the members' control links in one runnable
piece (X.603.1 Amd.1 10.2.3-10.2.5; docs/rmcp2-profile.md B.15 "Control link", B.16).

`TreeCore` is sans-IO: it ties the join engine (tree.JoinEngine), the group key manager
(groupkey.GroupKeyManager, built from the agreed GK_MECHA) and the Kc re-wrap
(contentkey.KcRelay) to the links. Events in (`opened`, `receive`, `closed`, `tick`,
`kc_from_sma`), `(link, bytes)` out, `(link, None)` meaning "close that link once what
precedes is sent". `DmaTreeServer` is the thin asyncio adapter (TCP, the loop's clock).

The control link (B.15, defined by this project): the TCP link an RMA joined on stays open.
DMA -> RMA: KEYDELIVER (Kg under K_MAS or under the previous Kg; Kc under Kg), HB under
K_MAS every T_HB, LEAVREQ EXPELLED under K_MAS when the RMA drops out of the ACL. RMA -> DMA,
under K_MAS: HB every T_HB, LEAVREQ (answered LEAVANS, then the link closes). The member
left when: its LEAVREQ, the link closing, nothing authentic from it for 3 T_HB, its ACL
entry gone, or its link falling `max_queued` bytes behind; the key layer then re-keys per
GK_MECHA (member_left).

Content addresses (B.4 CONTENT_ADDR, B.17): a member's authentic HB may carry CONTENT_ADDR; its
ports with the peer IP of the member's own link (never an address from a message) make its
relay.Subscriber. Every change of that list (an address learnt or changed, a member gone) calls
`on_subscribers(list)` (the DMA's Relay.set_subscribers). A DMA that stops cleanly (`stop`)
sends each member LEAVREQ LEAVE_NORMAL under its K_MAS, then closes its link (B.15).
"""
from __future__ import annotations

import abc
import asyncio
import logging
import os
import resource
import socket
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Hashable

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2 import tree as T
from tessera.rmcp2.contentkey import KcRelay
from tessera.rmcp2.groupkey import KG_PERIOD, Delivery, GroupFull, GroupKeyManager
from tessera.rmcp2.relay import Subscriber

log = logging.getLogger("tessera.rmcp2.dmatree")
N, M = C.NodeType, C.MsgType

TREE_PORT = 26032  # B.10
T_HB = 30.0  # B.10: heartbeat interval on a control link
HB_MISSED = 3  # B.10: a member silent for 3 T_HB is gone
MAX_UNJOINED = 256  # links not (yet) carrying a member: as JoinServer's max_conns
MAX_QUEUED = 64 * 1024  # bytes waiting for one slow member before it is dropped
MAX_KCREQ = 64  # KCREQ reasons waiting for the upstream link (coalesced by the SMA anyway)

Out = tuple[Hashable, "bytes | None"]


@dataclass
class _Link:
    maid: bytes | None = None  # set once its RMA joined on it
    kmas: P.ProtKey | None = field(default=None, repr=False)
    hashed: bytes = b""
    window: P.ReplayWindow = field(default_factory=P.ReplayWindow)
    last_rx: float = 0.0
    next_hb: float = 0.0
    peer_ip: str | None = None  # the TCP peer: the only address content is ever sent to (B.4)
    content: tuple[int, int] | None = None  # (UDP, TCP) ports of its newest authentic CONTENT_ADDR
    child: bool = False  # a child DMA's control link (under Ks, B.15 "Child DMA"), not a member's


def policy_of(policy: C.Message) -> tuple[C.GkMecha, P.Suite]:
    """GK_MECHA and the suite in force (GK_EN_DEC_ID, AUTH_ID) from the agreed SECLIST."""
    return (C.GkMecha(policy.get(C.GkMech).gk_mecha),
            P.Suite(policy.get(C.GkEnDecAlg).value, policy.get(C.AuthAlg).value))


class TreeCore:
    """The DMA's tree, sans-IO (module docstring). At most `max_members` members (2000)."""

    def __init__(self, session_id: int, maid: bytes, *, acl_lookup: Callable[[bytes], bytes | None],
                 mecha: C.GkMecha, suite: P.Suite, rand: Callable[[int], bytes], now: float,
                 kg_period: float = KG_PERIOD, t_hb: float = T_HB, max_members: int = T.MAX_MEMBERS,
                 ks_lookup: Callable[[int], P.ProtKey | None] | None = None,
                 ks_current: Callable[[], P.ProtKey | None] | None = None, t_annexe: float = T.T_ANNEXE,
                 ks_seq_base: int = 1) -> None:
        self.sid, self.maid, self.suite, self.t_hb = session_id, bytes(maid), suite, t_hb
        self.acl_lookup, self.ks_lookup, self.ks_current = acl_lookup, ks_lookup, ks_current
        self.group = GroupKeyManager(session_id, maid, mecha, suite, rand, now, period=kg_period,
                                     max_members=max_members)
        self.relay = KcRelay(session_id, maid, self.group, suite)
        self.join = T.JoinEngine(session_id, maid, acl_lookup=acl_lookup, kg_source=self.group.current, suite=suite,
                                 rand=rand, ks_lookup=ks_lookup, ks_current=ks_current, t_annexe=t_annexe,
                                 max_members=max_members, status=self._status, on_join=self._on_join,
                                 on_child=self._on_child, ks_seq_base=ks_seq_base)
        self._links: dict[Hashable, _Link] = {}
        self._member_conn: dict[bytes, Hashable] = {}
        self._child_conn: dict[bytes, Hashable] = {}  # child DMAs (B.15 "Child DMA"): relay subscribers too
        self._out: list[Out] = []  # what _on_join routes while the join engine runs
        self._joined: list[bytes] = []
        self.left: Counter = Counter()  # why members left: leavreq, closed, heartbeat, expelled, slow
        self.errors: Counter = Counter()  # control-link messages refused, by B.12 name or reason
        # KCREQ reasons for the SMA, drained by the upstream link (upstream.py); bounded, oldest dropped
        self.kcreq_wanted: deque[C.Result] = deque(maxlen=MAX_KCREQ)
        self.on_subscribers: Callable[[list[Subscriber]], None] | None = None

    # ------------------------------------------------------------------ views
    def members(self) -> list[bytes]:
        return list(self._member_conn)

    def children(self) -> list[bytes]:
        """MAIDs of the child DMAs whose control link is up."""
        return list(self._child_conn)

    def subscribers(self) -> list[Subscriber]:
        """The members with a content address (B.17): peer IP of their link, ports of CONTENT_ADDR."""
        out = []
        for maid, conn in [*self._member_conn.items(), *self._child_conn.items()]:
            link = self._links[conn]
            if link.content is None or link.peer_ip is None:
                continue
            udp, tcp = link.content
            out.append(Subscriber(maid, (link.peer_ip, udp) if udp else None, (link.peer_ip, tcp) if tcp else None))
        return out

    def take_kcreqs(self) -> list[C.Result]:
        """The KCREQ reasons waiting (the queue is drained)."""
        out = list(self.kcreq_wanted)
        self.kcreq_wanted.clear()
        return out

    def _subs_changed(self) -> None:
        if self.on_subscribers is not None:
            self.on_subscribers(self.subscribers())

    def is_member_link(self, conn: Hashable) -> bool:
        link = self._links.get(conn)
        return link is not None and link.maid is not None

    @property
    def unjoined(self) -> int:
        return len(self._links) - len(self._member_conn) - len(self._child_conn)

    def _status(self) -> tuple[int, int, int]:
        return len(self.join.children()), len(self._member_conn), self.group.current()[0]

    # ------------------------------------------------------------------ events
    def opened(self, conn: Hashable, now: float, peer_ip: str | None = None) -> None:
        self._links[conn] = _Link(last_rx=now, peer_ip=peer_ip)

    def receive(self, conn: Hashable, data: bytes, now: float) -> list[Out]:
        link = self._links.get(conn)
        if link is None:
            return []
        if link.child:
            return self._child_control(conn, link, data, now)
        if link.maid is not None:
            return self._control(conn, link, data, now)
        self._out, self._joined = [], []
        replies = [(conn, r) for r in self.join.receive(conn, data, now)]
        out, self._out = self._out + replies, []
        for maid in self._joined:  # the Kc it may have, under the Kg it just got (B.16)
            out += self._route(self.relay.catch_up(maid, now))
            self._want_kc_rotation(True)
        return out

    def closed(self, conn: Hashable, now: float, why: str = "closed") -> list[Out]:
        link = self._links.pop(conn, None)
        self.join.drop(conn)
        if link is not None and link.child:
            self._child_gone(conn, link, why)
            return []
        if link is None or link.maid is None or self._member_conn.get(link.maid) != conn:
            return []
        return self._leave(link.maid, why, now, link)

    def tick(self, now: float) -> list[Out]:
        self.join.tick(now)
        out = self._route(self.group.tick(now))
        for maid, conn in list(self._member_conn.items()):
            link = self._links[conn]
            if now - link.last_rx >= HB_MISSED * self.t_hb:
                log.info("rmcp2 dma: member %s missed %d heartbeats", maid.hex(), HB_MISSED)
                out += self._leave(maid, "heartbeat", now) + [(conn, None)]
            elif self.acl_lookup(link.hashed) is None:  # 10.1.5: no longer in the ACL -> expelled
                log.info("rmcp2 dma: member %s left the ACL; expelled", maid.hex())
                out += self._to(conn, maid, M.LEAVREQ, C.ResultCtl(C.Result.EXPELLED))
                out += self._leave(maid, "expelled", now) + [(conn, None)]
            elif now >= link.next_hb:
                link.next_hb = now + self.t_hb
                out += self._to(conn, maid, M.HB)
        for maid, conn in list(self._child_conn.items()):
            link = self._links[conn]
            if now - link.last_rx >= HB_MISSED * self.t_hb:
                log.info("rmcp2 dma: child DMA %s missed %d heartbeats", maid.hex(), HB_MISSED)
                self._links.pop(conn, None)
                self._child_gone(conn, link, "heartbeat")
                out.append((conn, None))
            elif now >= link.next_hb:
                link.next_hb = now + self.t_hb
                out += self._to_child(conn, M.HB)
        return out

    def stop(self, now: float) -> list[Out]:
        """A clean stop (B.15 DMA leave): LEAVREQ LEAVE_NORMAL under each member's K_MAS, then
        its link closes. No re-key: the group ends with the DMA."""
        out: list[Out] = []
        for maid, conn in list(self._member_conn.items()):
            out += self._to(conn, maid, M.LEAVREQ, C.ResultCtl(C.Result.LEAVE_NORMAL)) + [(conn, None)]
            self._links.pop(conn, None)
            self.join.remove(maid)
            self.left["dma_stop"] += 1
        for maid, conn in list(self._child_conn.items()):  # a child takes the parent as gone and re-dials
            out.append((conn, None))
            link = self._links.pop(conn, None)
            if link is not None:
                self._child_gone(conn, link, "dma_stop")
        had = bool(self._member_conn)
        self._member_conn.clear()
        if had:
            self._subs_changed()
        return out

    def kc_from_sma(self, data: bytes, now: float) -> list[Out]:
        """A KEYDELIVER(Kc) from the SMA under Ks: re-sealed under Kg to every member."""
        if self.ks_lookup is None:
            return []
        return self._route(self.relay.receive(data, self.ks_lookup, now))

    # ------------------------------------------------------------------ internals
    def _on_join(self, member: T.Member, now: float) -> bool:
        try:  # before the RELANS: with FORWARD the Kg changes here (groupkey.py)
            # one Seq counter per K_MAS (B.7): the RELANS is Seq 1 (tree.py), the control link goes on from 2
            ds = self.group.member_joined(member.maid, member.kmas, now, seq=1)
        except GroupFull:
            return False
        old = self._member_conn.pop(member.maid, None)
        if old is not None and old != member.conn:  # re-joined on a new link: the old one ends
            gone = self._links.pop(old, None)
            self._out.append((old, None))
            lost_addr = gone is not None and gone.content is not None
        else:
            lost_addr = False
        self._out += self._route(ds)  # to the members before it: the joiner is not linked yet
        link = self._links[member.conn]
        link.maid, link.kmas, link.hashed = member.maid, P.ProtKey(P.KeyRef.KMAS, member.kmas), member.hashed_maid
        link.window, link.last_rx, link.next_hb = P.ReplayWindow(), now, now + self.t_hb
        self._member_conn[member.maid] = member.conn
        self._joined.append(member.maid)
        if lost_addr:  # the old link's content address goes with it; the new link announces its own
            self._subs_changed()
        return True

    def _on_child(self, member: T.Member, now: float) -> bool:
        """A child DMA passed Annex E under Ks (B.15 "Child DMA"): its join link becomes its
        control link; one link per child, a new join replaces the old link."""
        old = self._child_conn.pop(member.maid, None)
        if old is not None and old != member.conn:
            gone = self._links.pop(old, None)
            self._out.append((old, None))
            if gone is not None:
                self._child_gone(old, gone, "replaced")
        link = self._links[member.conn]
        link.maid, link.child, link.hashed = member.maid, True, member.hashed_maid
        link.last_rx, link.next_hb = now, now + self.t_hb
        self._child_conn[member.maid] = member.conn
        return True

    def _child_gone(self, conn: Hashable, link: _Link, why: str) -> None:
        maid = link.maid
        if maid is None:
            return
        if self._child_conn.get(maid) == conn:  # not when a new join already replaced this link
            del self._child_conn[maid]
            self.join.remove(maid)
        link.maid, link.child = None, False
        self.left["child_" + why] += 1
        log.info("rmcp2 dma: child DMA %s gone (%s); %d children", maid.hex(), why, len(self._child_conn))
        if link.content is not None:
            link.content = None
            self._subs_changed()

    def _to_child(self, conn: Hashable, t: C.MsgType, *controls: C.Control) -> list[Out]:
        """Under Ks, MAID = this DMA (the sender: a message reflected to the child names the wrong MAID)."""
        try:
            return [(conn, self.join.ks_seal(C.Message(t, N.DMA, self.sid, self.maid, controls).encode()))]
        except C.Rmcp2Error as e:
            self.errors[e.code.name] += 1
            return []

    def _child_control(self, conn: Hashable, link: _Link, data: bytes, now: float) -> list[Out]:
        """One message on a child DMA's control link: only that child's, under Ks."""
        try:
            msg, _key = self.join.ks_unseal(data)
        except C.Rmcp2Error as e:
            self.errors[e.code.name] += 1
            return []
        if msg.nt != N.DMA or msg.maid != link.maid:
            self.errors["not from this child DMA"] += 1
            return []
        link.last_rx = now
        if msg.type != M.HB:
            self.errors[f"{msg.type.name} on a child link"] += 1
            return []
        ca = msg.get(C.ContentAddr)
        if ca is not None and (ca.udp, ca.tcp) != link.content:  # B.4: the newest authentic one counts
            link.content = (ca.udp, ca.tcp) if (ca.udp or ca.tcp) else None
            log.info("rmcp2 dma: child DMA %s takes content at %s UDP %d TCP %d", msg.maid.hex(), link.peer_ip,
                     ca.udp, ca.tcp)
            self._subs_changed()
        return []

    def _leave(self, maid: bytes, why: str, now: float, link: _Link | None = None) -> list[Out]:
        conn = self._member_conn.pop(maid, None)
        if link is None and conn is not None:
            link = self._links.get(conn)
        if link is not None:
            link.maid = None
            if link.content is not None:
                link.content = None
                self._subs_changed()
        self.join.remove(maid)
        self.left[why] += 1
        log.info("rmcp2 dma: member %s left (%s); %d remain", maid.hex(), why, len(self._member_conn))
        out = self._route(self.group.member_left(maid, now))
        self._want_kc_rotation(False)
        return out

    def _want_kc_rotation(self, joined: bool) -> None:
        why = self.relay.rotation_wanted(joined)
        if why is not None:
            self.kcreq_wanted.append(why)

    def _route(self, deliveries: list[Delivery]) -> list[Out]:
        out: list[Out] = []
        for d in deliveries:
            if d.maid is None:
                out += [(c, d.data) for c in self._member_conn.values()]
            elif d.maid in self._member_conn:
                out.append((self._member_conn[d.maid], d.data))
        return out

    def _to(self, conn: Hashable, maid: bytes, t: C.MsgType, *controls: C.Control) -> list[Out]:
        d = self.group.seal_to(maid, C.Message(t, N.DMA, self.sid, maid, controls).encode())
        return [] if d is None else [(conn, d.data)]

    def _control(self, conn: Hashable, link: _Link, data: bytes, now: float) -> list[Out]:
        """One message on a member's control link: only its own, under its K_MAS."""
        def keys(maid: bytes, sec: P.SecHeader) -> P.ProtKey | None:
            return link.kmas if sec.ref == P.KeyRef.KMAS and maid == link.maid else None

        try:
            msg = P.unseal_decode(data, self.suite, keys, lambda m, k: link.window)
        except C.Rmcp2Error as e:
            self.errors[e.code.name] += 1
            return []
        maid = link.maid
        assert maid is not None
        if msg.session_id != self.sid or msg.nt != N.RMA:
            self.errors["not from this RMA"] += 1
            return []
        link.last_rx = now
        ca = msg.get(C.ContentAddr) if msg.type == M.HB else None
        if ca is not None and (ca.udp, ca.tcp) != link.content:  # B.4: the newest authentic one counts
            link.content = (ca.udp, ca.tcp) if (ca.udp or ca.tcp) else None
            log.info("rmcp2 dma: member %s takes content at %s UDP %d TCP %d", maid.hex(), link.peer_ip,
                     ca.udp, ca.tcp)
            self._subs_changed()
        if msg.type == M.LEAVREQ:
            out = self._to(conn, maid, M.LEAVANS, C.ResultCtl(C.Result.LEAVE_NORMAL))
            return out + self._leave(maid, "leavreq", now) + [(conn, None)]
        if msg.type not in (M.HB, M.LEAVANS):
            self.errors[f"{msg.type.name} on a control link"] += 1
        return []


# ------------------------------------------------------------------------ asyncio adapters
class LinkListener(abc.ABC):
    """A tree-control listener over a sans-IO core (`opened(conn, now, peer_ip)`, `receive`,
    `closed(conn, now, why) -> outs`, `tick`, `t_hb`): one task reads each link (framing by
    header Length, at most `max_message` bytes); sends never wait: a link whose unsent bytes
    pass `max_queued` is aborted and closed as "slow" for the core. At most `max_unbound`
    links the core does not hold bound (closed after `idle` seconds without a message)."""

    max_message = T.MAX_MESSAGE
    kind = "tree"

    def __init__(self, core, host: str, port: int, *, tick: float, idle: float, max_unbound: int, max_queued: int,
                 sndbuf: int | None = None) -> None:
        self.core, self.host, self.port = core, host, port
        self.tick_s, self.idle, self.max_unbound, self.max_queued, self.sndbuf = tick, idle, max_unbound, max_queued, sndbuf
        self.refused_conns = 0
        self.slow_dropped = 0
        self._writers: dict[Hashable, asyncio.StreamWriter] = {}
        self._ids = 0
        self._server: asyncio.base_events.Server | None = None
        self._ticker: asyncio.Task | None = None

    @property
    def links(self) -> int:
        return len(self._writers)

    @abc.abstractmethod
    def _unbound(self) -> int:
        """How many links the core holds without a member / DMA bound to them."""

    @abc.abstractmethod
    def _bound(self, conn: Hashable) -> bool:
        """Whether the core holds `conn` as a member's / DMA's link."""

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ticker = asyncio.create_task(self._tick_loop())

    async def _stop_listening(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._server is not None:
            self._server.close()

    async def _abort_all(self) -> None:
        for w in list(self._writers.values()):
            w.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            self._send(self.core.tick(self._now()))

    def _send(self, out: list[Out]) -> None:
        dropped: list[Hashable] = []
        for conn, data in out:
            w = self._writers.get(conn)
            if w is None:
                continue
            if data is None:
                self._writers.pop(conn)
                w.close()
                continue
            w.write(data)
            if w.transport.get_write_buffer_size() > self.max_queued:
                self.slow_dropped += 1
                log.info("rmcp2: %s link %s over %d queued bytes; dropped", self.kind, conn, self.max_queued)
                self._writers.pop(conn)
                w.transport.abort()
                dropped.append(conn)
        for conn in dropped:  # after the batch: its re-keys must not overtake what the batch sealed under the old Kg
            self._send(self.core.closed(conn, self._now(), "slow"))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from tessera.rmcp2.server import read_message

        if self._unbound() >= self.max_unbound:
            self.refused_conns += 1
            writer.close()
            return
        if self.sndbuf:
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        self._ids += 1
        conn = (self.kind, self._ids)
        self._writers[conn] = writer
        peer = writer.get_extra_info("peername")
        self.core.opened(conn, self._now(), peer[0] if peer else None)
        try:
            while conn in self._writers:
                # a bound link lives by its heartbeats (the core's tick), others by T_IDLE
                bound = self._bound(conn)
                data = await read_message(reader, (HB_MISSED + 1) * self.core.t_hb if bound else self.idle,
                                          self.max_message)
                if data is None:
                    break
                self._send(self.core.receive(conn, data, self._now()))
        finally:
            if self._writers.pop(conn, None) is not None:
                writer.close()
                self._send(self.core.closed(conn, self._now()))
            else:
                self.core.closed(conn, self._now())  # already dropped: forgets a half-done join


class DmaTreeServer(LinkListener):
    """The DMA's tree-control listener (B.10 port 26032; 0 picks one) over a TreeCore.

    Each link is read by its own task (framing by header Length, at most 1024 bytes); sends
    never wait: a link whose unsent bytes pass `max_queued` is aborted and its member dropped,
    so one slow member never stalls the others. At most `max_unjoined` links without a member
    (closed after `idle` seconds without a message) beside the members' links."""

    def __init__(self, core: TreeCore, host: str = "127.0.0.1", port: int = TREE_PORT, *, tick: float = 0.5,
                 idle: float = 60.0, max_unjoined: int = MAX_UNJOINED, max_queued: int = MAX_QUEUED,
                 sndbuf: int | None = None) -> None:
        super().__init__(core, host, port, tick=tick, idle=idle, max_unbound=max_unjoined, max_queued=max_queued,
                         sndbuf=sndbuf)
        self.max_unjoined = max_unjoined

    def _unbound(self) -> int:
        return self.core.unjoined

    def _bound(self, conn: Hashable) -> bool:
        return self.core.is_member_link(conn)

    async def start(self) -> None:
        await self._listen()
        need = self.core.group.max_members + self.max_unjoined + 64
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY and soft < need:
            log.warning("rmcp2 dma: open-file limit %d is below the %d links the tree may hold", soft, need)
        log.info("rmcp2 dma: tree control listening on %s:%d (GK_MECHA %d)", self.host, self.port,
                 int(self.core.group.mecha))

    async def close(self, leave: bool = True) -> None:
        """Stop. With `leave` (a clean stop, B.15) each member first gets LEAVREQ LEAVE_NORMAL
        under its K_MAS and its link is closed after it (flushed for at most a second)."""
        await self._stop_listening()
        if leave:
            closing = [w for c, w in self._writers.items() if self.core.is_member_link(c)]
            self._send(self.core.stop(self._now()))
            if closing:
                await asyncio.wait([asyncio.ensure_future(w.wait_closed()) for w in closing], timeout=1.0)
        await self._abort_all()


def agent_ks_lookup(agent) -> Callable[[int], P.ProtKey | None]:
    """Ks of a generation an SMA/DMA agent (agent.Agent) holds: the current or the previous one."""
    def ks_lookup(gen: int) -> P.ProtKey | None:
        for k in (agent._ks, agent._ks_prev):
            if k is not None and k.gen == gen:
                return k
        return None
    return ks_lookup


def from_agent(agent, rand: Callable[[int], bytes], now: float, **kw) -> TreeCore:
    """A TreeCore for a DMA agent (agent.Agent) that agreed on the policy: its MAID, live ACL,
    Ks, GK_MECHA and suite."""
    if agent.state != "ready" or agent.policy is None:
        raise ValueError("the DMA has not agreed on a security policy yet")
    import time

    from tessera.rmcp2.upstream import seq_base

    mecha, suite = policy_of(agent.policy)
    kw.setdefault("ks_seq_base", seq_base(time.time()))  # the Seq under Ks its children see (B.15)
    return TreeCore(agent.cfg.session_id, agent.cfg.maid, acl_lookup=T.agent_acl_lookup(agent), mecha=mecha,
                    suite=suite, rand=rand, now=now, ks_lookup=agent_ks_lookup(agent), ks_current=lambda: agent.ks,
                    **kw)


class DmaService:
    """The DMA's whole tree service: the tree-control listener (DmaTreeServer over a TreeCore),
    the content relay (relay.Relay) fed by the members' CONTENT_ADDR, and, given the SMA's
    tree port, the upstream link (upstream.UpstreamLink: PPROBREQ + CONTENT_ADDR under Ks,
    Kc from the SMA, KCREQ). `start()` binds everything (port 0 = pick one; the bound ports
    are logged and readable), `close()` stops cleanly (B.15 DMA leave)."""

    def __init__(self, core: TreeCore, host: str = "127.0.0.1", port: int = TREE_PORT, *,
                 content_udp: int = 0, content_tcp: int = 0, sma: tuple[str, int] | None = None,
                 ks_suite: P.Suite | None = None, tick: float = 0.5, relay_kw: dict | None = None,
                 upstream_kw: dict | None = None, mcast: tuple[str, int] | None = None,
                 mcast_if: str | None = None, hma_kw: dict | None = None,
                 parent: tuple[str, int, bytes] | None = None, parent_kw: dict | None = None, **server_kw) -> None:
        from tessera.rmcp2.relay import Relay

        self.core, self.host = core, host
        self.server = DmaTreeServer(core, host, port, tick=tick, **server_kw)
        relay_kw = dict(relay_kw or {})
        self.hma = None
        if mcast is not None:  # a multicast-enabled area (B.17, B.18): only its HMA sends to the group
            from tessera.rmcp2 import hma as H

            if core.ks_lookup is None or core.ks_current is None:
                raise ValueError("a multicast-enabled DMA needs Ks for the HMA election (B.18)")
            relay_kw.update(multicast=mcast, multicast_if=mcast_if, multicast_on=False)
            hkw = dict(hma_kw or {})
            port_h = hkw.pop("port", H.HMA_PORT)
            engine = H.HmaEngine(core.sid, core.maid, suite=ks_suite or core.suite, ks_current=core.ks_current,
                                 ks_lookup=core.ks_lookup, rand=hkw.pop("rand", os.urandom),
                                 seq=hkw.pop("seq", None) or H.new_seq(), **hkw)
            self.hma = H.HmaService(engine, (mcast[0], port_h), mcast_if, self._hma_event)
        self.relay = Relay(core.sid.to_bytes(8, "big"), **relay_kw)
        self.content_udp, self.content_tcp = content_udp, content_tcp
        self.sma, self.ks_suite, self.upstream_kw = sma, ks_suite or core.suite, upstream_kw or {}
        self.upstream = None
        self.parent, self.parent_kw = parent, parent_kw or {}
        self.parent_link = None  # chain.ParentLink when this DMA is a child of `parent` (B.15 "Child DMA")
        core.on_subscribers = self.relay.set_subscribers

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def is_hma(self) -> bool:
        return self.hma is not None and self.hma.engine.is_hma

    def _hma_event(self, ev) -> None:
        from tessera.rmcp2.hma import Event

        self.relay.multicast_on = ev == Event.BECOME_HMA
        log.info("rmcp2 dma: %s; multicast sending %s", ev.value, "on" if self.relay.multicast_on else "off")

    async def start(self) -> None:
        await self.relay.start(self.host, self.content_udp, self.content_tcp)
        try:
            await self.server.start()
        except BaseException:
            await self.relay.close()
            raise
        if self.sma is not None:
            from tessera.rmcp2.upstream import UpstreamLink

            # a child DMA takes content from its parent, so it asks the SMA for Kc only (B.4 port 0)
            ports = (0, 0) if self.parent is not None else (self.relay.udp_port, self.relay.tcp_port)
            self.upstream = UpstreamLink(self.core, self.server, self.sma, self.ks_suite, ports, **self.upstream_kw)
            self.upstream.start()
        if self.parent is not None:
            from tessera.rmcp2.chain import ParentLink

            if self.sma is None:
                log.warning("rmcp2 dma: a child DMA without an upstream link (--sma) gets no Kc: "
                            "its members can open none of the content its parent relays")

            self.parent_link = ParentLink(self.core, self.server, self.parent, self.ks_suite,
                                          (self.relay.udp_port, self.relay.tcp_port), **self.parent_kw)
            self.parent_link.start()
        if self.hma is not None:
            try:
                await self.hma.start()
            except OSError:
                await self.close(leave=False)
                raise
        log.info("rmcp2 dma: tree port %d, content UDP %d TCP %d%s%s", self.server.port, self.relay.udp_port,
                 self.relay.tcp_port, f", upstream to {self.sma[0]}:{self.sma[1]}" if self.sma else "",
                 f", child of {self.parent[2].hex()} at {self.parent[0]}:{self.parent[1]}" if self.parent else "")

    async def close(self, leave: bool = True) -> None:
        """Stop; with `leave`, the HMA's HLEAVE first (B.18), then the members' LEAVREQ (B.15)."""
        if self.hma is not None:
            if leave:
                await self.hma.close()
            else:
                self.hma.abort()
        if self.upstream is not None:
            await self.upstream.close()
        if self.parent_link is not None:
            await self.parent_link.close()
        await self.server.close(leave)
        await self.relay.close()
