"""Session manager engine (sans-IO): admission and security-policy agreement, driven by
MAs built on the host codec and envelope (docs/rmcp2-profile.md B.5, B.7, B.13)."""
from __future__ import annotations

import hashlib
import itertools

import pytest

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2 import sm as S

SID = 0x5E55_1000_0000_0001
N, M = C.NodeType, C.MsgType


class Rand:
    """Deterministic rand(n)."""

    def __init__(self, label: str) -> None:
        self.c = itertools.count()
        self.label = label

    def __call__(self, n: int) -> bytes:
        return hashlib.sha256(f"{self.label}:{next(self.c)}".encode()).digest()[:n] if n <= 32 else bytes(n)


class MA:
    """A minimal SMA/DMA/RMA on the host codec: K_TLS (B.5), the envelope (B.7)."""

    def __init__(self, nt: C.NodeType, n: int, sui: bytes | None = None) -> None:
        self.nt = nt
        self.maid = C.make_maid("127.0.0.1", 40000 + n, n)
        self.cert = b"DER of certificate %d" % n
        self.sui = sui
        self.nonce = hashlib.sha256(b"nonce%d" % n).digest()[:16]
        self.ktls: P.ProtKey | None = None
        self.hk = b""
        self.ks: P.ProtKey | None = None
        self.suite = P.BOOTSTRAP
        self.seq = 0
        self.win_tls = P.ReplayWindow()
        self.win_ks = P.ReplayWindow()

    def msg(self, t: C.MsgType, *controls: C.Control) -> C.Message:
        return C.Message(t, self.nt, SID, self.maid, tuple(controls))

    def ktlsreq(self) -> bytes:
        return self.msg(M.KTLSREQ, C.KtlsNonce(self.nonce)).encode()

    def ktlsans(self, data: bytes) -> None:
        m = C.decode(data)
        assert m.type == M.KTLSANS
        raw = P.ktls(m.get(C.KtlsSeed).value, SID, self.maid, self.nonce, self.cert)
        self.ktls = P.ProtKey(P.KeyRef.KTLS, raw)
        self.hk = P.hashed_ktls(raw, SID)

    def seal(self, m: C.Message, key: P.ProtKey | None = None, suite: P.Suite | None = None) -> bytes:
        self.seq += 1
        return P.seal(m.encode(), key or self.ktls, suite or self.suite, self.seq, bytes(16))

    def open(self, data: bytes, ks: bool = False) -> C.Message:
        key = self.ks if ks else self.ktls
        return P.unseal_decode(data, self.suite, lambda maid, sec: key if sec.ref == key.ref else None,
                               lambda maid, k: self.win_ks if ks else self.win_tls)


def sends(out):
    return [a for a in out if isinstance(a, S.Send)]


def closes(out):
    return [a for a in out if isinstance(a, S.Close)]


def new_sm(**kw) -> S.SessionManager:
    return S.SessionManager(S.SmConfig(SID, C.make_maid("127.0.0.1", 26030, 1), **kw), rand=Rand("sm"), now=0.0)


def admit(sm: S.SessionManager, ma: MA, conn, now: float = 1.0):
    """TLS up, KTLSREQ/KTLSANS, SUBSREQ; returns the SM's actions for the SUBSREQ."""
    assert sm.connect(conn, now, cert_der=ma.cert) == []
    out = sm.receive(conn, ma.ktlsreq(), now)
    ma.ktlsans(sends(out)[0].data)
    controls = (C.ServUserIdent(ma.sui),) if ma.sui else ()
    return sm.receive(conn, ma.seal(ma.msg(M.SUBSREQ, *controls)), now)


def admit_server(sm, ma: MA, conn, now=1.0):
    out = admit(sm, ma, conn, now)
    ans = ma.open(sends(out)[0].data)
    assert ans.type == M.SUBSANS and ans.get(C.ResultCtl).value == C.Result.ACCEPTED
    kd = ma.open(sends(out)[1].data)
    assert kd.type == M.KEYDELIVER and kd.get(C.KeyInfo).key_type == C.KeyType.KS
    d = C.KeyData.decode(kd.get(C.KeyInfo).key_data)
    ma.ks = P.ProtKey(P.KeyRef.KS, d.key, d.gen)
    assert closes(out), "the TLS session with the SMA/DMAs closes once Ks is delivered (10.1.1.1)"
    sm.connect(("ks", conn), now, tls=False)
    return d


def sma_propose(gp=C.GpAttribute.OPEN) -> list[C.Control]:
    return [C.SmaPropose(gp, C.GkMecha.BACKWARD_FORWARD, C.EnDecId.AES_CTR_128),
            C.GkMechCapab(C.GkName.KDC, 1), C.EnDecCapab(C.EnDecId.AES_CTR_128, 1),
            C.EnDecCapab(C.EnDecId.AES_CBC_128, 2), C.AuthAlgCapab(C.AuthId.HMAC_SHA1, 1)]


def agree(sm, sma, dmas, now=11.0, gp=C.GpAttribute.OPEN):
    """SECAGREQ of SMA and DMAs, Security Agree.time passes, SECLIST to each, SECAGANS OK."""
    assert sm.receive(("ks", "sma"), sma.seal(sma.msg(M.SECAGREQ, *sma_propose(gp)), sma.ks), 2.0) == []
    for i, d in enumerate(dmas):
        caps = [C.EnDecCapab(C.EnDecId.AES_CBC_128, 1), C.AuthAlgCapab(C.AuthId.HMAC_MD5, 1),
                C.AuthAlgCapab(C.AuthId.HMAC_SHA1, 2)]
        assert sm.receive(("ks", f"dma{i}"), d.seal(d.msg(M.SECAGREQ, *caps), d.ks), 3.0) == []
    assert sm.tick(9.9) == []  # before the Security Agree.time nothing is selected
    out = sm.tick(now)
    lists = {}
    for a in sends(out):
        who = sma if a.conn == ("ks", "sma") else dmas[int(a.conn[1][3:])]
        lists[a.conn] = who.open(a.data, ks=True)
    assert len(lists) == 1 + len(dmas)
    for conn, m in lists.items():
        who = sma if conn == ("ks", "sma") else dmas[int(conn[1][3:])]
        assert m.type == M.SECLIST
        assert sm.receive(conn, who.seal(who.msg(M.SECAGANS, C.SecReturnCtl(C.SecReturn.OK)), who.ks), now) == []
        who.suite = sm.policy.suite
    return lists


def test_sma_and_dma_get_ks_under_ktls_and_the_tls_session_closes():
    sm = new_sm()
    sma, dma = MA(N.SMA, 1), MA(N.DMA, 2)
    d1 = admit_server(sm, sma, "sma")
    d2 = admit_server(sm, dma, "dma0")
    assert d1 == d2 and d1.gen == 1 and d1.mode == C.KeyMode.FRESH and d1.period == 3600
    assert set(sm.members) == {sma.maid, dma.maid}
    # a second SMA is refused (one sender per session)
    out = admit(sm, MA(N.SMA, 3), "sma2")
    assert closes(out) and sm.errors["SUBSREQ refused: NOT_ALLOWED"] == 1


def test_the_sma_subscribing_again_with_its_own_certificate_is_admitted():
    """An SMA whose TLS link ended before it read KEYDELIVER subscribes again (B.13); the rule
    'one SMA per session' must not refuse the SMA itself (seen as a flaky NOT_ALLOWED under load)."""
    sm = new_sm()
    sma = MA(N.SMA, 1)
    admit_server(sm, sma, "sma")
    sm.disconnect(("ks", "sma"))  # its plain link too: no live link is left
    sma.win_tls = P.ReplayWindow()  # a new K_TLS: a new window on the MA side
    again = admit_server(sm, sma, "sma-again", now=2.0)
    assert again.gen == 1 and "SUBSREQ refused: NOT_ALLOWED" not in sm.errors
    assert [m.nt for m in sm.members.values()] == [N.SMA]


def test_policy_agreement_selects_after_the_agree_time():
    sm = new_sm()
    sma, dmas = MA(N.SMA, 1), [MA(N.DMA, 2), MA(N.DMA, 3)]
    admit_server(sm, sma, "sma")
    for i, d in enumerate(dmas):
        admit_server(sm, d, f"dma{i}")
    lists = agree(sm, sma, dmas, gp=C.GpAttribute.CLOSED)
    pol = sm.policy
    # SMA's proposal for GP/GK_MECHA/content; AES-CBC held by all three; HMAC-SHA1 by all three
    assert (pol.gp_attribute, pol.gk_mecha, pol.con_en_dec) == (C.GpAttribute.CLOSED, C.GkMecha.BACKWARD_FORWARD,
                                                                 C.EnDecId.AES_CTR_128)
    assert (pol.gk_en_dec, pol.auth, pol.gk_name) == (C.EnDecId.AES_CBC_128, C.AuthId.HMAC_SHA1, C.GkName.KDC)
    for m in lists.values():
        assert m.get(C.GkMech) == C.GkMech(C.GpAttribute.CLOSED, C.GkMecha.BACKWARD_FORWARD, C.GkName.KDC)
        assert m.get(C.ConEnDecAlg).value == C.EnDecId.AES_CTR_128
    assert all(m.policy == "ok" for m in sm.members.values())


def test_selection_prefers_what_most_mas_hold_then_preference():
    r = [C.Message(M.SECAGREQ, N.DMA, SID, b"\1" * 8, (C.AuthAlgCapab(C.AuthId.HMAC_MD5, 1),
                                                        C.AuthAlgCapab(C.AuthId.HMAC_SHA1, 3))),
         C.Message(M.SECAGREQ, N.DMA, SID, b"\2" * 8, (C.AuthAlgCapab(C.AuthId.HMAC_MD5, 2),
                                                        C.AuthAlgCapab(C.AuthId.HMAC_SHA1, 1))),
         C.Message(M.SECAGREQ, N.DMA, SID, b"\3" * 8, (C.AuthAlgCapab(C.AuthId.HMAC_MD5, 1),
                                                        C.AuthAlgCapab(C.AuthId.MD5, 1)))]
    assert S._best(r, C.AuthAlgCapab, S.USABLE_AUTH) == C.AuthId.HMAC_MD5  # held by 3 vs 2
    assert S._best(r[:2], C.AuthAlgCapab, S.USABLE_AUTH) == C.AuthId.HMAC_MD5  # 3 vs 4 (ties broken by sum)
    assert S._best(r[1:2], C.AuthAlgCapab, S.USABLE_AUTH) == C.AuthId.HMAC_SHA1
    assert S._best([], C.AuthAlgCapab, S.USABLE_AUTH) == C.AuthId.HMAC_SHA1  # lowest code


def test_links_move_to_the_agreed_suite():
    sm = new_sm()
    sma, dma = MA(N.SMA, 1), MA(N.DMA, 2)
    admit_server(sm, sma, "sma")
    admit_server(sm, dma, "dma0")
    dma_caps = [C.AuthAlgCapab(C.AuthId.HMAC_MD5, 1), C.EnDecCapab(C.EnDecId.AES_CTR_128, 1)]
    sm.receive(("ks", "dma0"), dma.seal(dma.msg(M.SECAGREQ, *dma_caps), dma.ks), 2.0)
    sm.receive(("ks", "sma"), sma.seal(sma.msg(M.SECAGREQ, sma_propose()[0], C.AuthAlgCapab(C.AuthId.HMAC_MD5, 1)),
                                       sma.ks), 2.0)
    sm.tick(10.0)
    assert sm.policy.suite == P.Suite(C.EnDecId.AES_CTR_128, C.AuthId.HMAC_MD5)
    sm.receive(("ks", "dma0"), dma.seal(dma.msg(M.SECAGANS, C.SecReturnCtl(C.SecReturn.OK)), dma.ks), 10.0)
    # from now on the bootstrap suite is refused on that link, the agreed one accepted
    before = sm.errors["ALGORITHM"]
    sm.receive(("ks", "dma0"), dma.seal(dma.msg(M.SECAGREQ), dma.ks), 10.5)
    assert sm.errors["ALGORITHM"] == before + 1
    out = sm.receive(("ks", "dma0"), dma.seal(dma.msg(M.SECAGREQ), dma.ks, sm.policy.suite), 10.5)
    dma.suite = sm.policy.suite
    assert dma.open(sends(out)[0].data, ks=True).type == M.SECLIST


def test_secalgreq_answers_not_deliverable_unless_the_sm_holds_the_module():
    for modules, want in ((frozenset(), C.DeliverResult.NOT_DELIVERABLE),
                          (frozenset({int(C.EnDecId.SEED)}), C.DeliverResult.AVAILABLE)):
        sm = new_sm(modules=modules)
        sma, dma = MA(N.SMA, 1), MA(N.DMA, 2)
        admit_server(sm, sma, "sma")
        admit_server(sm, dma, "dma0")
        sm.receive(("ks", "sma"), sma.seal(sma.msg(M.SECAGREQ, *sma_propose()), sma.ks), 2.0)
        sm.receive(("ks", "dma0"), dma.seal(dma.msg(M.SECAGREQ), dma.ks), 2.0)
        sm.tick(10.0)
        out = sm.receive(("ks", "dma0"), dma.seal(dma.msg(M.SECALGREQ, C.ConEnDecDeliver(C.EnDecId.SEED)), dma.ks),
                         10.0)
        ans = dma.open(sends(out)[0].data, ks=True)
        assert ans.type == M.SECALGANS
        assert ans.controls == (C.ConEnDecDeliver(C.EnDecId.SEED), C.DeliverResultCtl(want))
    # the DMA cannot configure: FAILED CONFIGURATION takes it out of the session
    out = sm.receive(("ks", "dma0"), dma.seal(dma.msg(M.SECAGANS, C.SecReturnCtl(C.SecReturn.FAILED_CONFIGURATION)),
                                              dma.ks), 11.0)
    assert closes(out) and dma.maid not in sm.members and sm.errors["policy refused: SEC_RETURN FAILED_CONFIGURATION"]


def server_side(**kw):
    sm = new_sm(**kw)
    sma, dma = MA(N.SMA, 1), MA(N.DMA, 2)
    admit_server(sm, sma, "sma")
    admit_server(sm, dma, "dma0")
    return sm, sma, dma


def rma_agree(sm, rma, conn, ret=C.SecReturn.OK, now=20.0):
    out = sm.receive(conn, rma.seal(rma.msg(M.SECAGREQ)), now)
    lst = rma.open(sends(out)[0].data)
    assert lst.type == M.SECLIST
    return sm.receive(conn, rma.seal(rma.msg(M.SECAGANS, C.SecReturnCtl(ret))), now)


def test_rmas_join_an_open_group_after_the_policy_and_enter_the_acl():
    sm, sma, dma = server_side()
    agree(sm, sma, [dma])
    rma = MA(N.RMA, 10)
    out = admit(sm, rma, "rma")
    assert rma.open(sends(out)[0].data).get(C.ResultCtl).value == C.Result.NOT_ALLOWED  # not open yet
    assert closes(out)
    sm.open_session()
    rma = MA(N.RMA, 11)
    out = admit(sm, rma, "rma11", now=20.0)
    assert len(sends(out)) == 1 and not closes(out)  # no Ks for an RMA; TLS stays open (10.1.1.1)
    assert rma.open(sends(out)[0].data).get(C.ResultCtl).value == C.Result.ACCEPTED
    assert rma_agree(sm, rma, "rma11") == []
    assert sm.acl == {P.hashed_maid(SID, rma.maid): rma.hk}


def test_closed_group_service_user_identifiers():
    sm, sma, dma = server_side()
    agree(sm, sma, [dma], gp=C.GpAttribute.CLOSED)
    sm.register_service_user_id(b"user-7")
    sm.open_session()
    for n, sui, want in ((20, None, C.Result.SERV_USER_ID_MISSING),
                         (21, b"user-8", C.Result.SERV_USER_ID_NOT_RECOGNIZED),
                         (22, b"user-7", C.Result.ACCEPTED)):
        rma = MA(N.RMA, n, sui)
        out = admit(sm, rma, f"rma{n}", now=20.0)
        assert rma.open(sends(out)[0].data).get(C.ResultCtl).value == want
        assert bool(closes(out)) == (want != C.Result.ACCEPTED)
    assert int(C.Result.SERV_USER_ID_MISSING) == 0x41 and int(C.Result.SERV_USER_ID_NOT_RECOGNIZED) == 0x42
    assert len([m for m in sm.members.values() if m.nt == N.RMA]) == 1


def test_rma_refusing_the_policy_is_not_admitted_to_the_acl():
    sm, sma, dma = server_side()
    agree(sm, sma, [dma])
    sm.open_session()
    rma = MA(N.RMA, 30)
    admit(sm, rma, "rma30", now=20.0)
    out = rma_agree(sm, rma, "rma30", ret=C.SecReturn.FAILED_CONFIGURATION)
    assert closes(out) and sm.acl == {} and rma.maid not in sm.members


def test_a_dma_joining_after_the_policy_gets_seclist_at_once():
    sm, sma, dma = server_side()
    agree(sm, sma, [dma])
    late = MA(N.DMA, 40)
    admit_server(sm, late, "late", now=30.0)
    out = sm.receive(("ks", "late"), late.seal(late.msg(M.SECAGREQ), late.ks), 30.0)
    assert late.open(sends(out)[0].data, ks=True).get(C.AuthAlg).value == sm.policy.auth


def test_bad_input_is_counted_and_others_keep_being_served():
    sm, sma, dma = server_side()
    agree(sm, sma, [dma])
    sm.open_session()
    # garbage before KTLSREQ: that link is closed, counted
    sm.connect("junk", 20.0, cert_der=b"x")
    assert closes(sm.receive("junk", b"\x00" * 30, 20.0)) and sm.errors["LENGTH"] == 1
    # a message under another MA's K_TLS: refused before any member state exists
    a = MA(N.RMA, 50)
    sm.connect("a", 20.0, cert_der=a.cert)
    a.ktlsans(sends(sm.receive("a", a.ktlsreq(), 20.0))[0].data)
    wrong = P.ProtKey(P.KeyRef.KTLS, bytes(16))
    out = sm.receive("a", a.seal(a.msg(M.SUBSREQ), wrong), 20.0)
    assert closes(out) and sm.errors["MAC"] == 1 and a.maid not in sm.members
    # replayed and tampered messages of an admitted RMA: counted, the RMA stays
    rma = MA(N.RMA, 52)
    admit(sm, rma, "r52", now=20.0)
    m = rma.seal(rma.msg(M.SECAGREQ))
    assert sends(sm.receive("r52", m, 20.0))
    assert sm.receive("r52", m, 20.0) == [] and sm.errors["REPLAY"] == 1
    t = bytearray(rma.seal(rma.msg(M.SECAGANS, C.SecReturnCtl(C.SecReturn.OK))))
    t[-1] ^= 1
    assert sm.receive("r52", bytes(t), 20.0) == [] and sm.errors["MAC"] == 2
    assert rma.maid in sm.members and sm.members[rma.maid].policy == "sent"
    # a forged Ks message claiming an unknown MAID on a plain link: KEY, link closed
    sm.connect("plain", 20.0, tls=False)
    ghost = MA(N.DMA, 60)
    assert closes(sm.receive("plain", ghost.seal(ghost.msg(M.SECAGREQ), dma.ks), 20.0))
    assert sm.errors["KEY"] == 1
    # everyone else is still served: the honest RMA finishes its agreement
    assert sm.receive("r52", rma.seal(rma.msg(M.SECAGANS, C.SecReturnCtl(C.SecReturn.OK))), 20.0) == []
    assert sm.members[rma.maid].policy == "ok" and P.hashed_maid(SID, rma.maid) in sm.acl


def test_deadlines_on_slow_peers():
    sm, sma, dma = server_side()
    agree(sm, sma, [dma])
    t_admit, t_secagans = sm.cfg.admit_timeout, sm.cfg.secagans_timeout  # B.10
    sm.connect("idle", 12.0, cert_der=b"c")
    assert sm.tick(12.0 + t_admit - 0.5) == []
    assert closes(sm.tick(12.0 + t_admit + 0.5)) and "idle" not in sm.links
    assert ("ks", "sma") in sm.links  # authenticated links are not subject to the admission deadline
    sm.open_session()
    rma = MA(N.RMA, 70)
    admit(sm, rma, "r70", now=30.0)
    sm.receive("r70", rma.seal(rma.msg(M.SECAGREQ)), 30.0)
    assert sm.tick(30.0 + t_secagans - 1) == []
    out = sm.tick(30.0 + t_secagans + 1)  # T_SECAGANS passed without an answer
    assert closes(out) and rma.maid not in sm.members


def test_connection_table_is_bounded():
    sm = new_sm(max_links=3)
    for i in range(3):
        assert sm.connect(i, 0.0, cert_der=b"c") == []
    assert closes(sm.connect(3, 0.0, cert_der=b"c")) and len(sm.links) == 3


def test_open_session_needs_a_policy():
    with pytest.raises(ValueError):
        new_sm().open_session()


def _served_session():
    sm, sma, dma = server_side()
    agree(sm, sma, [dma])
    sm.open_session()
    rma = MA(N.RMA, 80)
    admit(sm, rma, "r80", now=20.0)
    return sm, rma, dma


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["fresh", "r80", "ks"]), st.binary(max_size=120)), max_size=8), st.data())
def test_engine_survives_arbitrary_input_and_keeps_serving(inputs, data):
    sm, rma, dma = _served_session()
    valid = [rma.seal(rma.msg(M.SECAGREQ)), dma.seal(dma.msg(M.SECAGREQ), dma.ks, sm.policy.suite)]
    sm.connect("fresh", 20.0, cert_der=b"c")
    for where, raw in inputs:
        if data.draw(st.booleans()):  # a mutated valid message instead of pure garbage
            b = bytearray(valid[where == "ks"])
            b[data.draw(st.integers(0, len(b) - 1))] ^= data.draw(st.integers(1, 255))
            raw = bytes(b)
        conn = ("ks", "dma0") if where == "ks" else where
        for a in sm.receive(conn, raw, 20.0):
            assert isinstance(a, (S.Send, S.Close))
    assert len(sm.links) <= 6 and sum(sm.errors.values()) <= len(inputs) + 1
    # an honest RMA is still admitted and agrees on the policy
    honest = MA(N.RMA, 81)
    out = admit(sm, honest, "r81", now=21.0)
    assert honest.open(sends(out)[0].data).get(C.ResultCtl).value == C.Result.ACCEPTED
    assert rma_agree(sm, honest, "r81", now=21.0) == []
    assert P.hashed_maid(SID, honest.maid) in sm.acl


def test_no_key_material_in_reprs_or_logs(caplog):
    """Ks, K_TLS seeds and KEY_DATA never appear in a repr (what a log line would show)."""
    caplog.set_level("DEBUG")
    sm = new_sm()
    sma = MA(N.SMA, 1)
    sm.connect("sma", 1.0, cert_der=sma.cert)
    ktlsans = C.decode(sends(sm.receive("sma", sma.ktlsreq(), 1.0))[0].data)
    sma.ktlsans(ktlsans.encode())
    out = sm.receive("sma", sma.seal(sma.msg(M.SUBSREQ)), 1.0)
    kd = sma.open(sends(out)[1].data)
    secrets_ = [ktlsans.get(C.KtlsSeed).value, sm._ks_raw, kd.get(C.KeyInfo).key_data]
    texts = [repr(ktlsans), repr(kd), repr(sm.members), repr(sm.links), repr(sm.ks), repr(sma.ktls), caplog.text]
    for s in secrets_:
        for t in texts:
            assert s.hex() not in t and repr(s)[2:-1] not in t
