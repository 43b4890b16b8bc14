"""HMA election and take-over (profile B.18), the sans-IO engine: several HmaEngines on a
simulated group (every message to every other DMA, optionally lost), table-driven cases and a
hypothesis run over start times, losses and a killed HMA."""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import hma as H
from tessera.rmcp2 import protect as P
from tessera.rmcp2.upstream import KsSeq

SID = 0x0123456789ABCDEF
SUITE = P.Suite(C.EnDecId.AES_CTR_128, C.AuthId.HMAC_SHA1)
KS = P.ProtKey(P.KeyRef.KS, bytes(range(16)), 1)
T = 1.0
N, M = C.NodeType, C.MsgType


def maid(i: int) -> bytes:
    return C.make_maid("10.0.0.%d" % (i + 1), 26032, 1)


def engine(i: int, ks: P.ProtKey = KS, **kw) -> H.HmaEngine:
    return H.HmaEngine(SID, maid(i), suite=SUITE, ks_current=lambda: ks,
                       ks_lookup=lambda g: ks if g == ks.gen else None, rand=os.urandom, t_hann=T, **kw)


class Net:
    """Engines on one group; `drop(src, dst)` says whether a datagram is lost."""

    def __init__(self, n: int, drop=lambda s, d: False) -> None:
        self.e = {i: engine(i) for i in range(n)}
        self.alive = set(self.e)
        self.now = 0.0
        self.drop = drop
        self.events: list[tuple[float, int, H.Event]] = []
        self.wire: list[tuple[int, bytes]] = []

    def apply(self, src: int, step: H.Step) -> None:
        self.events += [(self.now, src, ev) for ev in step.events]
        todo = [(src, d) for d in step.sends]
        while todo:
            s, data = todo.pop(0)
            self.wire.append((s, data))
            for dst in sorted(self.alive):
                if dst != s and not self.drop(s, dst):
                    out = self.e[dst].receive(data, self.now)
                    self.events += [(self.now, dst, ev) for ev in out.events]
                    todo += [(dst, d) for d in out.sends]

    def start(self, i: int) -> None:
        self.apply(i, self.e[i].start(self.now))

    def run(self, until: float, dt: float = T / 4) -> None:
        while self.now < until:
            self.now = round(self.now + dt, 6)
            for i in sorted(self.alive):
                self.apply(i, self.e[i].tick(self.now))

    def kill(self, i: int) -> None:
        self.alive.discard(i)

    def leave(self, i: int) -> None:
        self.alive.discard(i)
        self.apply(i, self.e[i].stop(self.now))

    def hmas(self) -> list[int]:
        return [i for i in sorted(self.alive) if self.e[i].is_hma]


def test_a_lone_dma_becomes_hma_after_its_solicitation():
    net = Net(1)
    net.start(0)
    net.run(1.0)
    assert net.hmas() == []
    net.run(2.0)
    assert net.hmas() == [0] and net.events == [(1.5, 0, H.Event.BECOME_HMA)]


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 1, 0], [1, 2, 0]])
def test_dmas_starting_together_elect_exactly_one_the_lowest_maid(order):
    net = Net(3)
    for i in order:
        net.start(i)
    net.run(6.0)
    assert net.hmas() == [0]
    assert all(net.e[i].hma == maid(0) and net.e[i].state == "follower" for i in (1, 2))
    assert [ev for ev in net.events if ev[2] == H.Event.STOP_HMA] == []


def test_a_dma_that_missed_an_earlier_solicitation_still_defers_to_the_lower_maid():
    net = Net(2)
    net.alive = {0}
    net.start(0)  # nobody hears it
    net.now = 0.25
    net.alive = {0, 1}
    net.start(1)  # 0 answers with HSOLICIT: 1 learns of it
    assert maid(0) in net.e[1].peers
    net.run(5.0)
    assert net.hmas() == [0] and [ev for _, _, ev in net.events] == [H.Event.BECOME_HMA]


def test_a_late_dma_follows_the_existing_hma_even_with_a_lower_maid():
    net = Net(3)
    net.alive = {1, 2}
    net.start(1)
    net.start(2)
    net.run(5.0)
    assert net.hmas() == [1]
    net.alive.add(0)
    net.start(0)  # the HMA answers its HSOLICIT at once
    assert net.e[0].state == "follower" and net.e[0].hma == maid(1)
    net.run(12.0)
    assert net.hmas() == [1]
    assert maid(0) in net.e[2].candidates and maid(2) in net.e[0].candidates  # presences listed


def _steady(n: int) -> Net:
    net = Net(n)
    for i in range(n):
        net.start(i)
    net.run(10.0)
    assert net.hmas() == [0]
    assert net.e[1].candidates == [maid(i) for i in range(1, n)]
    return net


def test_hleave_hands_over_to_the_first_candidate_at_once():
    net = _steady(3)
    t0 = net.now
    net.leave(0)
    assert net.hmas() == [1]  # in the same instant, no tick needed
    assert (t0, 0, H.Event.STOP_HMA) in net.events and (t0, 1, H.Event.BECOME_HMA) in net.events
    net.run(t0 + 10)
    assert net.hmas() == [1] and net.e[2].hma == maid(1)
    assert net.e[1].candidates == [maid(2)]


def test_a_killed_hma_is_replaced_after_three_missed_hannounces():
    net = _steady(3)
    net.kill(0)
    last = net.e[1]._last_hann  # the last HANNOUNCE heard
    net.run(last + 2.9 * T)
    assert net.hmas() == []  # not before 3 T_HANN without HANNOUNCE
    net.run(last + 4 * T)
    assert net.hmas() == [1] and net.e[2].hma == maid(1)
    took = [t for t, i, ev in net.events if i == 1 and ev == H.Event.BECOME_HMA]
    assert len(took) == 1 and 3 * T < took[0] - last <= 3.5 * T


def test_a_dead_first_candidate_passes_to_the_second_one_rank_t_hann_later():
    net = _steady(4)
    t0 = net.now
    net.kill(1)  # the first candidate dies first, silently...
    net.leave(0)  # ...then the HMA leaves, listing it first
    assert net.hmas() == []
    net.run(t0 + 0.75 * T)
    assert net.hmas() == []
    net.run(t0 + 1.25 * T)
    assert net.hmas() == [2] and net.e[3].hma == maid(2)


def test_two_hmas_meeting_keep_the_lower_maid():
    cut = [True]
    net = Net(2, drop=lambda s, d: cut[0])  # a partition: each side elects itself
    net.start(1)
    net.start(0)
    net.run(4.0)
    assert net.hmas() == [0, 1]
    cut[0] = False
    net.run(6.0)
    assert net.hmas() == [0] and net.e[1].hma == maid(0)
    assert [(i, ev) for _, i, ev in net.events if ev == H.Event.STOP_HMA] == [(1, H.Event.STOP_HMA)]


def test_forged_tampered_replayed_and_foreign_messages_change_nothing():
    net = _steady(2)
    victim = net.e[1]
    before = (victim.state, victim.hma, dict(victim.peers), len(victim.windows))
    other_ks = P.ProtKey(P.KeyRef.KS, bytes(16), 1)
    forger = engine(9, ks=other_ks)  # holds a Ks, not this session's
    forged = forger._become(net.now).sends[0]
    (src, hann), = [(s, d) for s, d in net.wire if s == 0][-1:]
    tampered = bytearray(net.e[0]._send(M.HANNOUNCE).sends[0])  # fresh, never delivered
    tampered[-1] ^= 1
    gen2 = P.ProtKey(P.KeyRef.KS, bytes(range(16)), 2)  # HLEAVE under a Ks generation the victim lacks
    wrong_gen = H.HmaEngine(SID, maid(0), suite=SUITE, ks_current=lambda: gen2, ks_lookup=lambda g: None,
                            rand=os.urandom)._send(M.HLEAVE).sends[0]
    cases = {"MAC": forged, "MAC2": bytes(tampered), "REPLAY": hann, "KEY": wrong_gen, "TRUNCATED": hann[:30],
             "OVERSIZE": hann + bytes(2000)}
    for name, data in cases.items():
        out = victim.receive(data, net.now)
        assert out.sends == [] and out.events == [], name
    assert (victim.state, victim.hma, dict(victim.peers), len(victim.windows)) == before
    assert victim.errors["MAC"] == 2 and victim.errors["REPLAY"] == 1 and victim.errors["KEY"] == 1
    assert victim.errors["TRUNCATED"] == 1 and victim.errors["OVERSIZE"] == 1
    # a message of another type under the right Ks is counted, not acted on
    other = engine(5)
    hb = H.seal_ks(C.Message(M.HB, N.DMA, SID, maid(5), ()), KS, SUITE, KsSeq(), os.urandom)
    assert victim.receive(hb, net.now).sends == [] and victim.errors["unexpected"] == 1
    assert maid(5) not in victim.peers and other.state == "idle"


def test_the_peer_table_and_windows_are_bounded():
    e = engine(0, max_peers=8)
    e.start(0.0)
    for i in range(1, 40):
        e.receive(engine(i)._send(M.HSOLICIT).sends[0], 0.1)
    assert len(e.peers) == 8 and len(e.windows) <= 8
    assert list(e.peers) == [maid(i) for i in range(32, 40)]  # the least recently heard went


def test_hannounce_candidates_codec():
    cands = [C.Candidate(maid(i)) for i in range(8)]
    m = C.Message(M.HANNOUNCE, N.DMA, SID, maid(0), tuple(cands))
    assert C.decode(m.encode()) == m
    raw = C.Message(M.HANNOUNCE, N.DMA, SID, maid(0), tuple(cands[:1])).encode()
    assert raw[20:] == bytes((0xC7, 10)) + maid(0)
    too_many = raw[:2] + (20 + 90).to_bytes(2, "big") + raw[4:20] + (bytes((0xC7, 10)) + maid(1)) * 9
    with pytest.raises(C.Rmcp2Error) as e:
        C.decode(too_many)
    assert e.value.code == C.ErrorCode.DUPLICATE_CONTROL


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 5), starts=st.lists(st.floats(0, 5), min_size=5, max_size=5),
       loss=st.integers(0, 40), seed=st.integers(0, 2**32 - 1), kill=st.sampled_from(["none", "kill", "leave"]))
def test_after_losses_and_a_lost_hma_exactly_one_hma_remains(n, starts, loss, seed, kill):
    import random
    rng = random.Random(seed)
    lossy = [True]
    net = Net(n, drop=lambda s, d: lossy[0] and rng.randrange(100) < loss)
    pending = sorted((starts[i], i) for i in range(n))
    net.alive = set()
    for t, i in pending:
        net.run(t)
        net.alive.add(i)
        net.start(i)
    net.run(12.0)
    lossy[0] = False
    net.run(24.0)
    assert len(net.hmas()) == 1
    h = net.hmas()[0]
    assert all(net.e[i].hma == maid(h) for i in net.alive)
    if kill != "none":
        getattr(net, kill)(h)
        t0 = net.now
        net.run(t0 + 4 * T + 8 * T)  # 3 missed, then at most a rank per candidate or a re-election
        if net.alive:
            assert len(net.hmas()) == 1
            assert all(net.e[i].hma == maid(net.hmas()[0]) for i in net.alive)
