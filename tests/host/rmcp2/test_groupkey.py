"""Kg per GK_MECHA and Kc schedule/re-wrap (profile B.16): the DMA's GroupKeyManager and
KcRelay, the SMA's KcSchedule on the host, and the board RMA's keys.py engine (under
CPython through mpshim) as the receivers. Every test hands *all* traffic to members that
left or have not joined yet, as an eavesdropper on the group's link would get it."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera import mpshim
from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2.contentkey import KcAnnounce, KcRelay, KcSchedule, KcSwitch, ahead, kcreq
from tessera.rmcp2.groupkey import GroupFull, GroupKeyManager

from .test_sm import SID, Rand

mpshim.install()
from tessera_fw.rmcp2 import keys as K  # noqa: E402

G = C.GkMecha
SIDB = SID.to_bytes(8, "big")
DMA = C.make_maid("10.0.0.1", 26032, 1)
SMA = C.make_maid("10.0.0.9", 26032, 9)
ERR_KEY, ERR_MAC, ERR_REPLAY, ERR_MAID = 14, 16, 17, 13


class Ring:
    """The two-method interface of p2-data's KcRing: install(gen, key16) keeps the current
    and the next Kc. Minimal stand-in for these tests only."""

    def __init__(self) -> None:
        self.keys: dict[int, bytes] = {}

    def install(self, gen: int, key: bytes) -> None:
        self.keys[gen] = key
        while len(self.keys) > 2:
            del self.keys[next(iter(self.keys))]


class Tree:
    """SMA + one DMA + board RMAs, moving bytes by hand (no sockets: engine level)."""

    def __init__(self, mecha: int, period: float = 100.0) -> None:
        self.now = 0.0
        self.rand = Rand(f"tree{mecha}")
        self.ks = P.ProtKey(P.KeyRef.KS, self.rand(16), 1)
        self.dma = GroupKeyManager(SID, DMA, G(mecha), P.BOOTSTRAP, self.rand, 0.0, period=period)
        self.relay = KcRelay(SID, DMA, self.dma)
        self.sma = KcSchedule(SID, SMA, self.rand, 0.0, min_interval=60, max_interval=120, lead=10, urgent_lead=2)
        self.boards: dict[bytes, K.Keys] = {}
        self.outside: dict[bytes, K.Keys] = {}  # left, still listening
        self.joined_at: dict[bytes, float] = {}
        self.kcreq_seq = 0
        self.wire: list[bytes] = []  # everything the DMA sent

    def ksl(self, gen: int):
        return self.ks if gen == self.ks.gen else None

    def send(self, deliveries) -> None:
        for d in deliveries:
            self.wire.append(d.data)
            targets = list(self.boards.values()) if d.maid is None else [self.boards[d.maid]] if d.maid in self.boards else []
            for b in targets + list(self.outside.values()):
                b.receive(d.data, int(self.now * 1000))

    def kc_to_dma(self, events) -> None:
        for e in events:
            if isinstance(e, KcAnnounce):
                self.send(self.relay.receive(self.sma.keydeliver(DMA, e.gen, self.ks), self.ksl, self.now))

    def ask_rotation(self, joined: bool) -> None:
        why = self.relay.rotation_wanted(joined)
        if why is not None:
            self.kcreq_seq += 1
            q = kcreq(SID, DMA, why, self.ks, P.BOOTSTRAP, self.kcreq_seq, self.rand(16))
            self.kc_to_dma(self.sma.receive_kcreq(q, self.ksl, self.now))

    def join(self, n: int) -> K.Keys:
        maid = C.make_maid("10.0.1.1", 1000 + n, n + 1)
        kmas = self.rand(16)
        self.send(self.dma.member_joined(maid, kmas, self.now))  # before RELANS (FORWARD)
        gen, kg = self.dma.current()  # what RELANS carries under K_MAS
        b = K.Keys(SIDB, maid, Ring())
        b.joined(DMA, kmas, gen, kg)
        self.boards[maid] = b
        self.send(self.relay.catch_up(maid, self.now))
        self.ask_rotation(True)
        return b

    def leave(self, b: K.Keys) -> None:
        del self.boards[b.maid]
        self.outside[b.maid] = b
        self.send(self.dma.member_left(b.maid, self.now))
        self.ask_rotation(False)

    def run(self, until: float, step: float = 1.0) -> None:
        while self.now < until:
            self.now += step
            self.send(self.dma.tick(self.now))
            self.kc_to_dma(self.sma.tick(self.now))

    def start(self, n: int) -> list[K.Keys]:
        self.kc_to_dma([KcAnnounce(1, 0.0)])  # the first Kc, made with the schedule
        bs = [self.join(i) for i in range(n)]
        self.run(self.now + 3)  # urgent rotations settle
        return bs


def test_static_never_rekeys():
    t = Tree(G.STATIC)
    a, b, c = t.start(3)
    t.leave(c)
    t.run(1000)
    assert t.dma.current()[0] == 1 and a.kg_gen() == b.kg_gen() == 1
    assert t.dma.rotations == {"forward": 0, "backward": 0, "periodic": 0}
    assert t.sma.urgent == 0  # no KCREQ either: STATIC asks for nothing
    assert t.sma.cur > 1 and a.kc_gen == b.kc_gen == t.sma.cur  # Kc rotates on its own clock regardless


def test_periodic_rotates_on_the_clock_with_grace():
    t = Tree(G.PERIODIC, period=100.0)
    a, b = t.start(2)
    t.run(99)
    assert t.dma.current()[0] == 1
    old_wire = len(t.wire)
    t.run(100)
    assert t.dma.current()[0] == 2 and a.kg_gen() == b.kg_gen() == 2
    assert len(t.wire) == old_wire + 1  # one group message for the whole group
    # a delivery sealed under Kg 1 just before the switch still opens during the grace
    assert a.kg_prev is not None and a.kg_prev.gen == 1
    t.run(100 + 31)
    a.receive(t.wire[-1], int(t.now * 1000))  # a later message drops the expired Kg 1
    assert a.kg_prev is None
    t.run(200)
    assert t.dma.current()[0] == 3 and a.kg_gen() == 3 and t.dma.rotations["periodic"] == 2


def test_backward_leaver_cannot_open_next_kg_or_kc():
    t = Tree(G.BACKWARD)
    a, b, c = t.start(3)
    kc_before = t.sma.cur
    key_before = c.kc_gen
    t.leave(c)
    # fresh Kg to a and b under their own K_MAS; c saw both messages and opened neither
    assert a.kg_gen() == b.kg_gen() == 2 and c.kg_gen() == 1
    assert c.errors[ERR_KEY] >= 2
    assert a.kg_prev is None  # no grace for the Kg the leaver holds
    # the leave triggered KCREQ: a fresh Kc, made after the leave, reaches a and b only
    assert t.sma.urgent == 1 and t.sma.nxt
    new_kc = t.sma.nxt
    assert a.ring.keys.get(new_kc) == t.sma.key(new_kc) == b.ring.keys.get(new_kc)
    assert new_kc not in c.ring.keys and c.kc_gen == key_before
    t.run(t.now + 3)
    assert t.sma.cur == new_kc != kc_before  # content from here is under a key c never had
    # and every later Kg/Kc delivery stays closed to c
    t.run(400)
    assert c.kg_gen() == 1 and c.kc_gen == key_before and a.kc_gen == t.sma.cur


def test_forward_joiner_gets_no_earlier_kg_or_kc():
    t = Tree(G.FORWARD)
    a, b = t.start(2)
    assert a.kg_gen() == b.kg_gen() == 2  # b's join already rolled Kg 1 -> 2 for a
    earlier_kg = {1, 2}
    earlier_wire = list(t.wire)
    kc_before, urgent = set(a.ring.keys), t.sma.urgent
    c = t.join(2)
    # existing members moved to the new Kg under the old one; the joiner holds only the new
    assert a.kg_gen() == b.kg_gen() == c.kg_gen() == t.dma.current()[0] == 3
    assert c.kg_prev is None and not earlier_kg & {c.kg_gen()}
    # nothing recorded before the join opens for the joiner
    errs = c.errors[ERR_KEY]
    for data in earlier_wire:
        assert c.receive(data, int(t.now * 1000)) == 0
    assert c.errors[ERR_KEY] == errs + len(earlier_wire)
    # no Kc that content before the join used: only the urgent one made after it
    assert not set(c.ring.keys) & kc_before
    assert set(c.ring.keys) == {t.sma.nxt} and t.sma.urgent == urgent + 1
    t.run(t.now + 3)
    assert a.kc_gen == b.kc_gen == c.kc_gen == t.sma.cur


def test_leave_without_backward_and_join_without_forward_do_not_rekey():
    t = Tree(G.PERIODIC)
    a, b = t.start(2)
    t.leave(b)
    c = t.join(3)
    assert t.dma.current()[0] == 1 == a.kg_gen() == c.kg_gen()
    assert set(c.ring.keys) == set(a.ring.keys)  # catch-up: current (and next) Kc
    assert t.sma.urgent == 0


@pytest.mark.parametrize("mecha", [3, 5, 6, 7])
def test_combinations(mecha):
    t = Tree(mecha, period=50.0)
    a, b, c = t.start(3)
    gen0 = t.dma.current()[0]
    t.leave(c)
    if mecha & G.BACKWARD:
        assert a.kg_gen() == gen0 + 1 and c.kg_gen() == gen0
    d = t.join(4)
    if mecha & G.FORWARD:
        assert d.kg_gen() == a.kg_gen() == t.dma.current()[0] > gen0
    t.run(t.now + 60)
    if mecha & G.PERIODIC:
        assert t.dma.rotations["periodic"] >= 1
    assert a.kg_gen() == b.kg_gen() == d.kg_gen() == t.dma.current()[0]
    assert a.kc_gen == d.kc_gen == t.sma.cur or a.kc_gen == d.kc_gen == t.sma.nxt
    if mecha & G.BACKWARD:
        assert c.kg_gen() == gen0 and c.kc_gen not in (t.sma.cur, t.sma.nxt)


def test_replayed_stale_tampered_and_misaddressed_deliveries():
    t = Tree(G.PERIODIC | G.BACKWARD, period=100.0)
    a, b = t.start(2)
    t.run(100)
    grp = t.wire[-1]  # Kg 2 under Kg 1
    assert a.kg_gen() == 2
    assert a.receive(grp, int(t.now * 1000)) == 0 and a.errors[ERR_REPLAY] == 1  # replay: window
    # a re-sealed old delivery (new Seq) naming a generation that is not ahead: stale
    stale = P.seal(C.Message(C.MsgType.KEYDELIVER, C.NodeType.DMA, SID, DMA, (C.KeyInfo(
        C.KeyType.KG, C.KeyData(2, C.KeyMode.FRESH, 0, bytes(16)).encode()),)).encode(),
        t.dma.current_key(), P.BOOTSTRAP, 999, bytes(16))
    assert a.receive(stale, int(t.now * 1000)) == 0 and a.errors[ERR_REPLAY] == 2
    bad = bytearray(P.seal(stale[:20], t.dma.current_key(), P.BOOTSTRAP, 1000, bytes(16)))
    bad[-1] ^= 1  # tampered: MAC (the Seq is new, so the window does not answer first)
    assert a.receive(bytes(bad), int(t.now * 1000)) == 0 and a.errors[ERR_MAC] == 1
    # a K_MAS delivery meant for b does not open at a (its MAID and key are b's)
    t.leave(b)
    assert a.kg_gen() == 3
    other = K.Keys(SIDB, C.make_maid("10.0.9.9", 1, 1), Ring())
    other.joined(DMA, bytes(16), 3, bytes(16))
    assert other.receive(t.wire[-1], 0) == 0 and other.errors[ERR_KEY] + other.errors[ERR_MAC] == 1
    assert a.kg_gen() == 3 and a.errors[ERR_MAC] == 1  # nothing else changed at a


def test_dma_relay_refuses_bad_kc_deliveries():
    t = Tree(G.STATIC)
    t.start(1)
    r = t.relay
    good = t.sma.keydeliver(DMA, t.sma.cur, t.ks)
    assert r.receive(good, t.ksl, 5.0) == []  # the same key again: nothing to re-send
    assert r.receive(good, t.ksl, 5.0) == [] and r.errors == {"REPLAY": 1}
    other = t.sma.keydeliver(C.make_maid("10.0.0.2", 26032, 2), t.sma.cur, t.ks)
    assert r.receive(other, t.ksl, 5.0) == [] and r.errors["MAID"] == 1
    wrong_ks = P.ProtKey(P.KeyRef.KS, bytes(16), 1)
    assert r.receive(t.sma.keydeliver(DMA, t.sma.cur, wrong_ks), t.ksl, 5.0) == [] and r.errors["MAC"] == 1
    assert r.receive(b"\x45\x24\x00", t.ksl, 5.0) == [] and r.errors["TRUNCATED"] == 1


def test_kc_schedule_bounds_lead_and_coalescing():
    rand = Rand("kc")
    s = KcSchedule(SID, SMA, rand, 0.0, min_interval=60, max_interval=120, lead=10, urgent_lead=2, urgent_gap=1)
    switches, announces, now = [], [], 0.0
    while now < 5000:
        now += 0.5
        for e in s.tick(now):
            (switches if isinstance(e, KcSwitch) else announces).append((now, e))
    gaps = [b[0] - a[0] for a, b in zip(switches, switches[1:])]
    assert len(switches) > 30 and all(60 - 0.5 <= g <= 120 + 0.5 for g in gaps)
    assert len(set(round(g) for g in gaps)) > 5  # random, not one fixed period
    for (ta, a), (ts, w) in zip(announces, switches):
        assert a.gen == w.gen and 10 - 0.5 <= ts - ta <= 10 + 0.5  # announced `lead` ahead
    # urgent: a fresh next at once, replacing one announced earlier; bursts coalesce
    while not s.nxt:
        now += 0.5
        s.tick(now)
    skipped = s.nxt
    out = s.request_rotation(now + 0.1)
    assert [type(e) for e in out] == [KcAnnounce] and s.nxt == P.next_gen(skipped) and s.key(skipped) is None
    assert s.request_rotation(now + 0.1) == []  # already served by a key made at that time
    assert s.request_rotation(now + 0.2) == []  # within urgent_gap: pending
    events = s.tick(now + 1.2)
    assert [type(e) for e in events][:1] == [KcAnnounce] and s.urgent == 2
    with pytest.raises(ValueError):
        KcSchedule(SID, SMA, rand, 0.0, min_interval=10, max_interval=5)


def test_group_table_is_bounded():
    g = GroupKeyManager(SID, DMA, G.BACKWARD, P.BOOTSTRAP, Rand("b"), 0.0, max_members=3)
    for i in range(3):
        g.member_joined(bytes([1, 0, 0, 0, 0, 0, 0, i + 1]), bytes(16), 0.0)
    with pytest.raises(GroupFull):
        g.member_joined(b"\x02" * 8, bytes(16), 0.0)
    assert len(g.member_joined(bytes([1, 0, 0, 0, 0, 0, 0, 1]), bytes(16), 0.0)) == 2  # re-join: as leave + join
    assert len(g) == 3


def test_the_sm_never_sees_a_kc():
    """The SM engine takes no part in Kc: it is sent nowhere near it, and a KEYDELIVER(Kc)
    pushed at it under Ks is refused without a trace of the key in its state."""
    from .test_keys_acl import session

    sm, net = session(n_dmas=1, rmas=1)
    sma = net.agents["sma"]
    sched = KcSchedule(SID, sma.cfg.maid, Rand("kc-sm"), 0.0, ks_suite=sma._suite)
    kc = sched.current()[1]
    before = sum(sm.errors.values())
    net.to_sm("sma", [sched.keydeliver(sm.cfg.maid, 1, sma.ks)], 12.0)
    assert sum(sm.errors.values()) == before + 1 and "sma" in net.conn  # refused, counted, SMA still served
    assert kc not in _all_bytes(sm)


def _all_bytes(obj, seen=None) -> bytes:
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return b""
    seen.add(id(obj))
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj) + b"|"
    if isinstance(obj, dict):
        return b"".join(_all_bytes(k, seen) + _all_bytes(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return b"".join(_all_bytes(v, seen) for v in obj)
    out = b""
    for name in getattr(obj, "__slots__", ()):
        out += _all_bytes(getattr(obj, name, None), seen)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        out += _all_bytes(vars(obj), seen)
    return out


def test_ahead_is_circular():
    assert ahead(2, 1) == 1 and ahead(1, 255) == 1 and ahead(5, 250) == 10
    assert ahead(1, 1) == 0 and ahead(1, 2) == 0 and ahead(200, 1) == 0
    assert all(K.ahead(n, o) == ahead(n, o) for n in range(1, 256) for o in range(1, 256, 7))


_TREE = Tree(G.PERIODIC | G.BACKWARD | G.FORWARD)
_BOARDS = _TREE.start(2)
_TREE.run(_TREE.now + 150)
_SAMPLES = list(_TREE.wire[-6:])


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(_SAMPLES), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
       st.integers(0, 120), st.binary(max_size=40))
def test_mutated_deliveries_never_crash_or_install(sample, flips, cut, junk):
    """Tampered / truncated / extended deliveries: counted errors, never an exception or a key."""
    b = _BOARDS[0]
    data = bytearray(sample)
    for pos, val in flips:
        if pos < len(data):
            data[pos] = val
    data = bytes(data[:len(data) - cut] if cut < len(data) else data) + junk
    kg, kc = b.kg_gen(), dict(b.ring.keys)
    got = b.receive(data, int(_TREE.now * 1000))
    if data != sample:
        assert got == 0 and b.kg_gen() == kg and b.ring.keys == kc
    r = _TREE.relay
    assert r.receive(data, _TREE.ksl, _TREE.now) == [] or data == sample


@pytest.mark.parametrize("who", ["dma", "sma"])
def test_sm_refuses_a_gk_name_other_than_kdc_at_policy_time(who):
    """B.16: GK_NAME other than KDC (here GKMP and LKH only) is refused when the SECAGREQ
    arrives: LEAVREQ RESULT POLICY_REFUSED under the MA's K_TLS, the MA leaves, Ks is replaced."""
    from .test_sm import MA, admit_server, closes, new_sm, sends, sma_propose

    sm = new_sm()
    sma, dma = MA(C.NodeType.SMA, 1), MA(C.NodeType.DMA, 2)
    admit_server(sm, sma, "sma")
    admit_server(sm, dma, "dma0")
    ks_gen = sm.ks.gen
    only = [C.GkMechCapab(C.GkName.GKMP, 1), C.GkMechCapab(C.GkName.LKH, 2)]
    if who == "dma":
        ma, conn, ctls = dma, ("ks", "dma0"), only
    else:
        ma, conn, ctls = sma, ("ks", "sma"), [sma_propose()[0], *only]
    out = sm.receive(conn, ma.seal(ma.msg(C.MsgType.SECAGREQ, *ctls), ma.ks), 2.0)
    bye = [s for s in sends(out) if s.conn == conn]
    assert len(bye) == 1 and closes(out)
    leav = ma.open(bye[0].data)  # under its own K_TLS
    assert leav.type == C.MsgType.LEAVREQ and leav.get(C.ResultCtl).value == C.Result.POLICY_REFUSED
    assert ma.maid not in sm.members and sm.ks.gen == ks_gen + 1
    assert any("GK_NAME GKMP (0x02), LKH (0x05)" in k for k in sm.errors)
    # an MA that lists KDC among others is kept and the policy names KDC
    sm = new_sm()
    sma, ok = MA(C.NodeType.SMA, 1), MA(C.NodeType.DMA, 3)
    admit_server(sm, sma, "sma")
    admit_server(sm, ok, "dma1")
    caps = [C.GkMechCapab(C.GkName.LKH, 1), C.GkMechCapab(C.GkName.KDC, 2)]
    assert sm.receive(("ks", "dma1"), ok.seal(ok.msg(C.MsgType.SECAGREQ, *caps), ok.ks), 2.5) == []
    sm.receive(("ks", "sma"), sma.seal(sma.msg(C.MsgType.SECAGREQ, *sma_propose()), sma.ks), 2.5)
    sm.tick(10.0)
    assert ok.maid in sm.members and sm.policy.gk_name == C.GkName.KDC
