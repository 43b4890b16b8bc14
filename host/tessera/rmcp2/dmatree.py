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
"""
from __future__ import annotations

import asyncio
import logging
import resource
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Hashable

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2 import tree as T
from tessera.rmcp2.contentkey import KcRelay
from tessera.rmcp2.groupkey import KG_PERIOD, Delivery, GroupFull, GroupKeyManager

log = logging.getLogger("tessera.rmcp2.dmatree")
N, M = C.NodeType, C.MsgType

TREE_PORT = 26032  # B.10
T_HB = 30.0  # B.10: heartbeat interval on a control link
HB_MISSED = 3  # B.10: a member silent for 3 T_HB is gone
MAX_UNJOINED = 256  # links not (yet) carrying a member: as JoinServer's max_conns
MAX_QUEUED = 64 * 1024  # bytes waiting for one slow member before it is dropped

Out = tuple[Hashable, "bytes | None"]


@dataclass
class _Link:
    maid: bytes | None = None  # set once its RMA joined on it
    kmas: P.ProtKey | None = field(default=None, repr=False)
    hashed: bytes = b""
    window: P.ReplayWindow = field(default_factory=P.ReplayWindow)
    last_rx: float = 0.0
    next_hb: float = 0.0


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
                 ks_current: Callable[[], P.ProtKey | None] | None = None, t_annexe: float = T.T_ANNEXE) -> None:
        self.sid, self.maid, self.suite, self.t_hb = session_id, bytes(maid), suite, t_hb
        self.acl_lookup, self.ks_lookup = acl_lookup, ks_lookup
        self.group = GroupKeyManager(session_id, maid, mecha, suite, rand, now, period=kg_period,
                                     max_members=max_members)
        self.relay = KcRelay(session_id, maid, self.group, suite)
        self.join = T.JoinEngine(session_id, maid, acl_lookup=acl_lookup, kg_source=self.group.current, suite=suite,
                                 rand=rand, ks_lookup=ks_lookup, ks_current=ks_current, t_annexe=t_annexe,
                                 max_members=max_members, status=self._status, on_join=self._on_join)
        self._links: dict[Hashable, _Link] = {}
        self._member_conn: dict[bytes, Hashable] = {}
        self._out: list[Out] = []  # what _on_join routes while the join engine runs
        self._joined: list[bytes] = []
        self.left: Counter = Counter()  # why members left: leavreq, closed, heartbeat, expelled, slow
        self.errors: Counter = Counter()  # control-link messages refused, by B.12 name or reason
        self.kcreq_wanted: list[C.Result] = []  # KCREQ reasons for the SMA (not sent: no SMA link yet)

    # ------------------------------------------------------------------ views
    def members(self) -> list[bytes]:
        return list(self._member_conn)

    def is_member_link(self, conn: Hashable) -> bool:
        link = self._links.get(conn)
        return link is not None and link.maid is not None

    @property
    def unjoined(self) -> int:
        return len(self._links) - len(self._member_conn)

    def _status(self) -> tuple[int, int, int]:
        return len(self.join.children()), len(self._member_conn), self.group.current()[0]

    # ------------------------------------------------------------------ events
    def opened(self, conn: Hashable, now: float) -> None:
        self._links[conn] = _Link(last_rx=now)

    def receive(self, conn: Hashable, data: bytes, now: float) -> list[Out]:
        link = self._links.get(conn)
        if link is None:
            return []
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
        if link is None or link.maid is None or self._member_conn.get(link.maid) != conn:
            return []
        return self._leave(link.maid, why, now)

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
            self._links.pop(old, None)
            self._out.append((old, None))
        self._out += self._route(ds)  # to the members before it: the joiner is not linked yet
        link = self._links[member.conn]
        link.maid, link.kmas, link.hashed = member.maid, P.ProtKey(P.KeyRef.KMAS, member.kmas), member.hashed_maid
        link.window, link.last_rx, link.next_hb = P.ReplayWindow(), now, now + self.t_hb
        self._member_conn[member.maid] = member.conn
        self._joined.append(member.maid)
        return True

    def _leave(self, maid: bytes, why: str, now: float) -> list[Out]:
        conn = self._member_conn.pop(maid, None)
        link = self._links.get(conn) if conn is not None else None
        if link is not None:
            link.maid = None
        self.join.remove(maid)
        self.left[why] += 1
        log.info("rmcp2 dma: member %s left (%s); %d remain", maid.hex(), why, len(self._member_conn))
        out = self._route(self.group.member_left(maid, now))
        self._want_kc_rotation(False)
        return out

    def _want_kc_rotation(self, joined: bool) -> None:
        why = self.relay.rotation_wanted(joined)
        if why is not None and len(self.kcreq_wanted) < 64:
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
        if msg.type == M.LEAVREQ:
            out = self._to(conn, maid, M.LEAVANS, C.ResultCtl(C.Result.LEAVE_NORMAL))
            return out + self._leave(maid, "leavreq", now) + [(conn, None)]
        if msg.type not in (M.HB, M.LEAVANS):
            self.errors[f"{msg.type.name} on a control link"] += 1
        return []


# ------------------------------------------------------------------------ asyncio adapter
class DmaTreeServer:
    """The DMA's tree-control listener (B.10 port 26032; 0 picks one) over a TreeCore.

    Each link is read by its own task (framing by header Length, at most 1024 bytes); sends
    never wait: a link whose unsent bytes pass `max_queued` is aborted and its member dropped,
    so one slow member never stalls the others. At most `max_unjoined` links without a member
    (closed after `idle` seconds without a message) beside the members' links."""

    def __init__(self, core: TreeCore, host: str = "127.0.0.1", port: int = TREE_PORT, *, tick: float = 0.5,
                 idle: float = 60.0, max_unjoined: int = MAX_UNJOINED, max_queued: int = MAX_QUEUED,
                 sndbuf: int | None = None) -> None:
        self.core, self.host, self.port = core, host, port
        self.tick_s, self.idle, self.max_unjoined, self.max_queued, self.sndbuf = tick, idle, max_unjoined, max_queued, sndbuf
        self.refused_conns = 0
        self.slow_dropped = 0
        self._writers: dict[Hashable, asyncio.StreamWriter] = {}
        self._ids = 0
        self._server: asyncio.base_events.Server | None = None
        self._ticker: asyncio.Task | None = None

    @property
    def links(self) -> int:
        return len(self._writers)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ticker = asyncio.create_task(self._tick_loop())
        need = self.core.group.max_members + self.max_unjoined + 64
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY and soft < need:
            log.warning("rmcp2 dma: open-file limit %d is below the %d links the tree may hold", soft, need)
        log.info("rmcp2 dma: tree control listening on %s:%d (GK_MECHA %d)", self.host, self.port,
                 int(self.core.group.mecha))

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._server is not None:
            self._server.close()
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
                log.info("rmcp2 dma: link %s over %d queued bytes; dropped", conn, self.max_queued)
                self._writers.pop(conn)
                w.transport.abort()
                dropped.append(conn)
        for conn in dropped:  # after the batch: its re-keys must not overtake what the batch sealed under the old Kg
            self._send(self.core.closed(conn, self._now(), "slow"))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from tessera.rmcp2.server import read_message

        if self.core.unjoined >= self.max_unjoined:
            self.refused_conns += 1
            writer.close()
            return
        if self.sndbuf:
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        self._ids += 1
        conn = ("tree", self._ids)
        self._writers[conn] = writer
        self.core.opened(conn, self._now())
        try:
            while conn in self._writers:
                # a member's link lives by its heartbeats (TreeCore.tick), others by T_IDLE
                member = self.core.is_member_link(conn)
                data = await read_message(reader, (HB_MISSED + 1) * self.core.t_hb if member else self.idle,
                                          T.MAX_MESSAGE)
                if data is None:
                    break
                self._send(self.core.receive(conn, data, self._now()))
        finally:
            if self._writers.pop(conn, None) is not None:
                writer.close()
                self._send(self.core.closed(conn, self._now()))
            else:
                self.core.closed(conn, self._now())  # already dropped: forgets a half-done join


def from_agent(agent, rand: Callable[[int], bytes], now: float, **kw) -> TreeCore:
    """A TreeCore for a DMA agent (agent.Agent) that agreed on the policy: its MAID, live ACL,
    Ks, GK_MECHA and suite."""
    if agent.state != "ready" or agent.policy is None:
        raise ValueError("the DMA has not agreed on a security policy yet")
    mecha, suite = policy_of(agent.policy)

    def ks_lookup(gen: int) -> P.ProtKey | None:
        for k in (agent._ks, agent._ks_prev):
            if k is not None and k.gen == gen:
                return k
        return None

    return TreeCore(agent.cfg.session_id, agent.cfg.maid, acl_lookup=T.agent_acl_lookup(agent), mecha=mecha,
                    suite=suite, rand=rand, now=now, ks_lookup=ks_lookup, ks_current=lambda: agent.ks, **kw)
