"""Content end to end on loopback (issue 13, contract items 1-3): a real SM (TLS admission,
SQLite store), the SMA and two DMA agents through the public API, the SMA's tree service with
its content source, both DMAs linked upstream (PPROBREQ + CONTENT_ADDR under Ks), and host
RMAs that join each DMA (tree.JoinClient), keep their control link (the board's keys.py under
CPython, feeding a content.KcRing), announce HB + CONTENT_ADDR under K_MAS and decode content on
a UDP socket and a TCP listener (content.Decoder). GK_MECHA BACKWARD + FORWARD.

Checked: an object and a stream arrive byte-exact at every RMA of both DMAs; BACKWARD: after an
RMA leaves, content sent once the urgent Kc is in use does not open with the keys it holds
(KEY); FORWARD: a joiner cannot open content sent before its join (KEY)."""
from __future__ import annotations

import asyncio
import os
import socket

import pytest

from tessera.api import AsyncMaAgent, AsyncSessionManager, SmSettings, make_sm_pki
from tessera.rmcp2 import codec as C
from tessera.rmcp2.content import Decoder, FrameReader, KcRing, Kind
from tessera.rmcp2.dmatree import policy_of

from .test_dmatree import HostRma
from .test_hma import _free_udp_port
from .test_net import until

SID = 0x5E55_2000_0000_0001  # test_dmatree's HostRma speaks this session
SIDB = SID.to_bytes(8, "big")
KEY = bytes(range(32))
M = C.MsgType
NAMES = ["sm", "sma", "dma1", "dma2", "rma0", "rma1", "rma2", "rma3"]
KC_TIMING = dict(min_interval=1000.0, max_interval=1000.0, lead=2.0, urgent_lead=0.3, urgent_gap=0.0)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    make_sm_pki(d, NAMES)
    return d


class ContentRma(HostRma):
    """HostRma (join + control link with keys.py) with a KcRing and content on UDP and TCP."""

    def __init__(self, i: int, suite, maid: bytes, w: bytes, dma: bytes, content: tuple[int, int]) -> None:
        super().__init__(i, suite, maid, w, dma)
        self.ring = KcRing(*content)
        from tessera_fw.rmcp2 import keys as K
        self.keys = K.Keys(SIDB, self.maid, self.ring, int(suite.enc), int(suite.auth))
        self.dec = Decoder(SIDB, self.ring)
        self.raw: list[bytes] = []  # every content packet received, for the secrecy checks
        self.stream: list[bytes] = []
        self.objects: list[bytes] = []
        self._obj = bytearray()
        self.udp: socket.socket | None = None
        self.tcp_server: asyncio.AbstractServer | None = None

    async def open_content(self) -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)
        loop.add_reader(self.udp.fileno(), self._udp_ready)
        self.tcp_server = await asyncio.start_server(self._tcp, "127.0.0.1", 0)
        return self.udp.getsockname()[1], self.tcp_server.sockets[0].getsockname()[1]

    def _udp_ready(self) -> None:
        while True:
            try:
                data = self.udp.recv(2048)
            except BlockingIOError:
                return
            self._packet(data)

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = FrameReader()
        while data := await reader.read(65536):
            for f in frames.feed(data):
                self._packet(f)
        writer.close()

    def _packet(self, data: bytes) -> None:
        self.raw.append(data)
        try:
            ev = self.dec.receive(data)
        except C.Rmcp2Error:
            return  # counted in dec.errors
        if ev.kind == Kind.STREAM:
            self.stream.append(ev.data)
        elif ev.kind == Kind.OBJ_BEGIN:
            self._obj = bytearray()
        elif ev.kind == Kind.OBJ_DATA:
            self._obj += ev.data
        else:
            self.objects.append(bytes(self._obj))

    async def link(self, port: int) -> None:
        assert await self.join(port) == "joined"
        ports = await self.open_content()
        self.send(M.HB, C.ContentAddr(*ports))

    def opens_none_of(self, packets: list[bytes]) -> None:
        """Every packet fails at the keys this RMA holds: Gen not held (KEY)."""
        dec = Decoder(SIDB, self.ring)
        for p in packets:
            with pytest.raises(C.Rmcp2Error) as ei:
                dec.receive(p)
            assert ei.value.code == C.ErrorCode.KEY

    async def shut(self) -> None:
        if self.udp is not None:
            asyncio.get_running_loop().remove_reader(self.udp.fileno())
            self.udp.close()
        if self.tcp_server is not None:
            self.tcp_server.close()
        await self.close()


async def admit_rmas(ep, pki, kw: dict, under: list) -> tuple[list[AsyncMaAgent], list[ContentRma]]:
    """RMA agents rma0.. admitted at the SM (one per entry of `under`, the DMA agent it will
    join), in every DMA's ACL, and a ContentRma for each with the agreed suite and content pair."""
    policy = under[0]._runner.agent.policy
    suite = policy_of(policy)[1]
    content = (int(policy.get(C.ConEnDecAlg).value), int(policy.get(C.AuthAlg).value))
    agents = [AsyncMaAgent("rma", ep, SID, pki, f"rma{i}", instance=10 + i, **kw) for i in range(len(under))]
    await asyncio.gather(*(a.start() for a in agents))
    for d in {id(d): d for d in under}.values():
        await d.wait_for(lambda s: all(a.acl_entry in s.acl for a in agents), 20, "the RMAs in the ACL")
    return agents, [ContentRma(i, suite, a.maid, a.acl_entry.hashed_ktls, d.maid, content)
                    for i, (a, d) in enumerate(zip(agents, under))]


def test_object_and_stream_reach_every_rma_of_two_dmas_with_backward_and_forward_secrecy(pki, tmp_path):
    async def main():
        async with AsyncSessionManager.open(tmp_path / "sm.sqlite", SmSettings(SID, agree_time=0.3), key=KEY) as sm:
            ep = await sm.serve(pki, tick=0.05)
            kw = dict(tick=0.05, retry=0.1)
            async with AsyncMaAgent("sma", ep, SID, pki, gk_mecha=int(C.GkMecha.BACKWARD_FORWARD), content_alg=2,
                                    **kw) as sma, \
                    AsyncMaAgent("dma", ep, SID, pki, "dma1", instance=2, hrs_refresh=0.2, **kw) as dma1, \
                    AsyncMaAgent("dma", ep, SID, pki, "dma2", instance=3, hrs_refresh=0.2, **kw) as dma2:
                await asyncio.gather(sma.start(), dma1.start(), dma2.start())
                src = await sma.start_source(port=0, tick=0.05, **KC_TIMING)
                up = {"tick": 0.05, "backoff": (0.05, 0.5)}
                # a multicast-enabled area on lo (B.18), ports picked free: the API's mcast wiring
                mc = {"mcast": f"239.13.0.9:{_free_udp_port()}", "mcast_if": "127.0.0.1",
                      "hma": {"port": _free_udp_port(), "t_hann": 0.2}}
                ports = [await d.start_tree(port=0, tick=0.05, sma=f"127.0.0.1:{src.port}", upstream=up, **mc)
                         for d in (dma1, dma2)]
                st = await src.wait_for_dmas(2, 20)
                assert set(st.dmas) == {dma1.maid, dma2.maid}

                agents, rmas = await admit_rmas(ep, pki, kw, [dma1, dma1, dma2, dma2])
                a, b, c, d = rmas
                await a.link(ports[0])
                await b.link(ports[0])
                await c.link(ports[1])
                for dma, n in ((dma1, 2), (dma2, 1)):
                    await until(lambda: len(dma.tree_status().subscribers) == n, 10, "content addresses at the DMA")

                async def settled(members: list[ContentRma]) -> int:
                    """The urgent Kc asked by the last join/leave is in use, and every member holds it."""
                    await until(lambda: src.status().kc_next == 0 and all(
                        src.status().kc_gen in m.ring.gens() for m in members), 10, "the newest Kc in use everywhere")
                    return src.status().kc_gen

                async def send(members: list[ContentRma], tag: bytes) -> tuple[bytes, list[bytes]]:
                    obj = os.urandom(3000) + tag
                    payloads = [tag + bytes([k]) * 200 for k in range(5)]
                    n0 = {id(m): (len(m.objects), len(m.stream)) for m in members}
                    assert await src.send_object(obj) == 2
                    for p in payloads:
                        assert src.stream(p) == 2
                    await until(lambda: all(len(m.objects) > n0[id(m)][0] and len(m.stream) >= n0[id(m)][1] + 5
                                            for m in members), 10, "object and stream at every member")
                    for m in members:
                        assert m.objects[-1] == obj and m.stream[-5:] == payloads  # byte-exact
                    return obj, payloads

                g1 = await settled([a, b, c])
                await send([a, b, c], b"one")
                assert all(m.dec.errors == {} for m in (a, b, c))

                # BACKWARD: b leaves dma1; dma1 re-keys Kg and asks the SMA (KCREQ) for an urgent Kc
                b.send(M.LEAVREQ, C.ResultCtl(C.Result.LEAVE_NORMAL))
                await until(lambda: b.eof and src.status().urgent_rotations >= 1 and src.status().kc_gen != g1, 10,
                            "an urgent Kc in use after b left")
                g2 = await settled([a, c])
                mark = len(a.raw)
                await send([a, c], b"two")
                after = a.raw[mark:]
                assert after and all(p[23] == g2 for p in after)  # Gen byte (B.17): all under the new Kc
                assert g2 not in b.ring.gens()
                b.opens_none_of(after)
                assert dma1.tree_status().left["leavreq"] == 1 and dma1.tree_status().subscribers == (a.maid,)

                # FORWARD: d joins dma2; what c received before the join does not open for d
                before = list(c.raw)
                await d.link(ports[1])
                await until(lambda: len(dma2.tree_status().subscribers) == 2, 10, "d's content address")
                g3 = await settled([a, c, d])
                assert g3 != g2
                d.opens_none_of(before)
                await send([a, c, d], b"three")
                assert d.objects[-1].endswith(b"three") and d.dec.errors == {}
                assert dma1.tree_status().upstream == dma2.tree_status().upstream == "bound"
                hmas = sorted((dma1.tree_status().hma_state, dma2.tree_status().hma_state))
                assert hmas == ["follower", "hma"] and dma1.tree_status().is_hma != dma2.tree_status().is_hma
                for m in (a, c, d, b):
                    await m.shut()
                for x in agents:
                    await x.close()
    asyncio.run(asyncio.wait_for(main(), 60))
