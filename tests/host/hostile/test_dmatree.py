"""Hostile peers against the DMA's tree service and its members' control links over loopback
(docs/security.md, "secure RMCP-2 DMA tree service"): forged LEAVREQs for other members from
non-member links, tampered / replayed / wrong-key / garbage messages on a member's own link,
an oversized frame, members that never read while keys flow, and a flood of links that never
join — all at once, while honest members stay, leave and join. Bounded in count and time."""
from __future__ import annotations

import asyncio
import gc
import os
import socket
import statistics
import time
import tracemalloc

import pytest
from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P

from ..rmcp2.test_dmatree import KS, SID, SUITE, Dma, G, HostRma, M, N, until

HONEST, FORGED, TAMPERED, REPLAYED, GARBAGE, SLOW, IDLE = 6, 60, 120, 60, 40, 4, 40
MAX_UNJOINED = 32


def _forged_leavreq(victim: bytes) -> bytes:
    """A LEAVREQ naming a member, sealed under a key the forger made up."""
    plain = C.Message(M.LEAVREQ, N.RMA, SID, victim, (C.ResultCtl(C.Result.LEAVE_NORMAL),)).encode()
    return P.seal(plain, P.ProtKey(P.KeyRef.KMAS, os.urandom(16)), SUITE, 1, os.urandom(16))


def _tamper(data: bytes) -> bytes:
    b = bytearray(data)
    b[C.HEADER_LEN + P.SEC_LEN + os.urandom(1)[0] % (len(b) - C.HEADER_LEN - P.SEC_LEN)] ^= 1 + os.urandom(1)[0] % 255
    return bytes(b)


async def _send_on_new_link(port: int, msgs: list[bytes]) -> None:
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        for m in msgs:
            w.write(m)
        await w.drain()
        await asyncio.wait_for(r.read(4096), 0.5)
        w.close()
    except (asyncio.TimeoutError, ConnectionError, OSError):
        pass


@pytest.mark.slow
def test_control_links_under_attack():
    async def main():
        honest = [HostRma(i) for i in range(1, HONEST + 1)]
        bad = HostRma(50)  # a member that sends junk on its own link
        slow = [HostRma(60 + i) for i in range(SLOW)]
        late = [HostRma(80 + i) for i in range(3)]
        acl = {k: v for r in honest + [bad] + slow + late for k, v in r.acl.items()}
        async with Dma(G.BACKWARD | G.FORWARD, acl, ks=KS,
                       srv={"max_queued": 4096, "sndbuf": 4096, "max_unjoined": MAX_UNJOINED, "idle": 3.0}) as dma:
            port = dma.srv.port
            tracemalloc.start()
            gc.collect()
            mem0 = tracemalloc.get_traced_memory()[0]
            calm = []
            for r in honest + [bad]:
                t0 = time.monotonic()
                assert await r.join(port) == "joined"
                calm.append(time.monotonic() - t0)
            for r in slow:  # never read again after the join
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
                s.connect(("127.0.0.1", port))
                s.setblocking(False)
                assert await r.join(0, sock=s, listen=False) == "joined"
            recorded = bad.send(M.HB)  # bad's own authentic HB, to be replayed on its link

            async def junk_on_own_link():
                for i in range(max(TAMPERED, REPLAYED, GARBAGE)):
                    if i < TAMPERED:
                        bad.seq += 1
                        bad.writer.write(_tamper(P.seal(C.Message(M.HB, N.RMA, SID, bad.maid, ()).encode(),
                                                        P.ProtKey(P.KeyRef.KMAS, bad.client.kmas), SUITE, bad.seq,
                                                        os.urandom(16))))
                    if i < REPLAYED:
                        bad.writer.write(recorded)
                    if i < GARBAGE:
                        n = 24 + os.urandom(1)[0] % 200
                        bad.writer.write(bytes((0x43, 0x09)) + n.to_bytes(2, "big") + os.urandom(n - 4))
                    if i < 10:
                        bad.writer.write(_forged_leavreq(honest[0].maid))  # a wrong key on its own link
                    if i % 10 == 0:
                        await asyncio.sleep(0)

            async def forgers():
                victims = [r.maid for r in honest]
                await asyncio.gather(*(_send_on_new_link(port, [_forged_leavreq(victims[i % HONEST])])
                                       for i in range(FORGED)))

            idle_links = []

            async def idle_flood():
                for _ in range(IDLE):
                    try:
                        idle_links.append(await asyncio.open_connection("127.0.0.1", port))
                    except OSError:
                        pass

            async def kc_flow():
                for i in range(400):  # Kc deliveries to every member while the attack runs
                    dma.kc()
                    if i % 20 == 0:
                        await asyncio.sleep(0.01)

            async def churn():
                """Honest traffic measured during the attack: a leave (BACKWARD re-key to the
                others under K_MAS) and joins (FORWARD rollover)."""
                times = []
                for r in late:  # an honest RMA retries when the DMA has no free link for it
                    t0 = time.monotonic()
                    while await r.join(port) == "closed" and time.monotonic() - t0 < 20:
                        await asyncio.sleep(0.2)
                    assert r.client.state == "joined"
                    times.append(time.monotonic() - t0)
                gen = dma.core.group.current()[0]
                t0 = time.monotonic()
                honest[-1].send(M.LEAVREQ, C.ResultCtl(C.Result.LEAVE_NORMAL))
                await until(lambda: dma.core.group.current()[0] != gen and all(
                    r.kg_gen == dma.core.group.current()[0] for r in honest[:-1] + late), 15, "re-key after leave")
                times.append(time.monotonic() - t0)
                return times

            t_attack = time.monotonic()
            res = await asyncio.gather(junk_on_own_link(), forgers(), idle_flood(), kc_flow(), churn())
            times = res[-1]
            await until(lambda: dma.srv.slow_dropped == SLOW, 15, lambda: f"slow members dropped "
                        f"({dma.srv.slow_dropped}, left {dma.core.left}, errors {dma.core.errors})")
            attack_s = time.monotonic() - t_attack
            members = set(dma.core.members())
            assert members == {r.maid for r in honest[:-1] + [bad] + late}  # no forged leave, no slow one
            assert dma.core.left == {"leavreq": 1, "slow": SLOW}
            assert dma.srv.refused_conns >= IDLE - MAX_UNJOINED
            errs = dict(dma.core.errors)
            assert errs.get("MAC", 0) >= TAMPERED and errs.get("KEY", 0) >= 10  # flipped bits; another MAID
            assert errs.get("REPLAY", 0) >= REPLAYED
            kc = dma.kc()  # the fresh Kc a FORWARD join asks for (KCREQ): late joiners hold no earlier one
            for r in honest[:-1] + late:  # every honest member has the last Kg and Kc and refused nothing
                await until(lambda: kc in r.ring.keys, 10, lambda: f"Kc {kc} at {r in late}: {list(r.ring.keys)} {r.keys.errors} relay {dma.core.relay.errors}")
                assert sum(r.keys.errors[1:]) == 0, f"late {r in late}: {r.keys.errors}"  # errors[0]: HBs (not keys)
            for _, w in idle_links:
                w.close()
            for r in honest + [bad] + late + slow:
                await r.close()
            await until(lambda: dma.srv.links == 0, 10, "every link closed")
            core = dma.core  # nothing of anyone left behind
            assert (core.members(), core._links, core.join.pending, len(core.group)) == ([], {}, 0, 0)
            for r in honest + [bad] + late + slow:
                r.got.clear()  # the test's own recordings are not the DMA's memory
            gc.collect()
            mem1 = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            print(f"\ncalm joins p50/max {statistics.median(calm) * 1000:.0f}/{max(calm) * 1000:.0f} ms; "
                  f"attack {attack_s:.2f} s; honest joins during it {['%.0f ms' % (t * 1000) for t in times[:-1]]}; "
                  f"BACKWARD re-key to {len(honest) - 1 + len(late)} members {times[-1] * 1000:.0f} ms; "
                  f"control-link errors {errs}; join errors {dict(dma.core.join.errors)}; "
                  f"refused links {dma.srv.refused_conns}; slow dropped {dma.srv.slow_dropped}; "
                  f"traced heap before/after {mem0 / 1e6:.2f}/{mem1 / 1e6:.2f} MB; p50 join "
                  f"{statistics.median(times[:-1]) * 1000:.0f} ms")
    asyncio.run(asyncio.wait_for(main(), 90))
