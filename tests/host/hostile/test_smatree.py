"""Hostile peers against the SMA's tree service over loopback (docs/security.md, "secure RMCP-2
SMA tree service and upstream links"): garbage, replayed and forged PPROBREQs trying to steal an
honest DMA's binding, links that stay silent, and a DMA holding Ks that floods KCREQ and junk
on its own bound link — all at once, while an honest DMA (DmaService with its upstream link)
stays bound and takes Kc and content, and a second honest DMA binds again and again. Bounded in
count and time."""
from __future__ import annotations

import asyncio
import gc
import os
import statistics
import time
import tracemalloc

import pytest

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import dmatree as D
from tessera.rmcp2 import protect as P
from tessera.rmcp2 import smatree as S
from tessera.rmcp2 import upstream as U
from tessera.rmcp2.server import read_message

from ..rmcp2.test_dmatree import DMA, SID, SUITE, G
from ..rmcp2.test_net import until
from ..rmcp2.test_sma_upstream import DMA2, KS, ksl, sma_core

GARBAGE, REPLAYED, FORGED, SILENT, KCREQS, JUNK, REBINDS = 200, 40, 40, 60, 300, 200, 8
MAX_UNBOUND = 32
N, M = C.NodeType, C.MsgType
BAD = C.make_maid("127.0.0.9", 26032, 0x0BAD)


async def _on_new_link(port: int, msgs: list[bytes], linger: float = 0.3) -> None:
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        for m in msgs:
            w.write(m)
        await w.drain()
        await asyncio.wait_for(r.read(4096), linger)
        w.close()
    except (asyncio.TimeoutError, ConnectionError, OSError):
        pass


def _garbage() -> bytes:
    n = 20 + os.urandom(1)[0] * 4
    body = bytearray(os.urandom(n))
    body[0], body[2:4] = 0x45, n.to_bytes(2, "big")  # a plausible header: Ver 4, Length right
    return bytes(body)


@pytest.mark.slow
def test_sma_tree_port_under_attack():
    async def main():
        loop = asyncio.get_running_loop()
        sma = S.SmaTreeServer(sma_core(loop.time(), urgent_lead=0.2, lead=0.5, min_interval=1000.0,
                                       max_interval=1000.0), port=0, tick=0.05, idle=1.0, max_unbound=MAX_UNBOUND)
        sma.core.kc.urgent_gap = 0.5  # at most two urgent rotations a second, whatever is asked
        await sma.start()
        port = sma.port
        tree = D.TreeCore(SID, DMA, acl_lookup={}.get, mecha=G.BACKWARD, suite=SUITE, rand=os.urandom,
                          now=loop.time(), ks_lookup=ksl, ks_current=lambda: KS)
        honest = D.DmaService(tree, port=0, tick=0.05, sma=("127.0.0.1", port), upstream_kw={"tick": 0.05})
        await honest.start()
        try:
            await until(lambda: honest.upstream.state == "bound", 10, "honest bind")
            tracemalloc.start()
            gc.collect()
            mem0 = tracemalloc.get_traced_memory()[0]
            probe = honest.upstream.core  # record one of its PPROBREQs to replay
            recorded = U.seal_ks(C.Message(M.PPROBREQ, N.DMA, SID, DMA, (C.ContentAddr(1, 2),)), KS, SUITE,
                                 probe.seq, os.urandom)
            forged = [P.seal(C.Message(M.PPROBREQ, N.DMA, SID, DMA, (C.ContentAddr(6, 6),)).encode(),
                             P.ProtKey(P.KeyRef.KS, os.urandom(16), 1), SUITE, P.SEQ_MAX - i, os.urandom(16))
                      for i in range(FORGED)]
            # a DMA holding Ks (B.13: every DMA does) binds, then floods its own link
            bad_seq = U.KsSeq(U.seq_base(time.time()))
            r_bad, w_bad = await asyncio.open_connection("127.0.0.1", port)
            w_bad.write(U.seal_ks(C.Message(M.PPROBREQ, N.DMA, SID, BAD, (C.ContentAddr(9, 9),)), KS, SUITE, bad_seq,
                                  os.urandom))
            assert (await read_message(r_bad, 5, 2048)) is not None
            kc_before = tree.relay.held()

            async def flood_own_link():
                for i in range(max(KCREQS, JUNK)):
                    if i < KCREQS:
                        w_bad.write(U.seal_ks(C.Message(M.KCREQ, N.DMA, SID, BAD,
                                                        (C.ResultCtl(C.Result.LEAVE_NORMAL),)), KS, SUITE, bad_seq,
                                              os.urandom))
                    if i < JUNK:
                        w_bad.write(_garbage() if i % 2 else bytes(recorded))  # junk and replays on its own link
                    if i % 20 == 0:
                        await w_bad.drain()
                        await asyncio.sleep(0.01)

            async def strangers():
                jobs = [_on_new_link(port, [_garbage() for _ in range(5)]) for _ in range(GARBAGE // 5)]
                jobs += [_on_new_link(port, [recorded]) for _ in range(REPLAYED)]
                jobs += [_on_new_link(port, [f]) for f in forged]
                for k in range(0, len(jobs), 16):  # 16 links at a time: each reaches the parser
                    await asyncio.gather(*jobs[k:k + 16])
                # then more silent links than the SMA holds unbound: the rest are refused at once
                await asyncio.gather(*(_on_new_link(port, [], linger=1.5) for _ in range(SILENT)))

            binds: list[float] = []

            async def rebinds():  # a second honest DMA binding on a fresh link, again and again
                core = U.UpstreamCore(D.TreeCore(SID, DMA2, acl_lookup={}.get, mecha=G.BACKWARD, suite=SUITE,
                                                 rand=os.urandom, now=0.0, ks_lookup=ksl, ks_current=lambda: KS),
                                      SUITE, lambda: KS, ksl, (7, 7), os.urandom, U.KsSeq(U.seq_base(time.time())))
                for _ in range(REBINDS):
                    t0 = time.monotonic()
                    while True:
                        try:
                            r, w = await asyncio.open_connection("127.0.0.1", port)
                        except OSError:
                            await asyncio.sleep(0.05)
                            continue
                        for d in core.connected(loop.time()):
                            w.write(d)
                        while core.state == "probing" and (d := await read_message(r, 3, 2048)) is not None:
                            core.receive(d, loop.time())
                        w.close()
                        if core.state == "bound":
                            break
                        await asyncio.sleep(0.05)  # the link was refused while silent ones held the slots
                    binds.append(time.monotonic() - t0)
                    await asyncio.sleep(0.3)  # spread over the whole attack, the silent-link wave too

            async def content():  # the source goes on: the honest DMA's relay takes every stream packet
                for _ in range(50):
                    sma.stream(os.urandom(200))
                    await asyncio.sleep(0.02)

            t_attack = time.monotonic()
            await asyncio.wait_for(asyncio.gather(flood_own_link(), strangers(), rebinds(), content()), 30)
            attack_s = time.monotonic() - t_attack
            await until(lambda: honest.relay.stats["udp_in"] >= 50, 10, "every stream packet at the honest DMA")
            await until(lambda: len(tree.relay.held()) >= 2 and tree.relay.held() != kc_before, 10,
                        "an urgent Kc at the honest DMA")

            c = sma.core
            assert honest.upstream.state == "bound" and honest.upstream.core.binds == 1
            t = {x.maid: x for x in c.targets()}
            assert t[DMA] == S.DmaTarget(DMA, "127.0.0.1", honest.relay.udp_port, honest.relay.tcp_port)
            assert c.gone["replaced"] == 0 and len(binds) == REBINDS  # nobody took a binding over
            assert c.errors["REPLAY"] >= REPLAYED and c.errors["MAC"] >= FORGED
            # urgent rotations are bounded by the gap, not by the 300 KCREQs asked
            assert c.kc.urgent <= attack_s / 0.5 + 2
            assert len(c.windows) <= 2 * c.max_dmas and sma.refused_conns > 0
            gc.collect()
            mem1 = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            print(f"\nattack {attack_s:.2f} s; binds during it p50/max {statistics.median(binds) * 1e3:.0f}/"
                  f"{max(binds) * 1e3:.0f} ms ({len(binds)}); refused links {sma.refused_conns}; urgent Kc "
                  f"{c.kc.urgent}; errors {dict(c.errors)}; honest DMA relay udp_in {honest.relay.stats['udp_in']}; "
                  f"traced heap {(mem1 - mem0) / 1e6:+.2f} MB")
            w_bad.close()
        finally:
            await honest.close()
            await sma.close()
    asyncio.run(asyncio.wait_for(main(), 60))
