"""Hostile input against the RMCP-2 key engines (profile B.16; docs/security.md, RMCP-2
keys). No network adapter exists for them yet, so the attacks are thrown at the engines
themselves, with honest deliveries interleaved: the board key engine (keys.py under CPython
via mpshim), the DMA's Kc relay and the SMA's KCREQ handling. Bounded in count; asserts on
counts and outcomes, never on speed (timings are printed for docs/security.md)."""
from __future__ import annotations

import os
import random
import statistics
import time
import tracemalloc

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2.contentkey import MAX_DMAS, KcSchedule, kcreq

from ..rmcp2.test_groupkey import DMA, SID, Tree

FLOOD = 20000
GOOD = 50


def _mutants(samples: list[bytes], rng: random.Random, n: int):
    for i in range(n):
        s = bytearray(rng.choice(samples))
        kind = i % 5
        if kind == 0:
            yield os.urandom(rng.randrange(0, 1200))
        elif kind == 1:
            yield bytes(s)  # replay of something already delivered
        elif kind == 2:
            s[rng.randrange(len(s))] ^= 1 << rng.randrange(8)
            yield bytes(s)
        elif kind == 3:
            yield bytes(s[:rng.randrange(len(s))])
        else:
            yield bytes(s) + os.urandom(rng.randrange(1, 64))


def test_board_engine_under_a_delivery_flood():
    t = Tree(C.GkMecha.PERIODIC | C.GkMecha.BACKWARD | C.GkMecha.FORWARD)
    victim, _other = t.start(2)
    t.run(t.now + 150)
    rng = random.Random(13)
    samples = list(t.wire)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    lat, installed, crashes = [], 0, 0
    flood = _mutants(samples, rng, FLOOD)
    per = FLOOD // GOOD
    for k in range(GOOD):
        for _ in range(per):
            try:
                victim.receive(next(flood), int(t.now * 1000))
            except Exception:  # noqa: BLE001 - counting crashes is the point
                crashes += 1
        # an honest urgent Kc rotation reaches the group through the DMA
        want = t.sma.request_rotation(t.now)
        t.now += 1.0
        t0 = time.perf_counter()
        t.kc_to_dma(want)
        lat.append(time.perf_counter() - t0)
        installed += victim.kc_gen == t.sma.nxt
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    errs = sum(victim.errors)
    p99 = statistics.quantiles(lat, n=100)[98]
    print(f"\nboard engine: {FLOOD} hostile, crashes {crashes}, good {installed}/{GOOD}, "
          f"errors counted {errs}, good p99 {p99 * 1e3:.2f} ms, heap +{grown} B")
    assert crashes == 0 and installed == GOOD
    assert errs >= FLOOD * 0.99  # every hostile input counted (a few random ones may pass as stale/other)
    assert grown < 64 * 1024  # no per-message retention (tracemalloc noise aside)


def test_relay_and_sma_under_forged_and_flooded_requests():
    t = Tree(C.GkMecha.BACKWARD)
    t.start(2)
    rng = random.Random(7)
    good_ks = t.sma.keydeliver(DMA, t.sma.cur, t.ks)
    relay_errs0 = sum(t.relay.errors.values())
    crashes = 0
    for data in _mutants([good_ks], rng, FLOOD // 2):
        try:
            t.relay.receive(data, t.ksl, t.now)
        except Exception:  # noqa: BLE001
            crashes += 1
    relay_errs = sum(t.relay.errors.values()) - relay_errs0
    # KCREQ: forged (no Ks), from many invented MAIDs, and an authentic DMA flooding
    s = KcSchedule(SID, DMA, os.urandom, 0.0, min_interval=60, max_interval=120, lead=10, urgent_lead=2)
    wrong = P.ProtKey(P.KeyRef.KS, os.urandom(16), 1)
    forged = [kcreq(SID, DMA, C.Result.LEAVE_NORMAL, wrong, P.BOOTSTRAP, i + 1, os.urandom(16))
              for i in range(2000)]
    now = 0.0
    for q in forged:
        s.receive_kcreq(q, t.ksl, now)
    assert s.urgent == 0 and s.errors.get("MAC") == 2000 and not s._windows
    seq = 0
    for i in range(FLOOD // 2):
        now = i * 0.001  # 10000 authentic requests over 10 s
        seq += 1
        maid = C.make_maid("10.9.%d.%d" % (i // 250 % 250, i % 250 + 1), 1, 1 + i % 60000)
        s.receive_kcreq(kcreq(SID, maid, C.Result.LEAVE_NORMAL, t.ks, P.BOOTSTRAP, seq, bytes(16)), t.ksl, now)
        s.tick(now)
    print(f"\nrelay: {FLOOD // 2} hostile, crashes {crashes}, counted {relay_errs}; SMA: 2000 forged KCREQ "
          f"-> 0 rotations; {FLOOD // 2} authentic KCREQ in 10 s -> {s.urgent} rotations, "
          f"{len(s._windows)} windows kept (bound {MAX_DMAS})")
    assert crashes == 0 and relay_errs >= FLOOD // 2 * 0.99
    assert 1 <= s.urgent <= 11  # at most one urgent rotation per second
    assert len(s._windows) <= MAX_DMAS
