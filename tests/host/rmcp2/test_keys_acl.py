"""Ks schedule and ACL service of the SM engine, driven by the sans-IO agents (agent.py)
over an in-memory network (profile B.6, B.13, B.14; 10.1.2.1, 10.1.5, figure 93)."""
from __future__ import annotations

import hashlib

import pytest

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2 import sm as S
from tessera.rmcp2.agent import Agent, AgentConfig

from .test_sm import SID, Rand, new_sm

N, M = C.NodeType, C.MsgType
PROPOSE = C.SmaPropose(C.GpAttribute.OPEN, C.GkMecha.PERIODIC, C.EnDecId.AES_CTR_128)


class Net:
    """Carries the engines' actions: agent bytes to the SM, SM Send/Close to agents."""

    def __init__(self, sm: S.SessionManager) -> None:
        self.sm = sm
        self.agents: dict[str, Agent] = {}
        self.conn: dict[str, object] = {}  # agent name -> current SM-side connection id
        self.n = 0

    def add(self, name: str, nt: C.NodeType, i: int, **kw) -> Agent:
        maid = C.make_maid("127.0.0.1", 41000 + i, i)
        cfg = AgentConfig(nt, SID, maid, b"cert-%d" % i, propose=PROPOSE if nt == N.SMA else None, **kw)
        a = self.agents[name] = Agent(cfg, rand=Rand(name))
        return a

    def _new_conn(self, name: str, tls: bool, now: float):
        self.n += 1
        c = self.conn[name] = (name, self.n)
        assert self.sm.connect(c, now, cert_der=self.agents[name].cfg.cert_der if tls else None, tls=tls) == []
        return c

    def to_sm(self, name: str, datas: list[bytes], now: float) -> None:
        for d in datas:
            self.deliver(self.sm.receive(self.conn[name], d, now), now)

    def deliver(self, actions: list, now: float) -> None:
        for a in actions:
            name = a.conn[0]
            if isinstance(a, S.Send) and self.conn.get(name) == a.conn:
                self.to_sm(name, self.agents[name].receive(a.data, now), now)
        for a in actions:
            name = a.conn[0]
            if isinstance(a, S.Close) and self.conn.get(name) == a.conn:
                del self.conn[name]
                ag = self.agents[name]
                if ag.cfg.nt != N.RMA and ag.state == "subscribed":  # TLS closed after Ks: plain link
                    self._new_conn(name, False, now)
                    self.to_sm(name, ag.plain_up(now), now)

    def admit(self, name: str, now: float) -> Agent:
        self._new_conn(name, True, now)
        self.to_sm(name, self.agents[name].start(now), now)
        return self.agents[name]

    def reconnect_plain(self, name: str, now: float) -> None:
        self.sm.disconnect(self.conn.pop(name, None))
        self._new_conn(name, False, now)
        self.to_sm(name, self.agents[name].plain_up(now), now)

    def tick(self, now: float) -> None:
        self.deliver(self.sm.tick(now), now)
        for name, a in self.agents.items():
            if name in self.conn:
                self.to_sm(name, a.tick(now), now)


def session(n_dmas: int = 2, rmas: int = 1, **kw):
    sm = new_sm(**kw)
    net = Net(sm)
    net.add("sma", N.SMA, 1)
    for i in range(n_dmas):
        net.add(f"dma{i}", N.DMA, 10 + i)
    for name in ["sma"] + [f"dma{i}" for i in range(n_dmas)]:
        net.admit(name, 1.0)
    net.tick(10.0)  # Security Agree.time: SECLIST, SECAGANS
    sm.open_session()
    for i in range(rmas):
        net.add(f"rma{i}", N.RMA, 100 + i)
        net.admit(f"rma{i}", 11.0)
    return sm, net


def dmas(net):
    return [a for n, a in net.agents.items() if n.startswith("dma")]


def test_agents_hold_the_bootstrap_ks_and_agree():
    sm, net = session()
    for a in [net.agents["sma"], *dmas(net)]:
        assert a.state == "ready" and a.ks_gen == 1 and a.ks._raw == sm._ks_raw
    assert net.agents["rma0"].state == "ready" and net.agents["rma0"].ks is None  # RMAs never get Ks
    assert all(m.policy == "ok" for m in sm.members.values())


def test_hash_step_reaches_every_dma_and_the_old_generation_expires():
    sm, net = session(ks_period=100)
    g1 = sm._ks_raw
    net.tick(50.0)
    assert sm.ks.gen == 1
    net.tick(101.0)  # hash step: HB under generation 2 to each SMA/DMA link
    assert sm.ks.gen == 2 and sm.ks_mode == C.KeyMode.HASHED
    assert sm._ks_raw == P.ks_next(g1, SID, 2)
    for a in [net.agents["sma"], *dmas(net)]:
        assert a.ks_gen == 2 and a.ks._raw == sm._ks_raw
    # a message under generation 1 is accepted during the grace, refused after it
    d = dmas(net)[0]
    old = P.ProtKey(P.KeyRef.KS, g1, 1)
    m1 = d._seal(d._msg(M.HB), old)
    assert sm.receive(net.conn["dma0"], m1, 120.0) == [] and sm.errors["KEY"] == 0
    m2 = d._seal(d._msg(M.HB), old)
    assert sm.receive(net.conn["dma0"], m2, 130.0) == [] and sm.errors["KEY"] == 0  # grace: 30 s
    m3 = d._seal(d._msg(M.HB), old)
    sm.receive(net.conn["dma0"], m3, 132.0)
    assert sm.errors["KEY"] == 1
    net.tick(140.0)
    assert sm.ks_prev is None and all((P.KeyRef.KS, 1) not in m.windows for m in sm.members.values())


def test_fresh_ks_when_a_dma_is_truncated_reaches_the_others_not_it():
    sm, net = session(n_dmas=3)
    before = sm._ks_raw
    gone = dmas(net)[2]
    actions = sm.truncate(gone.cfg.maid, 30.0)
    kds = [a.data for a in actions if isinstance(a, S.Send) and a.conn[0] != "dma2"]
    assert len(kds) == 3  # SMA and the two remaining DMAs
    old = P.ProtKey(P.KeyRef.KS, before, 1)
    for d in kds:  # under each member's own K_TLS: the old Ks (which the truncated DMA holds) opens none
        assert P.peek(d)[1].ref == P.KeyRef.KTLS
        with pytest.raises(C.Rmcp2Error):
            P.unseal(d, P.BOOTSTRAP, lambda maid, sec: old, lambda maid, k: P.ReplayWindow())
    net.deliver(actions, 30.0)
    assert gone.state == "expelled" and gone.ks is None and gone.cfg.maid not in sm.members
    assert sm.ks.gen == 2 and sm.ks_mode == C.KeyMode.FRESH and sm._ks_raw != before
    assert sm._ks_raw != P.ks_next(before, SID, 2)  # random, not the hash of the old key
    for a in [net.agents["sma"], *dmas(net)[:2]]:
        assert a.ks_gen == 2 and a.ks._raw == sm._ks_raw and a.ks_deliveries == 2
    # the truncated DMA's key no longer opens anything, and no grace is given to it
    ghost = gone._seal(gone._msg(M.HRSREQ), P.ProtKey(P.KeyRef.KS, before, 1))
    net.sm.connect("ghost", 31.0, tls=False)
    assert isinstance(sm.receive("ghost", ghost, 31.0)[0], S.Close) and sm.errors["KEY"] == 1


def test_a_dma_leaving_abnormally_replaces_ks_and_an_offline_dma_gets_it_on_reconnect():
    sm, net = session(n_dmas=2)
    d0 = dmas(net)[0]
    sm.disconnect(net.conn.pop("dma0"))  # d0 is offline while the key changes
    late = net.add("dma9", N.DMA, 19, gk_names=frozenset())  # cannot run KDC: FAILED CONFIGURATION
    net.admit("dma9", 20.0)
    assert late.state == "failed" and late.policy_result == C.SecReturn.FAILED_CONFIGURATION
    assert late.cfg.maid not in sm.members and sm.ks.gen == 2  # it held Ks: replaced (figure 93)
    assert dmas(net)[1].ks_gen == 2 and d0.ks_gen == 1
    assert sm.members[d0.cfg.maid].ks_pending
    net.reconnect_plain("dma0", 25.0)  # HB under its K_TLS: the SM sends the current Ks
    assert d0.ks_gen == 2 and d0.ks._raw == sm._ks_raw and not sm.members[d0.cfg.maid].ks_pending


def test_acl_served_to_dmas_by_hrsreq_under_ks_and_refreshed():
    sm, net = session(n_dmas=2, rmas=2)
    assert all(d.acl_updates == 1 and d.acl == frozenset() for d in dmas(net))  # asked at 10 s, no RMA yet
    net.tick(71.0)  # HRS_REFRESH: 60 s later
    want = {P.hashed_maid(SID, net.agents[f"rma{i}"].cfg.maid) + net.agents[f"rma{i}"].hashed_ktls
            for i in range(2)}
    for d in dmas(net):
        assert d.acl == want and d.acl_updates == 2
        r = net.agents["rma0"]
        assert d.acl_allows(P.hashed_maid(SID, r.cfg.maid), r.hashed_ktls)
        assert not d.acl_allows(P.hashed_maid(SID, b"\x7f\0\0\1\0\1\0\x09"), r.hashed_ktls)
        assert not d.acl_allows(P.hashed_maid(SID, r.cfg.maid), bytes(16))  # wrong K_TLS hash
        assert d.errors["RMA not in the ACL"] == 2
    net.add("rma5", N.RMA, 105)
    net.admit("rma5", 80.0)
    net.tick(100.0)
    assert dmas(net)[0].acl_updates == 2  # HRS_REFRESH (60 s) not due yet
    net.tick(132.0)
    new = net.agents["rma5"]
    for d in dmas(net):
        assert d.acl_updates == 3 and P.hashed_maid(SID, new.cfg.maid) + new.hashed_ktls in d.acl
    # an SMA asking for the ACL is not answered; an RMA cannot ask (NT rule)
    sma = net.agents["sma"]
    with pytest.raises(ValueError):
        sma._msg(M.HRSREQ).encode()


def test_wrong_key_replayed_and_tampered_ks_messages_are_counted_and_others_served():
    sm, net = session(n_dmas=2)
    d0, d1 = dmas(net)
    c0 = net.conn["dma0"]
    # wrong key: a Ks of the right generation but not the session's
    wrong = P.ProtKey(P.KeyRef.KS, bytes(16), sm.ks.gen)
    assert sm.receive(c0, d0._seal(d0._msg(M.HRSREQ), wrong), 12.0) == [] and sm.errors["MAC"] == 1
    # replayed: the same accepted HRSREQ twice
    req = d0._seal(d0._msg(M.HRSREQ), d0.ks)
    assert len(sm.receive(c0, req, 12.0)) == 1
    assert sm.receive(c0, req, 12.0) == [] and sm.errors["REPLAY"] == 1
    # tampered: one ciphertext bit flipped
    t = bytearray(d0._seal(d0._msg(M.HRSREQ), d0.ks))
    t[40] ^= 0x10
    assert sm.receive(c0, bytes(t), 12.0) == [] and sm.errors["MAC"] == 2
    # the DMA side counts the same faults on what it receives
    m = sm.members[d0.cfg.maid]
    lnk = sm.links[c0]
    ans = sm._seal(m, lnk, sm._msg(M.HRSANS, m.maid, C.AclList(())))
    assert d0.receive(ans.data, 12.0) == [] and d0.acl_updates == 2
    assert d0.receive(ans.data, 12.0) == [] and d0.errors["REPLAY"] == 1
    forged = P.seal(sm._msg(M.HRSANS, m.maid, C.AclList((bytes(32),))).encode(), wrong, m.suite, 999, bytes(16))
    assert d0.receive(forged, 12.0) == [] and d0.errors["MAC"] == 1 and d0.acl == frozenset()
    bad = bytearray(sm._seal(m, lnk, sm._msg(M.HRSANS, m.maid, C.AclList(()))).data)
    bad[-3] ^= 1
    assert d0.receive(bytes(bad), 12.0) == [] and d0.errors["MAC"] == 2
    # the other DMA is served throughout
    net.tick(70.5)
    assert d1.acl_updates == 2 and sm.members[d0.cfg.maid].policy == "ok"


def test_a_message_three_generations_ahead_is_refused_by_an_agent():
    sm, net = session(n_dmas=1)
    d0 = dmas(net)[0]
    k, g = sm._ks_raw, 1
    for _ in range(3):
        g += 1
        k = P.ks_next(k, SID, g)
    m = sm.members[d0.cfg.maid]
    far = P.seal(sm._msg(M.HB, m.maid).encode(), P.ProtKey(P.KeyRef.KS, k, g), m.suite, 500, bytes(16))
    assert d0.receive(far, 12.0) == [] and d0.errors["KEY"] == 1 and d0.ks_gen == 1


def test_ks_and_ktls_never_in_reprs():
    sm, net = session(n_dmas=1)
    d0 = dmas(net)[0]
    text = repr(d0) + repr(sm.members) + repr(d0.cfg)
    for secret in (sm._ks_raw, d0._ktls._raw):
        assert secret.hex() not in text and repr(secret)[2:-1] not in text
    assert hashlib.sha256(sm._ks_raw).hexdigest() not in text


def test_a_dma_cannot_take_over_another_members_link_with_ks():
    """Ks is shared: DMA 0 can seal a message naming DMA 1, but the SM keeps each link with
    the member that bound it, so DMA 1's key deliveries never go to DMA 0's connection."""
    sm, net = session(n_dmas=2)
    d0, d1 = dmas(net)
    forged = C.Message(M.HB, N.DMA, SID, d1.cfg.maid)
    out = sm.receive(net.conn["dma0"], d0._seal(forged, d0.ks), 12.0)
    assert out == [] and sm.errors["MAID differs from the link's member"] == 1
    assert sm.members[d1.cfg.maid].link == net.conn["dma1"]
    net.deliver(sm.rekey(13.0), 13.0)
    assert d1.ks_gen == 2 and d1.ks._raw == sm._ks_raw and d0.errors["KEY"] == 0
