"""Hostile input on a child DMA's control link (docs/security.md, "secure RMCP-2 tree of DMAs";
profile B.15 "Child DMA"), sans-IO and bounded: garbage, forged (a made-up Ks), tampered,
replayed, truncated and oversized messages, and messages under the real Ks in another DMA's
name, thrown at the parent's side (TreeCore) and at the child's side (ChildCore); then more
children than the parent's table holds."""
from __future__ import annotations

import gc
import os
import random
import statistics
import time
import tracemalloc

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2 import tree as T
from tessera.rmcp2.chain import ChildCore
from tessera.rmcp2.dmatree import TreeCore
from tessera.rmcp2.relay import Subscriber

from ..rmcp2.test_content_chain import CMA, KS, PMA, SID, SUITE, _ks, _pump

N, M = C.NodeType, C.MsgType
GARBAGE, FORGED, TAMPERED, REPLAYED, TRUNCATED, OVERSIZED, OTHER = 200, 100, 100, 100, 50, 50, 50
FAKE_KS = P.ProtKey(P.KeyRef.KS, b"\x99" * 16, KS.gen)
OTHER_DMA = C.make_maid("127.0.0.7", 26032, 7)


def _pair(now: float = 0.0) -> tuple[TreeCore, ChildCore]:
    parent = TreeCore(SID, PMA, acl_lookup=lambda h: None, mecha=C.GkMecha.STATIC, suite=SUITE, rand=os.urandom,
                      now=now, t_hb=1.0, ks_lookup=_ks, ks_current=lambda: KS)
    child = ChildCore(SID, CMA, PMA, SUITE, lambda: KS, _ks, (40000, 40001), os.urandom, t_hb=1.0)
    parent.opened("c", now, "127.0.0.9")
    _pump(parent, child, child.connected(now), now)
    assert child.state == "bound" and parent.children() == [CMA]
    return parent, child


def _seal(ks: P.ProtKey, maid: bytes, seq: int, *controls: C.Control) -> bytes:
    return P.seal(C.Message(M.HB, N.DMA, SID, maid, controls).encode(), ks, SUITE, seq, os.urandom(16))


def _attacks(real: list[bytes], sender: bytes, rng: random.Random) -> list[bytes]:
    """The hostile messages against one side; `real` are authentic messages it already took."""
    out = [rng.randbytes(rng.randint(1, 1100)) for _ in range(GARBAGE)]
    out += [_seal(FAKE_KS, sender, 1000 + i, C.ContentAddr(1, 1)) for i in range(FORGED)]
    for i in range(TAMPERED):
        b = bytearray(real[i % len(real)])
        b[rng.randrange(C.HEADER_LEN, len(b))] ^= 1 << rng.randrange(8)
        out.append(bytes(b))
    out += [real[i % len(real)] for i in range(REPLAYED)]
    out += [real[0][:rng.randrange(1, len(real[0]))] for _ in range(TRUNCATED)]
    out += [real[0] + rng.randbytes(1500) for _ in range(OVERSIZED)]
    # a holder of Ks speaking for another DMA on this link (its own fresh window, Seq far ahead)
    out += [_seal(KS, OTHER_DMA, 2000 + i, C.ContentAddr(2, 2)) for i in range(OTHER)]
    rng.shuffle(out)
    return out


def _throw(feed, attacks: list[bytes]) -> tuple[float, int]:
    """Each attack fed once; returns the p99 handling time (ms) and traced bytes grown."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    times = []
    for data in attacks:
        t0 = time.perf_counter()
        feed(data)
        times.append((time.perf_counter() - t0) * 1000)
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return statistics.quantiles(times, n=100)[98], grown


def test_the_parents_side_of_a_child_link_refuses_everything_but_its_child():
    parent, child = _pair()
    sub = Subscriber(CMA, ("127.0.0.9", 40000), ("127.0.0.9", 40001))
    real = [child._hb()[0] for _ in range(3)]  # its HBs (+ CONTENT_ADDR), as its ticks send them
    for r in real:
        assert parent.receive("c", r, 3.0) == []
    attacks = _attacks(real, CMA, random.Random(13))
    p99, grown = _throw(lambda d: parent.receive("c", d, 3.5), attacks)
    print(f"\nparent: {len(attacks)} thrown, refused {dict(parent.errors)}, p99 {p99:.3f} ms, memory +{grown} B")
    assert sum(parent.errors.values()) == len(attacks)  # every one refused and counted
    assert parent.subscribers() == [sub] and parent.children() == [CMA]  # no address moved, no child added
    assert parent._links["c"].last_rx == 3.0  # nothing forged kept it alive
    assert len(parent.join._ks_windows) <= 4 * T.MAX_CHILDREN and grown < 64 * 1024
    # the child goes on: its next HB is taken, and its silence still ends it
    assert parent.receive("c", child._hb()[0], 4.0) == [] and parent._links["c"].last_rx == 4.0
    assert ("c", None) in parent.tick(7.1) and parent.subscribers() == []


def test_the_childs_side_refuses_everything_but_its_parent():
    parent, child = _pair()
    real = [d for _ in range(3) for _c, d in parent._to_child("c", M.HB)]  # the parent's HBs, as its ticks send them
    for r in real:
        child.receive(r, 3.0)
    assert child.last_rx == 3.0 and not child.errors
    attacks = _attacks(real, PMA, random.Random(31))
    p99, grown = _throw(lambda d: child.receive(d, 3.5), attacks)
    print(f"\nchild: {len(attacks)} thrown, refused {dict(child.errors)}, p99 {p99:.3f} ms, memory +{grown} B")
    assert sum(child.errors.values()) == len(attacks)
    assert child.state == "bound" and child.last_rx == 3.0 and len(child.windows) <= 4 and grown < 64 * 1024
    assert child.tick(6.0) == [] and child.lost  # forged messages did not hide the parent's silence


def test_more_children_than_the_table_holds_are_refused(monkeypatch):
    monkeypatch.setattr(T, "MAX_CHILDREN", 2)
    parent = TreeCore(SID, PMA, acl_lookup=lambda h: None, mecha=C.GkMecha.STATIC, suite=SUITE, rand=os.urandom,
                      now=0.0, ks_lookup=_ks, ks_current=lambda: KS)
    kids = [ChildCore(SID, C.make_maid("127.0.1.%d" % i, 26032, i), PMA, SUITE, lambda: KS, _ks, (4000 + i, 0),
                      os.urandom) for i in range(1, 4)]
    for i, k in enumerate(kids):
        parent.opened(i, 0.0, "127.0.0.9")
        msgs = k.connected(0.0)
        for _ in range(6):
            outs = [o for m in msgs for o in parent.receive(i, m, 0.0)]
            msgs = [u for _c, d in outs if d is not None for u in k.receive(d, 0.0)[0]]
    assert [k.state for k in kids] == ["bound", "bound", "refused"]
    assert kids[2].lost and not kids[0].lost  # the refused child ends its link (and re-dials later)
    assert len(parent.children()) == 2 and parent.join.errors["BUSY"] == 1 and len(parent.subscribers()) == 2
