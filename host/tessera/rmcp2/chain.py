"""A child DMA's link to its parent DMA: content through a tree of DMAs (docs/rmcp2-profile.md
B.15 "Child DMA", B.17; defined by this project).

The child dials the parent's tree-control port and joins as a CMA (tree.JoinClient, NT DMA:
PPROBREQ, Annex E under W from Ks, everything under Ks); the join's final RELANS must come
from the configured parent (its IDs is the parent's HASHED_MAID). The link then stays open as
the child's **control link**: HB under Ks both ways every T_HB, the child's carrying
CONTENT_ADDR (its relay's content ports); nothing authentic for 3 T_HB = the other side is
gone. The parent relays content to (peer IP of this link, those ports) as to its members, and
stops when the link goes (dmatree.TreeCore's child links).

Kc does not come this way: the child keeps its own upstream link to the SMA (upstream.py) for
KEYDELIVER(Kc) and KCREQ, announcing CONTENT_ADDR UDP 0 TCP 0 there so that the SMA sends it
no content (B.4: port 0 = not over that); content reaches it once, through its parent.

`ChildCore` is sans-IO (events in, bytes out); `ParentLink` is the asyncio adapter (the
upstream link's dial / read / tick / re-dial loop).
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from tessera.rmcp2 import annexe as E
from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2.tree import T_ANNEXE, JoinClient
from tessera.rmcp2.upstream import BACKOFF, HB_MISSED, T_HB, KsSeq, KsWindows, UpstreamLink, seal_ks, seq_base

if TYPE_CHECKING:
    from tessera.rmcp2.dmatree import DmaTreeServer, TreeCore

log = logging.getLogger("tessera.rmcp2.chain")
N, M = C.NodeType, C.MsgType


@dataclass
class ChildCore:
    """The child DMA's side of its control link to the parent, sans-IO. `connected(now)` gives
    the PPROBREQ; `receive(data, now)` returns (bytes for the parent, []); `tick(now)` bytes
    for the parent, and sets `lost` when the parent fell silent (or the join overran T_ANNEXE).
    `state`: down, probing (joining), bound (joined), refused."""

    sid: int
    maid: bytes
    parent: bytes  # the parent's MAID, from the configuration (B.1)
    suite: P.Suite
    ks_current: Callable[[], P.ProtKey | None]
    ks_lookup: Callable[[int], P.ProtKey | None]
    ports: tuple[int, int]  # this DMA's relay content ports, sent in CONTENT_ADDR
    rand: Callable[[int], bytes]
    seq: KsSeq = field(default_factory=KsSeq)  # kept across dials: the parent keeps its window
    t_hb: float = T_HB
    t_annexe: float = T_ANNEXE
    state: str = "down"
    lost: bool = False
    last_rx: float = 0.0
    next_hb: float = 0.0
    joins: int = 0
    errors: Counter = field(default_factory=Counter)
    windows: KsWindows = field(default_factory=lambda: KsWindows(4))  # the parent's messages, per Ks gen
    _client: JoinClient | None = None

    def connected(self, now: float) -> list[bytes]:
        ks = self.ks_current()
        self.lost, self.last_rx = False, now
        if ks is None:
            self.errors["no Ks"] += 1
            self.lost = True
            return []
        self._client = JoinClient(self.sid, self.maid, N.DMA, self.suite, self.rand, ks=ks, ks_seq=self.seq)
        self.state = "probing"
        return [self._client.start()]

    def disconnected(self) -> None:
        self._client = None
        if self.state != "refused":
            self.state = "down"

    def _hb(self) -> list[bytes]:
        ks = self.ks_current()
        if ks is None:
            self.errors["no Ks"] += 1
            return []
        msg = C.Message(M.HB, N.DMA, self.sid, self.maid, (C.ContentAddr(*self.ports),))
        return [seal_ks(msg, ks, self.suite, self.seq, self.rand)]

    def receive(self, data: bytes, now: float) -> tuple[list[bytes], list]:
        if self.state == "probing" and self._client is not None:
            try:
                out = self._client.receive(data)
            except (C.Rmcp2Error, E.AnnexeError) as e:
                self.errors[getattr(e, "code", getattr(e, "reason", None)).name] += 1
                return [], []
            if self._client.state == "refused":  # the link ends; ParentLink waits the longest backoff
                self.state, self.lost = "refused", True
                log.warning("rmcp2 dma: the parent DMA refused the join (%s)", self._client.fail)
                return [], []
            if self._client.state != "joined":
                return out, []
            if self._client.parent != P.hashed_maid(self.sid, self.parent):
                # Annex E proved only Ks (B.15): a DMA other than the configured parent answered
                self.state, self.lost = "refused", True
                self.errors["not the configured parent"] += 1
                log.warning("rmcp2 dma: another DMA than parent %s answered the join", self.parent.hex())
                return [], []
            self.state, self.last_rx, self.next_hb, self.joins = "bound", now, now + self.t_hb, self.joins + 1
            log.info("rmcp2 dma: joined parent DMA %s", self.parent.hex())
            return out + self._hb(), []
        if self.state != "bound":
            return [], []
        try:
            msg = self.windows.unseal(data, self.suite, self.ks_lookup)
        except C.Rmcp2Error as e:
            self.errors[e.code.name] += 1
            return [], []
        if msg.nt != N.DMA or msg.session_id != self.sid or msg.maid != self.parent:
            self.errors["not from the parent"] += 1
            return [], []
        self.last_rx = now
        if msg.type != M.HB:
            self.errors[f"{msg.type.name} on the parent link"] += 1
        return [], []

    def tick(self, now: float) -> list[bytes]:
        if self.state == "probing" and now - self.last_rx >= self.t_annexe:
            self.lost = True
            self.errors["TIMEOUT"] += 1
            return []
        if self.state != "bound":
            return []
        if now - self.last_rx >= HB_MISSED * self.t_hb:
            self.lost = True
            log.info("rmcp2 dma: nothing authentic from the parent DMA for %d heartbeats", HB_MISSED)
            return []
        if now >= self.next_hb:
            self.next_hb = now + self.t_hb
            return self._hb()
        return []


class ParentLink(UpstreamLink):
    """The asyncio side of a child DMA's link to its parent: dial, join, HB, re-dial with the
    upstream link's bounded jittered backoff."""

    peer = "the parent DMA"

    def __init__(self, tree: TreeCore, server: DmaTreeServer, parent: tuple[str, int, bytes], suite: P.Suite,
                 ports: tuple[int, int], *, t_hb: float = T_HB, tick: float = 0.5,
                 backoff: tuple[float, float] = BACKOFF, rand: Callable[[int], bytes] | None = None,
                 wall: Callable[[], float] | None = None, t_annexe: float = T_ANNEXE) -> None:
        if tree.ks_lookup is None or tree.ks_current is None:
            raise ValueError("a child DMA needs Ks")
        core = ChildCore(tree.sid, tree.maid, parent[2], suite, tree.ks_current, tree.ks_lookup, ports,
                         rand or os.urandom, KsSeq(seq_base((wall or time.time)())), t_hb=t_hb, t_annexe=t_annexe)
        self._setup(server, parent, tick, backoff, core)
