"""Content through a tree of DMAs (issue 13, "PMA/CMA authentication between DMAs"; profile B.15
"Child DMA"): SMA -> DMA1 (parent, linked upstream) -> DMA2 (child of DMA1) -> RMAs.

The sans-IO test drives dmatree.TreeCore (the parent) and chain.ChildCore (the child) by hand:
join under Ks, HB + CONTENT_ADDR making the child a relay subscriber, reflections and replays
refused, a silent child dropped after 3 T_HB, a DMA other than the configured parent refused.
The end-to-end test runs a real SM, the SMA's source, DMA1 and DMA2 through the public API
(start_tree(parent=...)) and host RMAs (test_content_e2e.ContentRma) under both DMAs."""
from __future__ import annotations

import asyncio
import os

from tessera.api import AsyncMaAgent, AsyncSessionManager, SmSettings
from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2.chain import ChildCore
from tessera.rmcp2.dmatree import TreeCore
from tessera.rmcp2.relay import Subscriber

from .test_content_e2e import KC_TIMING, KEY, SID, admit_rmas, pki  # noqa: F401 (pki: the fixture)
from .test_net import until

SUITE = P.Suite(C.EnDecId.AES_CTR_128, C.AuthId.HMAC_SHA1)
KS = P.ProtKey(P.KeyRef.KS, bytes(range(16)), 1)
PMA = C.make_maid("127.0.0.1", 26032, 1)
CMA = C.make_maid("127.0.0.2", 26032, 2)
M = C.MsgType


def _ks(gen: int) -> P.ProtKey | None:
    return KS if gen == KS.gen else None


def _pump(parent: TreeCore, child: ChildCore, msgs: list[bytes], now: float) -> None:
    """Child -> parent -> child until nothing is left to send (bounded)."""
    for _ in range(10):
        if not msgs:
            return
        outs = [o for m in msgs for o in parent.receive("c", m, now)]
        msgs = []
        for conn, data in outs:
            assert conn == "c" and data is not None
            msgs += child.receive(data, now)[0]
    raise AssertionError("the join did not settle")


def test_child_core_joins_a_tree_core_and_is_a_subscriber_until_silent():
    parent = TreeCore(SID, PMA, acl_lookup=lambda h: None, mecha=C.GkMecha.STATIC, suite=SUITE, rand=os.urandom,
                      now=0.0, t_hb=1.0, ks_lookup=_ks, ks_current=lambda: KS)
    seen: list[list[Subscriber]] = []
    parent.on_subscribers = seen.append
    child = ChildCore(SID, CMA, PMA, SUITE, lambda: KS, _ks, (40000, 40001), os.urandom, t_hb=1.0)
    parent.opened("c", 0.0, "127.0.0.9")
    _pump(parent, child, child.connected(0.0), 0.0)
    assert child.state == "bound" and parent.children() == [CMA] and parent.members() == []
    # its content address: the peer IP of its link (never one from a message) and its ports
    sub = Subscriber(CMA, ("127.0.0.9", 40000), ("127.0.0.9", 40001))
    assert parent.subscribers() == [sub] and seen[-1] == [sub] and parent.unjoined == 0

    # the parent's HB under Ks, MAID = the parent; a replay and a reflection are refused
    hb = [d for c, d in parent.tick(1.0) if c == "c"]
    assert len(hb) == 1 and child.receive(hb[0], 1.5) == ([], []) and child.last_rx == 1.5
    child.receive(hb[0], 1.6)
    assert child.errors["REPLAY"] == 1 and child.last_rx == 1.5
    own = child.tick(1.5)  # the child's HB (+ CONTENT_ADDR) reflected back to it
    assert len(own) == 1 and child.receive(own[0], 1.7) == ([], []) and child.errors["not from the parent"] == 1
    assert parent.receive("c", hb[0], 1.7) == [] and parent.errors["not from this child DMA"] == 1
    assert parent.receive("c", own[0], 1.8) == [] and parent.subscribers() == [sub]
    assert parent.receive("c", own[0], 1.9) == [] and parent.errors["REPLAY"] == 1

    # silent for 3 T_HB (its last authentic message at 1.8): gone, link closed, no longer a subscriber
    assert ("c", None) not in parent.tick(4.75)
    out = parent.tick(4.85)
    assert ("c", None) in out and parent.children() == [] and parent.subscribers() == [] and seen[-1] == []
    assert parent.left["child_heartbeat"] == 1 and parent.join.children() == {}
    child.tick(4.4)
    assert not child.lost and child.tick(4.6) == [] and child.lost  # the child's side: the parent silent 3 T_HB


def test_a_dma_other_than_the_configured_parent_is_refused():
    other = TreeCore(SID, C.make_maid("127.0.0.3", 26032, 3), acl_lookup=lambda h: None, mecha=C.GkMecha.STATIC,
                     suite=SUITE, rand=os.urandom, now=0.0, ks_lookup=_ks, ks_current=lambda: KS)
    child = ChildCore(SID, CMA, PMA, SUITE, lambda: KS, _ks, (40000, 40001), os.urandom)
    other.opened("c", 0.0, "127.0.0.9")
    _pump(other, child, child.connected(0.0), 0.0)
    # Annex E proved only that both hold Ks: the child checks IDs against the parent it was given
    assert child.state == "refused" and child.lost and child.errors["not the configured parent"] == 1
    assert other.subscribers() == []  # it sent no CONTENT_ADDR


def test_content_reaches_the_rmas_of_a_child_dma_through_its_parent(pki, tmp_path):  # noqa: F811
    async def main():
        async with AsyncSessionManager.open(tmp_path / "sm.sqlite", SmSettings(SID, agree_time=0.3), key=KEY) as sm:
            ep = await sm.serve(pki, tick=0.05)
            kw = dict(tick=0.05, retry=0.1)
            async with AsyncMaAgent("sma", ep, SID, pki, gk_mecha=int(C.GkMecha.STATIC), content_alg=2, **kw) as sma, \
                    AsyncMaAgent("dma", ep, SID, pki, "dma1", instance=2, hrs_refresh=0.2, **kw) as dma1, \
                    AsyncMaAgent("dma", ep, SID, pki, "dma2", instance=3, hrs_refresh=0.2, **kw) as dma2:
                await asyncio.gather(sma.start(), dma1.start(), dma2.start())
                src = await sma.start_source(port=0, tick=0.05, **KC_TIMING)
                up = {"tick": 0.05, "backoff": (0.05, 0.5)}
                p1 = await dma1.start_tree(port=0, tick=0.05, sma=f"127.0.0.1:{src.port}", upstream=up)
                p2 = await dma2.start_tree(port=0, tick=0.05, sma=f"127.0.0.1:{src.port}", upstream=up,
                                           parent=f"127.0.0.1:{p1}:{dma1.maid.hex()}", parent_link=up)
                await src.wait_for_dmas(2, 20)  # DMA2 binds too, for Kc only (CONTENT_ADDR ports 0)
                await until(lambda: dma1.tree_status().children == (dma2.maid,) and
                            dma1.tree_status().subscribers == (dma2.maid,), 10, "DMA2 a child of DMA1")
                assert dma2.tree_status().parent == "bound" and dma1.tree_status().parent == "none"

                agents, rmas = await admit_rmas(ep, pki, kw, [dma1, dma2, dma2])
                a, b, c = rmas  # a under DMA1, b and c under DMA2
                await a.link(p1)
                await b.link(p2)
                await c.link(p2)
                await until(lambda: len(dma1.tree_status().subscribers) == 2 and
                            len(dma2.tree_status().subscribers) == 2, 10, "content addresses at both DMAs")
                await until(lambda: src.status().kc_next == 0 and all(src.status().kc_gen in m.ring.gens()
                                                                       for m in rmas), 10, "the Kc in use everywhere")

                obj = os.urandom(3000) + b"chain"
                payloads = [b"s%d" % k + bytes([k]) * 300 for k in range(5)]
                assert await src.send_object(obj) == 1  # to DMA1 only
                for p in payloads:
                    assert src.stream(p) == 1
                await until(lambda: all(m.objects and len(m.stream) >= 5 for m in rmas), 10, "content everywhere")
                await asyncio.sleep(0.3)  # room for a duplicate to arrive, if one were sent
                for m in rmas:
                    assert m.objects == [obj] and m.stream == payloads and m.dec.errors == {}  # byte-exact, once
                st = src.status()
                assert st.sender["udp_sent"] == 5 and st.sender["tcp_bytes"] > 0
                r1, r2 = dma1.tree_status().relay, dma2.tree_status().relay
                assert r1["udp_in"] == 5 and r1["udp_relayed"] == 10  # to a and to DMA2
                assert r2["udp_in"] == 5 and r2["udp_relayed"] == 10  # to b and c: each packet once
                # neither relay decrypts or re-encodes: the ciphertext of a (DMA1) and c (DMA1 -> DMA2) is one
                assert sorted(a.raw) == sorted(c.raw) == sorted(b.raw)

                # the child link lost: DMA1 stops relaying to DMA2
                await dma2._tree.parent_link.close()
                await until(lambda: dma1.tree_status().children == () and
                            dma1.tree_status().subscribers == (a.maid,), 10, "DMA2 gone from DMA1")
                assert dma1.tree_status().left.get("child_closed") == 1
                n_c = len(c.raw)
                for p in payloads[:3]:
                    assert src.stream(p + b"late") == 1
                await until(lambda: len(a.stream) == 8, 10, "the later packets at a")
                await asyncio.sleep(0.3)
                r1, r2 = dma1.tree_status().relay, dma2.tree_status().relay
                assert r1["udp_in"] == 8 and r1["udp_relayed"] == 13  # only to a now
                assert r2["udp_in"] == 5 and len(c.raw) == n_c and len(b.stream) == 5
                for m in rmas:
                    await m.shut()
                for x in agents:
                    await x.close()
    asyncio.run(asyncio.wait_for(main(), 60))


def test_parent_option_is_checked_before_anything_starts():
    import subprocess
    import sys

    import pytest

    from tessera import cliargs
    from tessera.errors import TesseraError

    assert cliargs.parent_dma("127.0.0.1:26032:0102030405060708", "--parent") == \
        ("127.0.0.1", 26032, bytes.fromhex("0102030405060708"))
    for bad in ("127.0.0.1:26032", "127.0.0.1:26032:0102", "127.0.0.1:0:0102030405060708",
                "h:1:zz02030405060708", ":1:0102030405060708", ""):
        with pytest.raises(TesseraError, match="HOST:PORT"):
            cliargs.parent_dma(bad, "--parent")
    p = subprocess.run([sys.executable, "-m", "tessera", "dma", "--sm", "127.0.0.1:1", "--session-id", "1",
                        "--pki-dir", "/nonexistent", "--parent", "127.0.0.1:26032:12"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--parent wants HOST:PORT:MAIDHEX" in p.stderr, p.stderr
