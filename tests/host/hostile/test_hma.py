"""Hostile datagrams against the HMA election of a multicast-enabled area (profile B.18;
docs/security.md "secure RMCP-2 HMA election"), over multicast on lo with free ports: two
DMAs' HmaServices elect an HMA, then a peer without Ks throws garbage, forged HANNOUNCE /
HLEAVE (a made-up Ks, the lowest MAID, the HMA's MAID), tampered and replayed copies of the
real messages, truncated and oversized datagrams. The HMA must stay, the follower must keep
hearing it, nothing about the attacker may be stored. Bounded in count and time."""
from __future__ import annotations

import asyncio
import gc
import os
import socket
import statistics
import tracemalloc

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import hma as H
from tessera.rmcp2 import protect as P

from ..rmcp2.test_hma import _free_udp_port

SID = 0x5E55_2000_0000_0001
SUITE = P.Suite(C.EnDecId.AES_CTR_128, C.AuthId.HMAC_SHA1)
GROUP = "239.13.0.8"
T_HANN = 0.2
ROUNDS, PER_KIND = 20, 5  # 20 rounds x 6 kinds x 5 = 600 datagrams
MAIDS = [C.make_maid("127.0.0.1", 26032, 0x0D01 + i) for i in range(2)]


def test_hma_election_under_hostile_datagrams():
    async def main():
        loop = asyncio.get_running_loop()
        ks = P.ProtKey(P.KeyRef.KS, os.urandom(16), 1)
        fake = P.ProtKey(P.KeyRef.KS, os.urandom(16), 1)
        port = _free_udp_port()
        events: list[tuple[int, H.Event]] = []
        svcs = [H.HmaService(H.HmaEngine(SID, m, suite=SUITE, ks_current=lambda: ks,
                                         ks_lookup=lambda g: ks if g == 1 else None, rand=os.urandom,
                                         t_hann=T_HANN), (GROUP, port), "127.0.0.1",
                             lambda ev, i=i: events.append((i, ev))) for i, m in enumerate(MAIDS)]
        tap = H.group_socket((GROUP, port), "127.0.0.1")  # records the real datagrams for replays
        attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        attacker.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        try:
            for s in svcs:
                await s.start()
            hma, fol = (e.engine for e in svcs)
            t0 = loop.time()
            while not (hma.is_hma and fol.state == "follower"):
                assert loop.time() - t0 < 5, "no HMA elected"
                await asyncio.sleep(0.02)
            await asyncio.sleep(2 * T_HANN)
            real: list[bytes] = []
            while True:
                try:
                    real.append(tap.recv(2048))
                except BlockingIOError:
                    break
            assert real
            forger = H.HmaEngine(SID, C.make_maid("0.0.0.1", 1, 1), suite=SUITE, ks_current=lambda: fake,
                                 ks_lookup=lambda g: None, rand=os.urandom)
            as_hma = H.HmaEngine(SID, MAIDS[0], suite=SUITE, ks_current=lambda: fake, ks_lookup=lambda g: None,
                                 rand=os.urandom)
            errors0 = sum(fol.errors.values()) + sum(hma.errors.values())
            gc.collect()
            tracemalloc.start()
            mem0 = tracemalloc.get_traced_memory()[0]
            ages, thrown = [], 0
            for r in range(ROUNDS):
                batch = []
                for _ in range(PER_KIND):
                    batch.append(os.urandom(1 + os.urandom(1)[0] * 4))  # garbage
                    batch.append(forger._become(0).sends[0])  # forged HANNOUNCE, lowest MAID
                    batch.append(as_hma._send(C.MsgType.HLEAVE).sends[0])  # forged HLEAVE in the HMA's name
                    t = bytearray(real[r % len(real)])
                    t[-1 - os.urandom(1)[0] % 16] ^= 0x40
                    batch.append(bytes(t))  # tampered real message
                    batch.append(real[r % len(real)])  # replay
                    batch.append(real[0][:25] if r % 2 else real[0] + bytes(1500))  # truncated / oversized
                for d in batch:
                    attacker.sendto(d, (GROUP, port))
                    thrown += 1
                await asyncio.sleep(0.02)
                ages.append(loop.time() - fol._last_hann)
            await asyncio.sleep(3 * T_HANN)
            gc.collect()
            mem1 = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            refused = sum(fol.errors.values()) + sum(hma.errors.values()) - errors0
            p99 = statistics.quantiles(ages, n=100)[98]
            print(f"\nhma hostile: thrown {thrown} to 2 DMAs, refused {refused}, HMA kept {hma.is_hma}, "
                  f"follower HANNOUNCE age p99 {p99 * 1000:.0f} ms (T_HANN {T_HANN * 1000:.0f} ms), "
                  f"memory {mem0} -> {mem1} B, errors {dict(fol.errors)}")
            assert hma.is_hma and fol.state == "follower" and fol.hma == MAIDS[0]
            assert events == [(0, H.Event.BECOME_HMA)] and hma.takeovers == 1 and fol.takeovers == 0
            assert set(fol.peers) == {MAIDS[0]} and set(hma.peers) == {MAIDS[1]}  # nothing of the attacker
            assert len(fol.windows) <= 2 and len(hma.windows) <= 2
            assert refused >= 0.95 * 2 * thrown  # refused by both DMAs (a loaded loopback may drop a few)
            assert p99 < 3 * T_HANN  # the follower never came near a take-over
            assert mem1 - mem0 < 256 * 1024
        finally:
            attacker.close()
            tap.close()
            for s in svcs:
                await s.close()
    asyncio.run(asyncio.wait_for(main(), 60))
