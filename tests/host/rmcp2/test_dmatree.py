"""The DMA's tree service over loopback TCP (port 0): host RMAs (tree.JoinClient for the
join, then the board's keys.py engine under CPython via mpshim for the keys) join a
dmatree.DmaTreeServer and keep their control links (profile B.15 "Control link", B.16).
Every RMA records every byte it received, so what a member that left could open afterwards
is checked on the bytes the others got."""
from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time

from tessera import mpshim
from tessera.rmcp2 import codec as C
from tessera.rmcp2 import dmatree as D
from tessera.rmcp2 import protect as P
from tessera.rmcp2 import tree as T
from tessera.rmcp2.contentkey import KcAnnounce, KcSchedule
from tessera.rmcp2.server import read_message

from .test_groupkey import Ring
from .test_net import Session, pki, until  # noqa: F401  (pki is a fixture)

mpshim.install()
from tessera_fw.rmcp2 import keys as K  # noqa: E402

N, M, G = C.NodeType, C.MsgType, C.GkMecha
SID = 0x5E55_2000_0000_0001  # test_net's session
SIDB = SID.to_bytes(8, "big")
DMA = C.make_maid("127.0.0.1", 26032, 0x0D01)
SMA = C.make_maid("127.0.0.1", 26032, 0x05A1)
SUITE = P.Suite(C.EnDecId.AES_CTR_128, C.AuthId.HMAC_SHA1)


def now_ms() -> int:
    return int(time.monotonic() * 1000) & 0x3FFFFFFF


class HostRma:
    """An RMA: joins with JoinClient, then feeds every message from the DMA to keys.py."""

    def __init__(self, i: int, suite: P.Suite = SUITE, maid: bytes | None = None, w: bytes | None = None,
                 dma: bytes = DMA) -> None:
        self.maid = maid or C.make_maid("127.0.0.1", 43000 + i, i + 1)
        self.w = w or hashlib.sha256(b"W%d" % i).digest()[:16]  # its HASHED_KTLS
        self.suite, self.dma = suite, dma
        self.ring = Ring()
        self.keys = K.Keys(SIDB, self.maid, self.ring, int(suite.enc), int(suite.auth))
        self.got: list[bytes] = []  # every message from the DMA after the join
        self.types: list[str] = []  # the types of those under its K_MAS
        self.eof = False
        self.seq = 0
        self.client: T.JoinClient | None = None
        self.task: asyncio.Task | None = None

    @property
    def acl(self) -> dict[bytes, bytes]:
        return {P.hashed_maid(SID, self.maid): self.w}

    @property
    def kg_gen(self) -> int:
        return self.keys.kg_gen()

    async def join(self, port: int, sock: socket.socket | None = None, listen: bool = True) -> str:
        if sock is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        else:
            self.reader, self.writer = await asyncio.open_connection(sock=sock)
        cli = self.client = T.JoinClient(SID, self.maid, N.RMA, self.suite, os.urandom, hashed_ktls=self.w)
        self.writer.write(cli.start())
        while cli.state not in ("joined", "refused"):
            data = await read_message(self.reader, 20, 1024)
            if data is None:
                return "closed"
            for o in cli.receive(data):
                self.writer.write(o)
        self.relans = data  # the result under K_MAS (Seq 1)
        if cli.state == "joined":
            self.keys.joined(self.dma, cli.kmas, cli.kg.gen, cli.kg.key)  # type: ignore[union-attr]
            if listen:
                self.task = asyncio.create_task(self._listen())
            else:  # a member that stops reading: only the kernel's buffers take the DMA's bytes
                self.writer.transport.pause_reading()
        return cli.state

    async def _listen(self) -> None:
        kmas = P.ProtKey(P.KeyRef.KMAS, self.client.kmas)  # type: ignore[union-attr,arg-type]
        while (data := await read_message(self.reader, 60, 1024)) is not None:
            self.got.append(data)
            self.keys.receive(data, now_ms())
            if data[C.HEADER_LEN] == P.KeyRef.KMAS:  # the type, for the test (the window is keys.py's)
                msg = P.unseal_decode(data, self.suite, lambda m, s: kmas, lambda m, k: P.ReplayWindow())
                self.types.append(msg.type.name)
        self.eof = True

    def send(self, t: C.MsgType, *controls: C.Control) -> bytes:
        self.seq += 1
        plain = C.Message(t, N.RMA, SID, self.maid, controls).encode()
        kmas = P.ProtKey(P.KeyRef.KMAS, self.client.kmas)  # type: ignore[union-attr,arg-type]
        data = P.seal(plain, kmas, self.suite, self.seq, os.urandom(16))
        self.writer.write(data)
        return data

    async def close(self) -> None:
        self.writer.close()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)

    def opens_nothing_of(self, recorded: list[bytes]) -> None:
        """A member that left keeps its keys; the bytes sent after its leave give it nothing."""
        gen, kc = self.kg_gen, dict(self.ring.keys)
        for d in recorded:
            assert self.keys.receive(d, now_ms()) == 0
        assert self.kg_gen == gen and self.ring.keys == kc


class Dma:
    def __init__(self, mecha: int, acl: dict[bytes, bytes], *, tick: float = 0.05, ks: P.ProtKey | None = None,
                 srv: dict | None = None, **core) -> None:
        self.acl, self.ks = acl, ks
        self.core = D.TreeCore(SID, DMA, acl_lookup=acl.get, mecha=G(mecha), suite=SUITE, rand=os.urandom,
                               now=asyncio.get_running_loop().time(), ks_lookup=self.ksl, **core)
        self.srv = D.DmaTreeServer(self.core, port=0, tick=tick, **(srv or {}))
        self.sma = KcSchedule(SID, SMA, os.urandom, 0.0, ks_suite=SUITE, urgent_gap=0.0)
        self.t = 0.0

    def ksl(self, gen: int) -> P.ProtKey | None:
        return self.ks if self.ks is not None and gen == self.ks.gen else None

    async def __aenter__(self) -> Dma:
        await self.srv.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.srv.close()

    def kc(self, rotate: bool = True) -> int:
        """The SMA's current Kc (or, with rotate, a fresh one) delivered to this DMA under Ks."""
        self.t += 10
        gens = [e.gen for e in self.sma.request_rotation(self.t) if isinstance(e, KcAnnounce)] if rotate \
            else [self.sma.current()[0]]
        self.sma.tick(self.t + 5)  # the new Kc in use after urgent_lead (B.16)
        for g in gens:
            self.srv._send(self.core.kc_from_sma(self.sma.keydeliver(DMA, g, self.ks), self.t))
        return gens[-1]


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


KS = P.ProtKey(P.KeyRef.KS, bytes(range(16)), 1)


def test_backward_leavreq_and_a_dropped_link_rekey_the_others_under_their_kmas():
    async def main():
        rmas = [HostRma(i) for i in range(4)]
        acl = {k: v for r in rmas for k, v in r.acl.items()}
        async with Dma(G.BACKWARD, acl, ks=KS) as dma:
            for r in rmas:
                assert await r.join(dma.srv.port) == "joined"
            a, b, c, d = rmas
            assert {r.client.kg.gen for r in rmas} == {1} and len(dma.core.members()) == 4
            kc1 = dma.kc(rotate=False)
            await until(lambda: all(kc1 in r.ring.keys for r in rmas), 10, "Kc 1 at every member")
            for r in rmas:  # the RELANS replayed onto the control link burns no Seq the DMA uses there (B.15)
                assert r.keys.receive(r.relans, now_ms()) == 0 and r.keys.errors[0] == 1

            # a leaves with LEAVREQ: LEAVANS, its link closed, the others re-keyed one by one
            a.send(M.LEAVREQ, C.ResultCtl(C.Result.LEAVE_NORMAL))
            await until(lambda: a.eof and all(r.kg_gen == 2 for r in (b, c, d)), 10, "re-key after a's LEAVREQ")
            assert a.types[-1] == "LEAVANS" and dma.core.left["leavreq"] == 1
            assert all(r.types[-1] == "KEYDELIVER" and r.keys.kg_prev is None for r in (b, c, d))  # under K_MAS
            mark = {id(r): len(r.got) for r in rmas}
            held = {id(r): r.kg_gen for r in rmas}

            # b just drops its link: the same
            await b.close()
            await until(lambda: all(r.kg_gen == 3 for r in (c, d)) and dma.core.left["closed"] == 1, 10,
                        "re-key after b's link dropped")
            kc2 = dma.kc()
            await until(lambda: all(kc2 in r.ring.keys for r in (c, d)), 10, "Kc 2 at the members")
            assert dma.core.members() == [c.maid, d.maid]
            assert dma.core.group.rotations["backward"] == 2
            # what the remaining members received after each leave opens nothing for the leaver
            for leaver in (a, b):
                for r in (c, d):
                    leaver.opens_nothing_of(r.got[mark[id(r)] if leaver is b else 0:])
                assert kc2 not in leaver.ring.keys and leaver.kg_gen == held[id(leaver)] < 3
            assert list(dma.core.kcreq_wanted) == [C.Result.LEAVE_NORMAL] * 2  # KCREQ reasons (B.16)
            for r in (c, d):
                await r.close()
    run(main())


def test_forward_a_joiner_gets_no_earlier_kg_or_kc():
    async def main():
        a, b = HostRma(1), HostRma(2)
        async with Dma(G.FORWARD, {**a.acl, **b.acl}, ks=KS) as dma:
            assert await a.join(dma.srv.port) == "joined"
            kc1 = dma.kc(rotate=False)
            await until(lambda: kc1 in a.ring.keys, 10, "Kc 1 at a")
            assert await b.join(dma.srv.port) == "joined"
            assert b.client.kg.gen == 2 and b.kg_gen == 2
            await until(lambda: a.kg_gen == 2, 10, "a's rollover under the old Kg")
            assert a.keys.kg_prev is not None  # a group rollover: the previous Kg kept for the grace
            assert dma.core.group.rotations["forward"] == 1
            b.opens_nothing_of(a.got)  # everything sent before (and at) its join
            assert b.ring.keys == {}
            kc2 = dma.kc()
            await until(lambda: kc2 in a.ring.keys and kc2 in b.ring.keys, 10, "Kc 2 at both")
            assert list(dma.core.kcreq_wanted) == [C.Result.ACCEPTED] * 2  # a FORWARD join asks the SMA for a fresh Kc
            await a.close()
            await b.close()
    run(main())


def test_a_rejoin_on_a_new_link_replaces_the_old_one_as_a_leave_then_a_join():
    async def main():
        a, b = HostRma(1), HostRma(2)
        async with Dma(G.BACKWARD, {**a.acl, **b.acl}) as dma:
            assert await a.join(dma.srv.port) == "joined" and await b.join(dma.srv.port) == "joined"
            again = HostRma(1)  # the same RMA (a reboot): a new link, a new K_MAS
            assert await again.join(dma.srv.port) == "joined"
            await until(lambda: a.eof and b.kg_gen == 2, 10, "old link closed, b re-keyed")
            assert again.client.kmas != a.client.kmas and again.kg_gen == 2
            assert sorted(dma.core.members()) == sorted([again.maid, b.maid]) and dma.srv.links == 2
            a.opens_nothing_of(b.got + again.got)
            await again.close()
            await b.close()
    run(main())


def test_periodic_rotation_and_heartbeats_both_ways():
    async def main():
        a, b = HostRma(1), HostRma(2)
        async with Dma(G.PERIODIC, {**a.acl, **b.acl}, kg_period=0.4, t_hb=0.25) as dma:
            assert await a.join(dma.srv.port) == "joined"
            assert await b.join(dma.srv.port) == "joined"

            async def beat():
                while not a.eof:
                    a.send(M.HB)
                    await asyncio.sleep(0.1)
            hb = asyncio.create_task(beat())
            # b sends nothing: gone after 3 T_HB, without a re-key (no BACKWARD)
            await until(lambda: b.eof and dma.core.left["heartbeat"] == 1, 10, "b dropped for missed HBs")
            await until(lambda: a.kg_gen >= 3, 10, "two PERIODIC rotations at a")
            assert dma.core.members() == [a.maid] and "HB" in a.types
            assert dma.core.group.rotations["backward"] == 0 and dma.core.group.rotations["periodic"] >= 2
            assert dma.core.errors == {}  # a's HBs all authentic and fresh
            await a.close()
            hb.cancel()
    run(main())


def test_not_in_the_acl_refused_and_a_member_leaving_the_acl_expelled_static_never_rekeys():
    async def main():
        a, b, c = HostRma(1), HostRma(2), HostRma(3)
        acl = {**a.acl, **b.acl}
        async with Dma(G.STATIC, acl) as dma:
            assert await c.join(dma.srv.port) == "refused" and c.client.fail == T.Fail.NOT_IN_ACL
            assert await a.join(dma.srv.port) == "joined"
            assert await b.join(dma.srv.port) == "joined"
            del acl[P.hashed_maid(SID, a.maid)]  # the SM's next ACL no longer has a
            await until(lambda: a.eof, 10, "a expelled")
            assert a.types[-1] == "LEAVREQ" and dma.core.left["expelled"] == 1
            assert dma.core.members() == [b.maid] and b.client.kg.gen == 1 and b.kg_gen == 1
            assert dma.core.group.rotations == {"forward": 0, "backward": 0, "periodic": 0}
            await b.close()
    run(main())


def test_a_slow_member_is_dropped_and_does_not_stall_the_others():
    async def main():
        good, slow, late = HostRma(1), HostRma(2), HostRma(3)
        async with Dma(G.STATIC, {**good.acl, **slow.acl, **late.acl}, ks=KS,
                       srv={"max_queued": 2048, "sndbuf": 4096}) as dma:
            assert await good.join(dma.srv.port) == "joined"
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
            s.connect(("127.0.0.1", dma.srv.port))
            s.setblocking(False)
            assert await slow.join(0, sock=s, listen=False) == "joined"  # then never reads
            sent = 0
            while dma.srv.slow_dropped == 0 and sent < 3000:  # Kc deliveries to both (~100 B each)
                gen = dma.kc()
                sent += 1
                if sent % 10 == 0:
                    await asyncio.sleep(0)
            assert dma.srv.slow_dropped == 1 and dma.core.left["slow"] == 1, sent
            assert slow.maid not in dma.core.members() and good.maid in dma.core.members()
            assert await late.join(dma.srv.port) == "joined"  # the DMA still serves joins
            await until(lambda: gen in good.ring.keys, 10, "every Kc at the good member")
            assert good.keys.errors == [0] * 19  # in order, none lost or refused
            for r in (good, late, slow):
                await r.close()
    run(main())


def test_the_tree_of_a_real_dma_agent_uses_its_live_acl_policy_and_ks(pki, tmp_path):  # noqa: F811
    async def main():
        async with Session(pki[0], tmp_path, n_dmas=1) as s:
            agent = s.dmas()[0]
            rma = await s.rma("rma0", 101)
            entry = P.hashed_maid(SID, rma.cfg.maid) + rma.hashed_ktls
            await until(lambda: entry in agent.acl, 10, "the RMA in the DMA's ACL")
            core = D.from_agent(agent, os.urandom, asyncio.get_running_loop().time())
            mecha, suite = D.policy_of(agent.policy)
            assert core.group.mecha == mecha == G.PERIODIC  # test_net's SMA proposes PERIODIC
            srv = D.DmaTreeServer(core, port=0, tick=0.05)
            await srv.start()
            try:
                r = HostRma(0, suite, maid=rma.cfg.maid, w=rma.hashed_ktls, dma=agent.cfg.maid)
                stranger = HostRma(7, suite)
                assert await r.join(srv.port) == "joined" and r.kg_gen == 1
                assert await stranger.join(srv.port) == "refused"
                sma = KcSchedule(SID, SMA, os.urandom, 0.0, ks_suite=suite)
                srv._send(core.kc_from_sma(sma.keydeliver(agent.cfg.maid, 1, agent.ks), 1.0))  # under the live Ks
                await until(lambda: 1 in r.ring.keys, 10, "Kc under Kg at the RMA")
                assert r.ring.keys[1] == sma.current()[1]
                await r.close()
                await until(lambda: core.members() == [], 10, "the member gone with its link")
            finally:
                await srv.close()
    run(main())
