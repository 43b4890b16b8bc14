"""Property tests of the host RMCP-2 codec and envelope: arbitrary or mutated bytes only ever
give an Rmcp2Error, every valid message and protected message round-trips."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
N, M = C.NodeType, C.MsgType

maids = st.binary(min_size=8, max_size=8).filter(any)
sids = st.integers(0, 2**64 - 1)


def en(e):
    return st.sampled_from(list(e))


def capabs(cls, enum, top):
    return st.lists(st.tuples(en(enum), st.integers(1, top)), max_size=len(enum), unique_by=lambda t: t[0]).map(
        lambda xs: [cls(v, p) for v, p in xs])


ctl_key_info = st.builds(C.KeyInfo, en(C.KeyType), st.binary(max_size=64))
ctl_result = st.builds(C.ResultCtl, en(C.Result))
ctl_status = st.builds(C.Status, st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 255))
ctl_content_addr = st.builds(C.ContentAddr, st.integers(0, 65535), st.integers(0, 65535))
ma_auth = st.builds(C.MaAuth, st.integers(1, 3), st.binary(max_size=300))
delivers = [st.builds(C.GkMechDeliver, en(C.GkName)), st.builds(C.AuthMechDeliver, en(C.AuthName)),
            st.builds(C.ConEnDecDeliver, en(C.EnDecId)), st.builds(C.GkEnDecDeliver, en(C.EnDecId)),
            st.builds(C.AuthAlgDeliver, en(C.AuthId))]


@st.composite
def messages(draw, content_addr: bool = False):
    t = draw(en(M))
    rule = C.RULES[t]
    nt = draw(st.sampled_from(sorted(rule.nts)))
    ctl: list[C.Control] = []
    if t == M.SUBSREQ and nt == N.RMA and draw(st.booleans()):
        ctl.append(C.ServUserIdent(draw(st.binary(min_size=1, max_size=253))))
    elif t == M.RELREQ:
        ctl.append(C.Auth(ma_auth=draw(st.none() | ma_auth)))
    elif t == M.RELANS:
        res = draw(st.sampled_from([C.SecReturn.OK, C.SecReturn.ERROR, C.SecReturn.RETRANSMISSION_REQ]))
        key = draw(st.none() | st.builds(C.KeyMaterial, en(C.KeyType), st.binary(max_size=100)))
        ctl.append(C.AuthAns(res, key, draw(st.none() | ma_auth)))
        if draw(st.booleans()):
            ctl.append(draw(ctl_key_info))
    elif t == M.SECAGREQ:
        if nt == N.SMA:
            ctl.append(C.SmaPropose(draw(en(C.GpAttribute)), draw(en(C.GkMecha)), draw(en(C.EnDecId))))
        if nt != N.RMA:
            ctl += draw(capabs(C.GkMechCapab, C.GkName, 6)) + draw(capabs(C.EnDecCapab, C.EnDecId, 5)) + \
                draw(capabs(C.AuthAlgCapab, C.AuthId, 3))
    elif t == M.SECLIST:
        ctl += [C.GkMech(draw(en(C.GpAttribute)), draw(en(C.GkMecha)), draw(en(C.GkName))), C.AuthMech(),
                C.ConEnDecAlg(draw(en(C.EnDecId))), C.GkEnDecAlg(draw(en(C.EnDecId))), C.AuthAlg(draw(en(C.AuthId)))]
    elif t in (M.SECALGREQ, M.SECALGANS):
        idx = draw(st.lists(st.integers(0, 4), min_size=1, max_size=5, unique=True))
        for i in idx:
            ctl.append(draw(delivers[i]))
            if t == M.SECALGANS:
                ctl.append(C.DeliverResultCtl(draw(en(C.DeliverResult))))
    elif t == M.SECAGANS:
        ctl.append(C.SecReturnCtl(draw(en(C.SecReturn))))
    elif t == M.KEYDELIVER:
        kt = {N.SM: C.KeyType.KS, N.DMA: C.KeyType.KG, N.SMA: C.KeyType.KC}[nt]
        ctl.append(C.KeyInfo(kt, draw(st.binary(max_size=2048))))
    elif t == M.HRSANS:
        ctl.append(C.AclList(tuple(draw(st.lists(st.binary(min_size=32, max_size=32), max_size=20)))))
    elif t == M.PPROBREQ and nt == N.RMA:
        ctl.append(C.ProbeAuth(draw(st.binary(min_size=16, max_size=16)), draw(st.binary(min_size=8, max_size=8)),
                               draw(st.binary(min_size=8, max_size=8))))
    elif t == M.HLEAVE:
        ctl += [C.Candidate(m) for m in draw(st.lists(maids, max_size=8))]
    elif t == M.KTLSREQ:
        ctl.append(C.KtlsNonce(draw(st.binary(min_size=16, max_size=16))))
    elif t == M.KTLSANS:
        ctl.append(C.KtlsSeed(draw(st.binary(min_size=32, max_size=32))))
    else:
        if C.CtlType.RESULT in rule.mandatory:
            ctl.append(draw(ctl_result))
        if C.CtlType.STATUS in rule.mandatory | rule.optional and (C.CtlType.STATUS in rule.mandatory
                                                                     or draw(st.booleans())):
            ctl.append(draw(ctl_status))
    # CONTENT_ADDR (B.4) rides on HB / PPROBREQ; off for the differential tests, as a board decoder
    # may skip 0xC8 as an unknown control (B.2): its own tests are below
    if content_addr and t in (M.HB, M.PPROBREQ) and draw(st.booleans()):
        ctl.append(draw(ctl_content_addr))
    if t not in (M.SECALGANS,):
        ctl = draw(st.permutations(ctl))  # decoders accept any order (B.2)
    return C.Message(t, nt, draw(sids), draw(maids), tuple(ctl))


def run(data: bytes):
    try:
        return C.decode(data)
    except C.Rmcp2Error as e:
        assert isinstance(e.code, C.ErrorCode)
        return e.code


@FAST
@given(messages(content_addr=True))
def test_round_trip(m):
    raw = m.encode()
    assert C.decode(raw) == m
    assert len(raw) == int.from_bytes(raw[2:4], "big")


@FAST
@given(st.binary(max_size=600))
def test_random_bytes_only_rmcp2_errors(data):
    run(data)


@FAST
@given(en(M), st.sampled_from([1, 2, 3, 5]), st.binary(max_size=400))
def test_random_controls_behind_a_valid_header(t, nt, body):
    raw = bytes((0x40 | nt, t)) + (20 + len(body)).to_bytes(2, "big") + bytes(8) + b"\x01" * 8 + body
    r = run(raw)
    if isinstance(r, C.Message):  # whatever decodes re-encodes to a message that decodes the same
        assert C.decode(r.encode()) == r


@FAST
@given(messages(content_addr=True), st.data())
def test_mutation_and_truncation(m, data):
    raw = bytearray(m.encode())
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(raw) - 1))
        assert isinstance(run(bytes(raw[:cut])), C.ErrorCode)  # Length no longer matches
        return
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    r = run(bytes(raw))
    if isinstance(r, C.Message):
        assert C.decode(r.encode()) == r


SUITES = [P.BOOTSTRAP, P.Suite(C.EnDecId.AES_CTR_128, C.AuthId.HMAC_SHA1),
          P.Suite(C.EnDecId.AES_CBC_128, C.AuthId.HMAC_MD5), P.Suite(C.EnDecId.AES_CTR_128, C.AuthId.HMAC_MD5)]
KEY = P.ProtKey(P.KeyRef.KS, bytes(range(16)), 3)


def _open(raw: bytes, suite, win):
    return P.unseal(raw, suite, lambda m, s: KEY if (s.ref, s.gen) == (KEY.ref, KEY.gen) else None, lambda m, k: win)


@FAST
@given(messages().filter(lambda m: len(m.encode()) < 60000), st.sampled_from(SUITES),
       st.integers(1, P.SEQ_MAX), st.binary(min_size=16, max_size=16), st.data())
def test_envelope_round_trip_and_any_change_is_refused(m, suite, seq, iv, data):
    plain = m.encode()
    sealed = bytearray(P.seal(plain, KEY, suite, seq, iv))
    assert _open(bytes(sealed), suite, P.ReplayWindow()) == plain
    i = data.draw(st.integers(0, len(sealed) - 1))
    sealed[i] ^= data.draw(st.integers(1, 255))
    try:
        _open(bytes(sealed), suite, P.ReplayWindow())
    except C.Rmcp2Error:
        return
    raise AssertionError(f"byte {i} changed and accepted")


@FAST
@given(st.binary(max_size=300))
def test_envelope_garbage(data):
    try:
        _open(data, P.BOOTSTRAP, P.ReplayWindow())
    except C.Rmcp2Error as e:
        assert isinstance(e.code, C.ErrorCode)


@FAST
@given(st.lists(st.integers(1, 200), max_size=60))
def test_window_accepts_each_seq_at_most_once(seq):
    w, ok = P.ReplayWindow(), []
    for s in seq:
        try:
            w.check(s)
        except C.Rmcp2Error:
            continue
        w.commit(s)
        ok.append(s)
    assert len(ok) == len(set(ok)) and w.high == max(ok, default=0)
    assert all(s > w.high - 32 or s in ok for s in ok)


# ---------------------------------------------------------------- CONTENT_ADDR (B.4, 0xC8)
@FAST
@given(st.sampled_from([(M.HB, N.RMA), (M.HB, N.DMA), (M.PPROBREQ, N.DMA)]), st.integers(0, 65535),
       st.integers(0, 65535), sids, maids)
def test_content_addr_round_trip(tn, udp, tcp, sid, maid):
    m = C.Message(tn[0], tn[1], sid, maid, (C.ContentAddr(udp, tcp),))
    raw = m.encode()
    assert raw[20:] == bytes((0xC8, 8, 0, 0)) + udp.to_bytes(2, "big") + tcp.to_bytes(2, "big")
    assert C.decode(raw) == m and C.decode(raw).get(C.ContentAddr) == C.ContentAddr(udp, tcp)


def _with_ctl(t: C.MsgType, nt: C.NodeType, ctl: bytes, *base: C.Control) -> bytes:
    head = C.Message(t, nt, 1, b"\x01" * 8, base).encode()
    raw = bytearray(head + ctl)
    raw[2:4] = len(raw).to_bytes(2, "big")
    return bytes(raw)


@FAST
@given(st.binary(min_size=6, max_size=6), st.integers(2, 40))
def test_content_addr_rejects(body, ln):
    """Reserved not zero -> VALUE; a Length other than 8 -> CONTROL_LENGTH; in a message that does not
    carry it -> UNEXPECTED_CONTROL; twice -> DUPLICATE_CONTROL."""
    raw = _with_ctl(M.HB, N.RMA, bytes((0xC8, 8)) + body)
    got = run(raw)
    if body[:2] != b"\x00\x00":
        assert got == C.ErrorCode.VALUE
    else:
        assert got.get(C.ContentAddr).udp == int.from_bytes(body[2:4], "big")
    if ln != 8:
        assert run(_with_ctl(M.HB, N.RMA, bytes((0xC8, ln)) + bytes(ln - 2))) == C.ErrorCode.CONTROL_LENGTH
    ok = bytes((0xC8, 8, 0, 0)) + body[2:]
    assert run(_with_ctl(M.HB, N.RMA, ok + ok)) == C.ErrorCode.DUPLICATE_CONTROL
    assert run(_with_ctl(M.LEAVREQ, N.RMA, ok, C.ResultCtl(C.Result.LEAVE_NORMAL))) == C.ErrorCode.UNEXPECTED_CONTROL


def test_content_addr_contract_example():
    """The contract's example (B.4): UDP 40000, TCP 40001 -> c8 08 00 00 9c 40 9c 41."""
    assert C.ContentAddr(40000, 40001).encode() == bytes.fromhex("c80800009c409c41")
