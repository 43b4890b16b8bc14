"""The SMA's tree service (smatree.SmaCore) and the DMA's upstream link (upstream.UpstreamCore)
against each other by hand (sans-IO), then over loopback TCP with re-dial (profile B.15
"Upstream link", B.16, B.17; contract of issue 13 item 2)."""
from __future__ import annotations

import asyncio
import os

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import dmatree as D
from tessera.rmcp2 import protect as P
from tessera.rmcp2 import smatree as S
from tessera.rmcp2 import upstream as U

from .test_dma_content_addr import Member
from .test_dmatree import DMA, SID, SMA, SUITE, run
from .test_net import until

N, M, G = C.NodeType, C.MsgType, C.GkMecha
KS = P.ProtKey(P.KeyRef.KS, bytes(range(16)), 1)
CONTENT = (int(C.EnDecId.AES_CTR_128), int(C.AuthId.HMAC_SHA1))
DMA2 = C.make_maid("127.0.0.2", 26032, 0x0D02)


def ksl(gen: int) -> P.ProtKey | None:
    return KS if gen == KS.gen else None


def sma_core(now: float = 0.0, wall: float = 1.7e9, **kw) -> S.SmaCore:
    return S.SmaCore(SID, SMA, suite=SUITE, content=CONTENT, ks_current=lambda: KS, ks_lookup=ksl,
                     rand=os.urandom, now=now, seq=U.KsSeq(U.seq_base(wall)), urgent_gap=0.0, **kw)


class DmaEnd:
    """A DMA's TreeCore and its UpstreamCore, wired to an SmaCore by hand over link `conn`."""

    def __init__(self, sma: S.SmaCore, maid: bytes = DMA, mecha=G.BACKWARD_FORWARD, ip: str = "10.0.1.1",
                 ports=(26033, 26034), wall: float = 1.7e9) -> None:
        self.acl: dict = {}
        self.tree = D.TreeCore(SID, maid, acl_lookup=self.acl.get, mecha=mecha, suite=SUITE, rand=os.urandom,
                               now=0.0, ks_lookup=ksl, ks_current=lambda: KS)
        self.up = U.UpstreamCore(self.tree, SUITE, lambda: KS, ksl, ports, os.urandom, U.KsSeq(U.seq_base(wall)))
        self.sma, self.ip, self.n = sma, ip, 0
        self.down: list = []  # what the DMA sent its members
        self.sent: list[bytes] = []  # what the DMA sent the SMA
        self.conn = None

    def dial(self, now: float = 0.0) -> None:
        self.n += 1
        self.conn = (self.ip, self.n)
        self.sma.opened(self.conn, now, self.ip)
        self.to_sma(self.up.connected(now), now)

    def to_sma(self, datas: list[bytes], now: float) -> None:
        for d in datas:
            self.sent.append(d)
            self.from_sma(self.sma.receive(self.conn, d, now), now)

    def from_sma(self, outs: list, now: float) -> None:
        for conn, d in outs:
            if conn != self.conn or d is None:
                continue
            up, down = self.up.receive(d, now)
            self.down += down
            self.to_sma(up, now)

    def tick(self, now: float) -> None:
        self.to_sma(self.up.tick(now), now)


def test_bind_delivers_kc_and_a_kcreq_gets_an_urgent_key():
    sma = sma_core()
    targets: list = []
    sma.on_targets = targets.append
    dma = DmaEnd(sma)
    dma.dial()
    assert dma.up.state == "bound" and sma.dmas() == [DMA]
    assert targets[-1] == [S.DmaTarget(DMA, "10.0.1.1", 26033, 26034)]  # the link's peer IP, CONTENT_ADDR ports
    assert dma.tree.relay.held() == [1]  # the current Kc, re-wrapped for the (empty) group
    # a member joins (FORWARD): KCREQ up the link on the next tick, an urgent Kc comes back
    Member(dma.tree, dma.acl, 1, "10.0.2.1", 1.0)
    dma.tick(1.0)
    assert dma.up.kcreqs == 1 and sma.kc.urgent == 1
    assert dma.tree.relay.held() == [1, 2] and dma.tree.take_kcreqs() == []
    kc2 = [d for c, d in dma.down if d is not None]
    assert kc2  # the new Kc went to the member, under Kg
    # the switch moves the Encoder: content after it names Gen 2
    dma.from_sma(sma.tick(10.0), 10.0)
    assert sma.encoder.gen == 2 and sma.kc.cur == 2
    # HB both ways keep the link; a silent DMA is unbound after 3 T_HB, a silent SMA is lost
    dma.tick(40.0)
    dma.from_sma(sma.tick(40.0), 40.0)
    assert sma.dmas() == [DMA] and not dma.up.lost
    out = sma.tick(40.0 + 3 * U.T_HB)
    assert (dma.conn, None) in out and sma.dmas() == [] and targets[-1] == [] and sma.gone["heartbeat"] == 1
    dma.up.tick(40.0 + 3 * U.T_HB)
    assert dma.up.lost


def test_replayed_tampered_and_foreign_messages_bind_nothing():
    sma = sma_core()
    dma = DmaEnd(sma)
    dma.dial()
    probe = dma.sent[0]
    # the captured PPROBREQ replayed on a fresh link: refused by the window kept per (DMA, Ks gen)
    sma.opened("evil", 0.0, "10.6.6.6")
    assert sma.receive("evil", probe, 0.0) == [] and sma.errors["REPLAY"] == 1
    assert sma.targets()[0].host == "10.0.1.1"
    # tampered: MAC, and no window is created for an unauthenticated sender
    t = bytearray(probe)
    t[14] ^= 1  # another MAID
    n = len(sma.windows)
    assert sma.receive("evil", bytes(t), 0.0) == [] and sma.errors["MAC"] == 1 and len(sma.windows) == n
    # PPROBREQ without CONTENT_ADDR, or anything else first: not bound
    seq = U.KsSeq(U.seq_base(1.7e9 + 100))
    plain = C.Message(M.PPROBREQ, N.DMA, SID, DMA2)
    assert sma.receive("evil", U.seal_ks(plain, KS, SUITE, seq, os.urandom), 0.0) == []
    hb = C.Message(M.HB, N.DMA, SID, DMA2)
    assert sma.receive("evil", U.seal_ks(hb, KS, SUITE, seq, os.urandom), 0.0) == []
    assert sma.errors["unbound link: PPROBREQ + CONTENT_ADDR first"] == 2 and sma.dmas() == [DMA]
    # KCREQ naming another DMA on a bound link is refused (B.16: only on the link bound to that DMA)
    kcreq = C.Message(M.KCREQ, N.DMA, SID, DMA2, (C.ResultCtl(C.Result.LEAVE_NORMAL),))
    assert sma.receive(dma.conn, U.seal_ks(kcreq, KS, SUITE, seq, os.urandom), 0.0) == []
    assert sma.kc.urgent == 0 and sma.errors["another DMA's MAID on a bound link"] == 1
    # the DMA takes KEYDELIVER only after PPROBANS, and nothing from a non-SMA
    fresh = DmaEnd(sma, maid=DMA2)
    fresh.up.state = "probing"
    kd = sma._kc_to("x", DMA2, 1)[0][1]
    assert fresh.up.receive(kd, 0.0) == ([], []) and fresh.up.errors["KEYDELIVER before PPROBANS"] == 1


def test_one_link_per_dma_a_restarted_dma_rebinds_and_the_bound_count_is_capped():
    sma = sma_core(max_dmas=2)
    a = DmaEnd(sma)
    a.dial()
    old = a.conn
    a.dial(1.0)  # the same DMA process dials again: the new link replaces the old one
    assert sma.dmas() == [DMA] and sma.gone["replaced"] == 1 and sma.targets()[0] == S.DmaTarget(
        DMA, "10.0.1.1", 26033, 26034)
    assert not sma.is_bound(old)
    again = DmaEnd(sma, ip="10.0.1.9", wall=1.7e9 + 5)  # restarted: a new process, its Seq base above the old
    again.dial(2.0)
    assert again.up.state == "bound" and sma.targets()[0].host == "10.0.1.9"
    b = DmaEnd(sma, maid=DMA2, ip="10.0.1.2")
    b.dial(3.0)
    c = DmaEnd(sma, maid=C.make_maid("127.0.0.3", 26032, 3), ip="10.0.1.3")
    c.dial(3.0)
    assert c.up.state == "refused" and sma.errors["too many DMAs"] == 1 and len(sma.dmas()) == 2


def test_the_dma_redials_a_lost_sma_and_binds_again():
    async def main():
        loop = asyncio.get_running_loop()
        sma = S.SmaTreeServer(sma_core(loop.time()), port=0, tick=0.05)
        await sma.start()
        port = sma.port
        tree = D.TreeCore(SID, DMA, acl_lookup={}.get, mecha=G.BACKWARD, suite=SUITE, rand=os.urandom,
                          now=loop.time(), ks_lookup=ksl, ks_current=lambda: KS)
        svc = D.DmaService(tree, port=0, tick=0.05, sma=("127.0.0.1", port),
                           upstream_kw={"tick": 0.05, "backoff": (0.05, 0.2)})
        await svc.start()
        try:
            await until(lambda: svc.upstream.state == "bound" and sma.core.dmas() == [DMA], 10, "first bind")
            assert sma.core.targets()[0] == S.DmaTarget(DMA, "127.0.0.1", svc.relay.udp_port, svc.relay.tcp_port)
            assert tree.relay.held() == [1]
            await sma.close()
            await until(lambda: svc.upstream.state == "down", 10, "link lost")
            # the SMA's listener back (the same key schedule): the DMA dials again on its own
            core = sma.core
            sma = S.SmaTreeServer(core, port=port, tick=0.05)
            await sma.start()
            await until(lambda: svc.upstream.core.binds == 2 and sma.core.dmas() == [DMA], 10,
                        "re-dialled and bound again")
            assert svc.upstream.dials >= 2 and svc.upstream.state == "bound"
            sma._send(core.rotate(loop.time()))  # the next announce reaches the DMA on the new link
            await until(lambda: len(tree.relay.held()) == 2, 10, "a new Kc at the DMA")
        finally:
            await svc.close()
            await sma.close()
    run(main())


def test_a_restarted_sma_goes_on_after_its_newest_kc_generation(tmp_path):
    """A restarted SMA starts its Kc schedule after the newest generation it made (KcGenFile,
    a number in a 0600 file): the DMA, which holds a later generation than 1, takes the new
    Kc. Without the file the restarted SMA begins at generation 1 again and the DMA refuses
    it (REPLAY: not ahead of what it holds), so content would reach nobody."""
    state = S.KcGenFile(tmp_path / "sma.kcgen")
    assert state.first_gen() == 1
    sma = sma_core(first_gen=state.first_gen(), on_new_gen=state.save)
    dma = DmaEnd(sma)
    dma.dial()
    Member(dma.tree, dma.acl, 1, "10.0.2.1", 1.0)  # FORWARD: KCREQ -> urgent Kc 2 (made before it is sent)
    dma.tick(1.0)
    assert dma.tree.relay.held() == [1, 2] and state.load() == 2
    assert (tmp_path / "sma.kcgen").stat().st_mode & 0o777 == 0o600
    assert "2" == (tmp_path / "sma.kcgen").read_text().strip()  # the generation only, never a key

    def restarted(first_gen: int, save, wall: float) -> list[int]:
        dma.sma = sma_core(wall=wall, first_gen=first_gen, on_new_gen=save)
        dma.dial(2.0)  # the DMA's re-dial binds to the restarted SMA, which sends its current Kc
        assert dma.up.state == "bound"
        return dma.tree.relay.held()

    assert restarted(1, None, 1.7e9 + 60) == [1, 2]  # no file: Gen 1 again, refused (the DMA holds Gen 2)
    assert state.first_gen() == 3
    assert 3 in restarted(state.first_gen(), state.save, 1.7e9 + 120)  # with the file: Gen 3, ahead of 2, taken
    assert state.load() == 3
    # a wrap: after 255 comes 1
    state.save(255)
    assert state.first_gen() == 1
