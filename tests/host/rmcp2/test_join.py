"""Tree join and Annex E (host/tessera/rmcp2/annexe.py, tree.py; profile B.11, B.15):
the vectors reproduced byte for byte, the board's join client (under CPython through mpshim)
against the DMA engine, and every refusal the engine and clients must make."""
from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera import mpshim
from tessera.crypto.dh import P as DH_P
from tessera.paths import repo_root
from tessera.rmcp2 import annexe as E
from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2 import tree as T

mpshim.install()
from tessera_fw.rmcp2 import join as J  # noqa: E402

VEC = json.loads((repo_root() / "tests" / "vectors" / "rmcp2" / "join.json").read_text())
N, M, Fail = C.NodeType, C.MsgType, E.Fail
SID = 0x0123456789ABCDEF
DMA = C.make_maid("127.0.0.1", 26032, 0x0D01)
SUITE = P.Suite(C.EnDecId.AES_CTR_128, C.AuthId.HMAC_SHA1)


def hx(s: str) -> bytes:
    return bytes.fromhex(s)


class Script:
    def __init__(self, *values: bytes) -> None:
        self.values = list(values)

    def __call__(self, n: int) -> bytes:
        v = self.values.pop(0)
        assert len(v) == n
        return v


def rma_maid(n: int) -> bytes:
    return C.make_maid("127.0.0.2", 40000 + n, n)


def hk(n: int) -> bytes:
    return n.to_bytes(2, "big") * 8


def engine(n_members: int = 8, **kw) -> T.JoinEngine:
    acl = {P.hashed_maid(SID, rma_maid(i)): hk(i) for i in range(1, n_members + 1)}
    kw.setdefault("kg_source", lambda: (9, b"G" * 16))
    return T.JoinEngine(SID, DMA, acl_lookup=acl.get, suite=SUITE, rand=os.urandom, **kw)


def host_rma(n: int, w: bytes | None = None) -> T.JoinClient:
    return T.JoinClient(SID, rma_maid(n), N.RMA, SUITE, os.urandom, hashed_ktls=w or hk(n))


def run(cli, eng, conn="c", now=1.0, fw=False) -> list[bytes]:
    """Carry messages until the exchange settles; return everything the engine sent."""
    todo = [bytes(cli.start())]
    sent = []
    while todo:
        for r in eng.receive(conn, todo.pop(0), now):
            sent.append(r)
            out = cli.receive(r)
            if fw:
                todo += [bytes(out)] if out is not None else []
            else:
                todo += out
    return sent


# ------------------------------------------------------------------------ vectors
@pytest.mark.parametrize("t", [t for t in VEC["transcripts"]], ids=lambda t: t["name"])
def test_vectors_reproduced_by_the_host_engines(t):
    suite = P.Suite(C.EnDecId(t["enc"]), C.AuthId(t["auth"]))
    sid = int(t["session_id"], 16)
    mc, ms = hx(t["maid_client"]), hx(t["maid_server"])
    if t["kind"] == "rma":
        acl = {hx(t["idc"]): hx(t["w"])}
        eng = T.JoinEngine(sid, ms, acl_lookup=acl.get, kg_source=lambda: (t["kg_gen"], hx(t["kg"])), suite=suite,
                           rand=Script(hx(t["rs"]), hx(t["xb"]), hx(t["iv"])), status=lambda: tuple(t["status"]))
        cli = T.JoinClient(sid, mc, N.RMA, suite, Script(hx(t["nonce"]), hx(t["xa"]), hx(t["rc"])),
                           hashed_ktls=hx(t["w"]))
    else:
        ks = P.ProtKey(P.KeyRef.KS, hx(t["ks"]), t["ks_gen"])
        ivs, ivc = [hx(v) for v in t["iv_server"]], [hx(v) for v in t["iv_client"]]
        eng = T.JoinEngine(sid, ms, acl_lookup=lambda h: None, kg_source=lambda: (1, bytes(16)), suite=suite,
                           rand=Script(ivs[0], hx(t["rs"]), hx(t["xb"]), ivs[1], ivs[2]),
                           ks_lookup=lambda g: ks if g == ks.gen else None, ks_current=lambda: ks,
                           status=lambda: (1, 0, 0))
        cli = T.JoinClient(sid, mc, N.DMA, suite, Script(ivc[0], hx(t["xa"]), hx(t["rc"]), ivc[1], ivc[2]), ks=ks)
        assert E.rm_secret(hx(t["ks"]), sid) == hx(t["w"])
    wire = [cli.start()]
    for step in t["wire"][1:]:
        prev = wire[-1]
        wire += eng.receive("c", prev, 1.0) if step["from"] == "server" else cli.receive(prev)
    assert [w.hex() for w in wire] == [s["bytes"] for s in t["wire"]]
    assert cli.receive(wire[-1]) == []
    assert cli.state == "joined" and cli.kmas == hx(t["kmas"])
    # the formulas one by one (B.11)
    idc, ids = P.hashed_maid(sid, mc), P.hashed_maid(sid, ms)
    assert E.k1(hx(t["w"]), sid, idc, hx(t["rc"])) == hx(t["k1"])
    assert E.k2(hx(t["w"]), sid, idc, hx(t["rc"]), ids, hx(t["rs"])) == hx(t["k2"])
    m = E.master(hx(t["w"]), hx(t["z"]), sid, idc, hx(t["rc"]), hx(t["e1"]), ids, hx(t["rs"]), hx(t["e2"]))
    assert m == hx(t["m"]) and E.v_s(m) == hx(t["vs"]) and E.v_c(m) == hx(t["vc"]) and E.k_mas(m) == hx(t["kmas"])
    if t["kind"] == "rma":
        assert cli.kg.gen == t["kg_gen"] and cli.kg.key == hx(t["kg"])
        assert cli.status == C.Status(*t["status"])


def _client_at(t: dict, state: str) -> T.JoinClient:
    """The transcript's host RMA client, fed the DMA's messages up to `state`."""
    cli = T.JoinClient(int(t["session_id"], 16), hx(t["maid_client"]), N.RMA,
                       P.Suite(C.EnDecId(t["enc"]), C.AuthId(t["auth"])),
                       Script(hx(t["nonce"]), hx(t["xa"]), hx(t["rc"])), hashed_ktls=hx(t["w"]))
    cli.start()
    steps = {"probe": 0, "pass1": 1, "pass3": 2}[state]
    for k in range(steps):
        cli.receive(hx(t["wire"][1 + 2 * k]["bytes"]))
    assert cli.state == state
    return cli


@pytest.mark.parametrize("c", VEC["rma_tamper"], ids=lambda c: c["name"])
def test_tampered_and_replayed_passes_refused_by_the_host_client(c):
    cli = _client_at(VEC["transcripts"][0], c["state"])
    try:
        cli.receive(hx(c["bytes"]))
        got = 0
    except C.Rmcp2Error as e:
        got = int(e.code)
    except E.AnnexeError as e:
        got = 100 + e.reason
    assert got == c["error"]
    assert (cli.fail or 0) == c["host_refused"]  # the board's "refused" may be VERIFY where the host's full
    assert c["host_refused"] in (c["refused"], Fail.PUBLIC)  # subgroup check says PUBLIC (B.11)
    assert cli.kmas is None and cli.kg is None


@pytest.mark.parametrize("c", VEC["rma_tamper"], ids=lambda c: c["name"])
def test_tampered_and_replayed_passes_refused_by_the_board_client(c):
    t = VEC["transcripts"][0]
    j = J.Join(hx(t["session_id"]), hx(t["maid_client"]), hx(t["w"]), t["enc"], t["auth"],
               Script(hx(t["nonce"]), hx(t["xa"]), hx(t["rc"])))
    j.start()
    for k in range({"probe": 0, "pass1": 1, "pass3": 2}[c["state"]]):
        j.receive(hx(t["wire"][1 + 2 * k]["bytes"]))
    assert J.STATE_NAMES[j.state] == c["state"]
    assert j.receive(hx(c["bytes"])) is None
    assert j.errors == ({c["error"]: 1} if c["error"] else {})
    assert j.fail == c["refused"] and j.kg is None and j.kmas is None


# ------------------------------------------------------------------------ both clients against the engine
@pytest.mark.parametrize("enc,auth", [(1, 1), (2, 2)])
def test_board_join_client_against_the_dma_engine(enc, auth):
    suite = P.Suite(C.EnDecId(enc), C.AuthId(auth))
    eng = T.JoinEngine(
        SID, DMA, acl_lookup={P.hashed_maid(SID, rma_maid(1)): hk(1)}.get, kg_source=lambda: (9, b"G" * 16),
        suite=suite, rand=os.urandom)
    got = []
    j = J.Join(SID.to_bytes(8, "big"), rma_maid(1), hk(1), enc, auth, os.urandom, on_kg=lambda g, k: got.append((g, k)))
    assert j.precompute() and not j.precompute()
    run(j, eng, fw=True)
    assert J.STATE_NAMES[j.state] == "joined" and got == [(9, b"G" * 16)]
    assert eng.members()[rma_maid(1)].kmas == j.kmas and j.parent == P.hashed_maid(SID, DMA)
    assert not eng.errors and eng.pending == 0


def test_many_rmas_join_each_with_its_own_kmas():
    eng = engine(8)
    clients = [host_rma(i) for i in range(1, 9)]
    for i, c in enumerate(clients):
        run(c, eng, conn=i)
        assert c.state == "joined" and c.kg.key == b"G" * 16
    keys = {m.kmas for m in eng.members().values()}
    assert len(keys) == 8 and {c.kmas for c in clients} == keys


# ------------------------------------------------------------------------ refusals
def test_rma_not_in_the_acl_refused_at_probe_and_at_pass_1():
    eng = engine(2)
    stranger = host_rma(5)  # admitted by no SM: not in this DMA's ACL
    sent = run(stranger, eng)
    assert stranger.state == "refused" and stranger.fail == Fail.NOT_IN_ACL
    assert C.decode(sent[0]).get(C.ResultCtl).value == C.Result.NOT_IN_ACL
    # skipping the probe does not help: pass 1 is refused too, no pending state
    cli = E.Client(SID, P.hashed_maid(SID, rma_maid(5)), hk(5), 2, os.urandom(16), E.DH())
    relreq = C.Message(M.RELREQ, N.RMA, SID, rma_maid(5), (C.Auth(ma_auth=C.MaAuth(1, cli.pass1())),)).encode()
    ans = C.decode(eng.receive("x", relreq, 1.0)[0]).get(C.AuthAns)
    assert ans.auth_result == C.SecReturn.ERROR and ans.key is None
    assert eng.errors["NOT_IN_ACL"] == 2 and not eng.members() and eng.pending == 0


def test_attacker_without_the_auth_info_gets_no_kmas_and_no_kg():
    eng = engine(2)
    # it knows the victim's MAID (in every header) but not its HASHED_KTLS
    probe = C.Message(M.PPROBREQ, N.RMA, SID, rma_maid(1), (
        C.ProbeAuth(P.hashed_maid(SID, rma_maid(1)), b"n" * 8, b"p" * 8),)).encode()
    sent = eng.receive("m", probe, 1.0)
    assert C.decode(sent[0]).get(C.ResultCtl).value == C.Result.REJECTED  # probe proof wrong
    assert eng.errors["PROBE"] == 1
    # straight to pass 1 with a wrong W: the DMA's decryption of g^A is outside the subgroup
    # (refused PUBLIC) or gives a pass 2 whose Vs fails at the attacker; any Vc it makes up fails
    answered = tries = 0
    for i in range(40):  # until two pass 2s were answered (each try: 1/2)
        if answered == 2:
            break
        tries += 1
        mallory = host_rma(1, w=b"\x99" * 16)
        mallory.state = "probe"
        out = mallory.receive(C.Message(M.PPROBANS, N.DMA, SID, rma_maid(1), (C.ResultCtl(C.Result.ACCEPTED),)).encode())
        ans = C.decode(eng.receive(i, out[0], 1.0)[0]).get(C.AuthAns)
        if ans.auth_result == C.SecReturn.ERROR:
            continue
        answered += 1
        assert mallory.receive(C.Message(
            M.RELANS, N.DMA, SID, rma_maid(1), (ans,)).encode()) == []
        assert mallory.fail in (Fail.VERIFY, Fail.PUBLIC) and mallory.kmas is None
        p3 = C.Message(M.RELREQ, N.RMA, SID, rma_maid(1), (C.Auth(ma_auth=C.MaAuth(3, os.urandom(16))),)).encode()
        assert C.decode(eng.receive(i, p3, 1.0)[0]).get(C.AuthAns).auth_result == C.SecReturn.ERROR
    assert answered >= 1 and eng.errors["VERIFY"] == answered
    assert eng.errors["PUBLIC"] == tries - answered
    assert not eng.members() and eng.pending == 0


def test_recorded_passes_replayed_by_an_eavesdropper_fail():
    eng = engine(2)
    good = host_rma(1)
    wire: list[bytes] = []
    todo = [good.start()]
    while todo:
        m = todo.pop(0)
        wire.append(m)
        for r in eng.receive("g", m, 1.0):
            todo += good.receive(r)
    assert good.state == "joined"
    eng.remove(rma_maid(1))
    relreq1, relreq3 = wire[1], wire[2]
    # pass 3 alone: no live run
    ans = C.decode(eng.receive("e", relreq3, 2.0)[0]).get(C.AuthAns)
    assert ans.auth_result == C.SecReturn.ERROR and eng.errors["NO_PENDING"] == 1
    # pass 1 then pass 3 replayed: the DMA drew a new rs and B, so the recorded Vc fails
    assert C.decode(eng.receive("e", relreq1, 2.0)[0]).get(C.AuthAns).auth_result == C.SecReturn.RETRANSMISSION_REQ
    assert C.decode(eng.receive("e", relreq3, 2.0)[0]).get(C.AuthAns).auth_result == C.SecReturn.ERROR
    assert eng.errors["VERIFY"] == 1 and not eng.members()
    # the recorded probe again: its nonce is spent
    assert C.decode(eng.receive("e", wire[0], 2.0)[0]).get(C.ResultCtl).value == C.Result.REJECTED
    assert eng.errors["PROBE"] == 1


def test_reflection_of_pass_2_is_not_a_valid_pass_3():
    eng = engine(2)
    cli = host_rma(1)
    cli.receive(eng.receive("c", cli.start(), 1.0)[0])
    p2 = C.decode(eng.receive("c", _relreq1(cli), 1.0)[0]).get(C.AuthAns).ma_auth.data
    vs = p2[288:]  # Vs sent back as Vc: labels differ (B.11)
    p3 = C.Message(M.RELREQ, N.RMA, SID, rma_maid(1), (C.Auth(ma_auth=C.MaAuth(3, vs)),)).encode()
    assert C.decode(eng.receive("c", p3, 1.0)[0]).get(C.AuthAns).auth_result == C.SecReturn.ERROR
    assert eng.errors["VERIFY"] == 1 and not eng.members()


def _relreq1(cli: T.JoinClient) -> bytes:
    return C.Message(M.RELREQ, N.RMA, SID, cli.maid, (C.Auth(ma_auth=C.MaAuth(1, cli._cli.pass1())),)).encode()


def test_identity_binding_pass_1_for_another_maid():
    eng = engine(2)
    cli = E.Client(SID, P.hashed_maid(SID, rma_maid(1)), hk(1), 2, os.urandom(16), E.DH())
    # IDc of RMA 1 under the header MAID of RMA 2
    m = C.Message(M.RELREQ, N.RMA, SID, rma_maid(2), (C.Auth(ma_auth=C.MaAuth(1, cli.pass1())),)).encode()
    assert C.decode(eng.receive("c", m, 1.0)[0]).get(C.AuthAns).auth_result == C.SecReturn.ERROR
    assert eng.errors["IDENTITY"] == 1 and eng.pending == 0


def test_degenerate_dh_value_refused():
    eng = engine(2)
    idc, rc = P.hashed_maid(SID, rma_maid(1)), os.urandom(16)
    for bad in (1, DH_P - 1, 2 ** 2047 + 1):  # order 1 and 2, and a value checked for the subgroup
        ea = E.e_k(2, E.k1(hk(1), SID, idc, rc), bad.to_bytes(256, "big"))
        m = C.Message(M.RELREQ, N.RMA, SID, rma_maid(1), (C.Auth(ma_auth=C.MaAuth(1, idc + rc + ea)),)).encode()
        eng.receive("c", m, 1.0)
    assert eng.errors["PUBLIC"] >= 2 and eng.pending == 0 and not eng.members()


def test_pending_table_bounded_and_expired_after_t_annexe():
    eng = engine(120, max_pending=16)
    for i in range(1, 41):  # 40 clients start, none finishes
        cli = host_rma(i)
        cli.receive(eng.receive(i, cli.start(), 1.0)[0])
        eng.receive(i, _relreq1(cli), 1.0)
    assert eng.pending == 16 and eng.errors["BUSY"] == 24
    eng.tick(1.0 + T.T_ANNEXE + 0.1)
    assert eng.pending == 0 and eng.errors["TIMEOUT"] == 16
    # a good client is served once the table has room
    c = host_rma(100)
    run(c, eng, conn="late", now=30.0)
    assert c.state == "joined"


def test_pass_3_after_t_annexe_is_refused():
    eng = engine(2)
    cli = host_rma(1)
    relreq1 = cli.receive(eng.receive("c", cli.start(), 1.0)[0])[0]
    p3 = cli.receive(eng.receive("c", relreq1, 1.0)[0])[0]
    ans = C.decode(eng.receive("c", p3, 1.0 + T.T_ANNEXE + 1)[0]).get(C.AuthAns)
    assert ans.auth_result == C.SecReturn.ERROR and eng.errors["TIMEOUT"] == 1 and eng.errors["NO_PENDING"] == 1
    assert not eng.members()


def test_pass_3_on_another_link_is_refused():
    eng = engine(2)
    cli = host_rma(1)
    cli.receive(eng.receive("a", cli.start(), 1.0)[0])
    p3 = cli.receive(eng.receive("a", _relreq1(cli), 1.0)[0])
    ans = C.decode(eng.receive("b", p3[0], 1.0)[0]).get(C.AuthAns)
    assert ans.auth_result == C.SecReturn.ERROR and eng.errors["NO_PENDING"] == 1 and not eng.members()


def test_cma_joins_a_pma_under_ks_and_a_dma_without_ks_cannot():
    ks = P.ProtKey(P.KeyRef.KS, b"k" * 16, 3)
    eng = engine(0, ks_lookup=lambda g: ks if g == 3 else None, ks_current=lambda: ks)
    cma = C.make_maid("127.0.0.3", 26032, 2)
    child = T.JoinClient(SID, cma, N.DMA, SUITE, os.urandom, ks=ks)
    run(child, eng)
    assert child.state == "joined" and eng.children()[cma].kmas == child.kmas and not eng.members()
    old = P.ProtKey(P.KeyRef.KS, b"o" * 16, 2)  # a truncated DMA holding an old Ks
    outcast = T.JoinClient(SID, C.make_maid("127.0.0.4", 26032, 3), N.DMA, SUITE, os.urandom, ks=old)
    assert eng.receive("o", outcast.start(), 1.0) == [] and eng.errors["KEY"] == 1
    assert len(eng.children()) == 1


# ------------------------------------------------------------------------ fuzzing
_GOOD: list[bytes] = []


def _good_messages() -> list[bytes]:
    if not _GOOD:
        t = VEC["transcripts"][0]
        _GOOD.extend(hx(s["bytes"]) for s in t["wire"] if s["from"] == "client")
    return _GOOD


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4),
       st.integers(0, 400), st.binary(max_size=40))
def test_fuzz_engine_never_crashes_and_never_admits(which, flips, cut, junk):
    t = VEC["transcripts"][0]
    eng = T.JoinEngine(SID, hx(t["maid_server"]), acl_lookup={hx(t["idc"]): hx(t["w"])}.get,
                       kg_source=lambda: (1, bytes(16)), suite=P.Suite(C.EnDecId(t["enc"]), C.AuthId(t["auth"])),
                       rand=os.urandom)
    m = bytearray(_good_messages()[which])
    for pos, val in flips:
        if pos < len(m):
            m[pos] = val
    data = bytes(m[:cut] if cut < len(m) and flips else m) + (junk if not flips else b"")
    for r in eng.receive("f", data, 1.0):
        C.decode(r)  # whatever it answers is a well-formed RELANS/PPROBANS in clear
    assert not eng.members() and eng.pending <= 1


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(["pass1", "pass3"]), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)),
                                                     min_size=1, max_size=4))
def test_fuzz_clients_reject_mutated_dma_messages(state, flips):
    t = VEC["transcripts"][0]
    src = hx(t["wire"][3 if state == "pass1" else 5]["bytes"])
    m = bytearray(src)
    for pos, val in flips:
        m[pos % len(m)] = val
    if bytes(m) == src:
        return
    cli = _client_at(t, state)
    try:
        cli.receive(bytes(m))
    except (C.Rmcp2Error, E.AnnexeError):
        pass
    assert cli.kg is None and cli.state in (state, "refused")
    j = J.Join(hx(t["session_id"]), hx(t["maid_client"]), hx(t["w"]), t["enc"], t["auth"],
               Script(hx(t["nonce"]), hx(t["xa"]), hx(t["rc"])))
    j.start()
    for k in range(1 if state == "pass1" else 2):
        j.receive(hx(t["wire"][1 + 2 * k]["bytes"]))
    assert j.receive(bytes(m)) is None
    assert j.kg is None and J.STATE_NAMES[j.state] in (state, "refused")


def test_one_run_per_maid_and_per_link():
    eng = engine(4)
    victim = host_rma(1)
    relreq1 = victim.receive(eng.receive("v", victim.start(), 1.0)[0])[0]
    p2 = eng.receive("v", relreq1, 1.0)[0]
    # an attacker replays the victim's pass 1 on its own link: it replaces the victim's run
    assert C.decode(eng.receive("a", relreq1, 1.1)[0]).get(C.AuthAns).auth_result == C.SecReturn.RETRANSMISSION_REQ
    assert eng.pending == 1
    p3 = victim.receive(p2)[0]
    assert C.decode(eng.receive("v", p3, 1.2)[0]).get(C.AuthAns).auth_result == C.SecReturn.ERROR
    assert eng.errors["NO_PENDING"] == 1 and eng.pending == 0
    # the victim simply joins again; the attacker gets nothing
    again = host_rma(1)
    run(again, eng, conn="v2", now=2.0)
    assert again.state == "joined" and list(eng.members()) == [rma_maid(1)]
    # a link holds one run: a second pass 1 on it (another MAID) replaces the first
    a, b = host_rma(2), host_rma(3)
    a.receive(eng.receive("x", a.start(), 3.0)[0])
    b.receive(eng.receive("x", b.start(), 3.0)[0])
    eng.receive("x", _relreq1(a), 3.0)
    eng.receive("x", _relreq1(b), 3.0)
    assert eng.pending == 1


def test_acl_index_from_the_agents_acl_entries():
    entries = frozenset(P.hashed_maid(SID, rma_maid(i)) + hk(i) for i in (1, 2))  # as Agent.acl (B.8)
    eng = T.JoinEngine(SID, DMA, acl_lookup=T.acl_index(entries).get, kg_source=lambda: (1, b"k" * 16),
                       suite=SUITE, rand=os.urandom)
    ok, stranger = host_rma(2), host_rma(3)
    run(ok, eng)
    run(stranger, eng, conn="s")
    assert ok.state == "joined" and stranger.fail == Fail.NOT_IN_ACL


def test_agent_acl_lookup_follows_hrsans_updates():
    class FakeAgent:  # the two fields of agent.Agent the lookup reads
        acl: frozenset = frozenset()
        acl_updates = 0

    ag = FakeAgent()
    look = T.agent_acl_lookup(ag)
    h1 = P.hashed_maid(SID, rma_maid(1))
    assert look(h1) is None
    ag.acl, ag.acl_updates = frozenset({h1 + hk(1)}), 1  # an HRSANS arrived
    assert look(h1) == hk(1)
    ag.acl, ag.acl_updates = frozenset(), 2  # the RMA left the session
    assert look(h1) is None
