"""The DMA learns its members' content addresses (B.4 CONTENT_ADDR, B.17) and leaves cleanly
(B.15): TreeCore driven by hand (sans-IO, tree.JoinClient for the joins), then one asyncio run
of dmatree.DmaService (tree + relay) with host RMAs."""
from __future__ import annotations

import asyncio
import hashlib
import os

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import dmatree as D
from tessera.rmcp2 import protect as P
from tessera.rmcp2 import tree as T
from tessera.rmcp2.relay import Subscriber

from .test_dmatree import DMA, SID, SUITE, HostRma, run
from .test_net import until

N, M, G = C.NodeType, C.MsgType, C.GkMecha


class Member:
    """One RMA joined to a TreeCore by hand: its MAID, K_MAS and a Seq counter."""

    def __init__(self, core: D.TreeCore, acl: dict, i: int, peer_ip: str, now: float) -> None:
        self.core, self.conn = core, ("c", i, peer_ip)
        self.maid = C.make_maid("127.0.0.1", 43000 + i, i + 1)
        w = hashlib.sha256(b"W%d" % i).digest()[:16]
        acl[P.hashed_maid(SID, self.maid)] = w
        core.opened(self.conn, now, peer_ip)
        cli = T.JoinClient(SID, self.maid, N.RMA, SUITE, os.urandom, hashed_ktls=w)
        todo = [cli.start()]
        while todo:
            for conn, data in core.receive(self.conn, todo.pop(0), now):
                if conn == self.conn and data is not None and cli.state not in ("joined", "refused"):
                    todo += cli.receive(data)
        assert cli.state == "joined"
        self.kmas = P.ProtKey(P.KeyRef.KMAS, cli.kmas)
        self.seq = 0

    def send(self, t: C.MsgType, *controls: C.Control, now: float = 0.0, tamper: bool = False) -> list:
        self.seq += 1
        data = bytearray(P.seal(C.Message(t, N.RMA, SID, self.maid, controls).encode(), self.kmas, SUITE,
                                self.seq, os.urandom(16)))
        if tamper:
            data[-1] ^= 1
        return self.core.receive(self.conn, bytes(data), now)

    def opens(self, data: bytes) -> C.Message:
        return P.unseal_decode(data, SUITE, lambda m, s: self.kmas, lambda m, k: P.ReplayWindow())


def core_with(acl: dict, mecha=G.BACKWARD) -> tuple[D.TreeCore, list]:
    core = D.TreeCore(SID, DMA, acl_lookup=acl.get, mecha=mecha, suite=SUITE, rand=os.urandom, now=0.0)
    seen: list = []
    core.on_subscribers = seen.append
    return core, seen


def test_authentic_hb_content_addr_feeds_the_subscribers_with_the_links_peer_ip():
    acl: dict = {}
    core, seen = core_with(acl)
    a = Member(core, acl, 1, "10.0.0.7", 0.0)
    b = Member(core, acl, 2, "10.0.0.8", 0.0)
    assert seen == [] and core.subscribers() == []  # no CONTENT_ADDR yet: no content
    a.send(M.HB, C.ContentAddr(40000, 40001))
    assert seen[-1] == [Subscriber(a.maid, ("10.0.0.7", 40000), ("10.0.0.7", 40001))]
    b.send(M.HB, C.ContentAddr(0, 41001))  # UDP 0: not over UDP
    assert seen[-1][1] == Subscriber(b.maid, None, ("10.0.0.8", 41001)) and len(seen) == 2
    a.send(M.HB)  # without CONTENT_ADDR: the address stays, nothing changes
    a.send(M.HB, C.ContentAddr(40000, 40001))  # the same again: nothing changes
    assert len(seen) == 2
    a.send(M.HB, C.ContentAddr(40010, 40011))  # changed: the newest authentic one counts
    assert Subscriber(a.maid, ("10.0.0.7", 40010), ("10.0.0.7", 40011)) in seen[-1] and len(seen) == 3
    # a tampered HB (or one under no key) changes nothing: no state before authentication
    a.send(M.HB, C.ContentAddr(5, 6), tamper=True)
    assert len(seen) == 3 and core.errors["MAC"] == 1
    # CONTENT_ADDR in another message than HB is the codec's UNEXPECTED_CONTROL (B.4: HB only)
    a.seq += 1
    plain = bytearray(C.Message(M.HB, N.RMA, SID, a.maid, (C.ContentAddr(7, 8),)).encode())
    plain[1] = M.LEAVANS
    assert core.receive(a.conn, P.seal(bytes(plain), a.kmas, SUITE, a.seq, os.urandom(16)), 0.0) == []
    assert len(seen) == 3 and core.errors["UNEXPECTED_CONTROL"] == 1
    # a leaves with LEAVREQ: removed; b's link closes: removed
    a.send(M.LEAVREQ, C.ResultCtl(C.Result.LEAVE_NORMAL))
    assert seen[-1] == [Subscriber(b.maid, None, ("10.0.0.8", 41001))]
    core.closed(b.conn, 1.0)
    assert seen[-1] == [] and core.subscribers() == []


def test_a_silent_member_and_a_rejoin_drop_the_old_address():
    acl: dict = {}
    core, seen = core_with(acl)
    a = Member(core, acl, 1, "10.0.0.7", 0.0)
    a.send(M.HB, C.ContentAddr(40000, 40001))
    again = Member(core, acl, 1, "10.0.0.9", 1.0)  # the same RMA joins on a new link: old address gone
    assert seen[-1] == [] and core.members() == [again.maid]
    again.send(M.HB, C.ContentAddr(1, 2), now=1.0)
    assert seen[-1] == [Subscriber(again.maid, ("10.0.0.9", 1), ("10.0.0.9", 2))]
    core.tick(1.0 + D.HB_MISSED * D.T_HB)  # silent for 3 T_HB: gone, and so is its address
    assert seen[-1] == [] and core.left["heartbeat"] == 1


def test_clean_stop_sends_leave_normal_under_each_kmas_then_closes():
    acl: dict = {}
    core, seen = core_with(acl)
    a, b = Member(core, acl, 1, "10.0.0.7", 0.0), Member(core, acl, 2, "10.0.0.8", 0.0)
    a.send(M.HB, C.ContentAddr(40000, 40001))
    out = core.stop(2.0)
    for m in (a, b):
        mine = [d for c, d in out if c == m.conn]
        assert len(mine) == 2 and mine[1] is None  # LEAVREQ, then close
        msg = m.opens(mine[0])
        assert (msg.type, msg.nt, msg.maid) == (M.LEAVREQ, N.DMA, m.maid)
        assert msg.get(C.ResultCtl).value == C.Result.LEAVE_NORMAL
    assert core.members() == [] and seen[-1] == [] and core.left["dma_stop"] == 2
    assert core.group.rotations["backward"] == 0  # the group ends with the DMA: no re-key


def test_kcreq_reasons_are_a_bounded_queue_that_drains():
    acl: dict = {}
    core, _ = core_with(acl, G.BACKWARD_FORWARD)
    ms = [Member(core, acl, i, "10.0.0.1", 0.0) for i in range(3)]
    assert core.take_kcreqs() == [C.Result.ACCEPTED] * 3 and core.take_kcreqs() == []
    ms[0].send(M.LEAVREQ, C.ResultCtl(C.Result.LEAVE_NORMAL))
    assert core.take_kcreqs() == [C.Result.LEAVE_NORMAL]
    for _ in range(D.MAX_KCREQ + 10):
        core._want_kc_rotation(False)
    assert len(core.kcreq_wanted) == D.MAX_KCREQ


def test_dma_service_relay_follows_the_members_and_a_clean_stop_reaches_them():
    async def main():
        rmas = [HostRma(i) for i in range(2)]
        acl = {k: v for r in rmas for k, v in r.acl.items()}
        core = D.TreeCore(SID, DMA, acl_lookup=acl.get, mecha=G.BACKWARD, suite=SUITE, rand=os.urandom,
                          now=asyncio.get_running_loop().time())
        svc = D.DmaService(core, port=0, tick=0.05)
        await svc.start()
        try:
            assert svc.relay.udp_port and svc.relay.tcp_port and svc.port
            for r in rmas:
                assert await r.join(svc.port) == "joined"
            a, b = rmas
            a.send(M.HB, C.ContentAddr(40000, 40001))
            b.send(M.HB, C.ContentAddr(40002, 0))
            await until(lambda: len(svc.relay.subscribers) == 2, 10, "both addresses at the relay")
            assert set(svc.relay.subscribers) == {Subscriber(a.maid, ("127.0.0.1", 40000), ("127.0.0.1", 40001)),
                                                  Subscriber(b.maid, ("127.0.0.1", 40002), None)}
            await b.close()
            await until(lambda: [s.maid for s in svc.relay.subscribers] == [a.maid], 10, "b gone at the relay")
        finally:
            await svc.close()
        await until(lambda: a.eof, 10, "a's link closed by the DMA")
        assert a.types[-1] == "LEAVREQ" and svc.relay.subscribers == []
        await a.close()
    run(main())
