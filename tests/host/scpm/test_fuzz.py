"""Property tests of the host decoder: garbage, truncation and mutation only ever give an
ScpmError (never another exception), and every valid frame and PDU round-trips."""
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.scpm import codec as C

KEYS = {(k, i, g): C.UsageKey(bytes([k * 16 + i + g]) * 16) for k, i, g in
        [(0, 0, 1), (1, 0, 1), (2, 0, 1), (2, 7, 3), (3, 0, 1), (4, 0, 2)]}
ME, PEER = 0x0A000002, 1
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shds = st.builds(lambda svc, kik: C.SecureHeader(svc, C.KeyKind(kik[0]), kik[1], kik[2]),
                 st.sampled_from(list(C.Service)), st.sampled_from(sorted(KEYS)))


def run(frame: bytes):
    try:
        return C.receive(frame, ME, lambda sa, shd: KEYS.get((int(shd.kind), shd.index, shd.gen)) if sa == PEER else None,
                         lambda sa, shd: C.ReplayWindow())
    except C.ScpmError as e:
        assert isinstance(e.code, C.ErrorCode)
        return e.code


@FAST
@given(st.binary(max_size=1200))
def test_random_bytes_only_scpm_errors(data):
    run(data)


@FAST
@given(st.binary(max_size=1200))
def test_random_adata_behind_a_valid_header(adata):
    r = run(bytes([0x11]) + PEER.to_bytes(4, "big") + ME.to_bytes(4, "big") + len(adata).to_bytes(2, "big") + adata)
    assert isinstance(r, (C.ErrorCode, C.Received))


@FAST
@given(shds, st.integers(1, C.SNF_LIMIT - 1), st.binary(max_size=C.MAX_PADATA))
def test_round_trip(shd, snf, padata):
    key = KEYS[(int(shd.kind), shd.index, shd.gen)]
    r = run(C.seal(PEER, ME, shd, snf, padata, key))
    assert isinstance(r, C.Received) and r.padata == padata and r.snf == snf and r.authority == int(shd.kind)


@FAST
@given(shds, st.binary(max_size=64), st.data())
def test_mutation_and_truncation_detected(shd, padata, data):
    frame = bytearray(C.seal(PEER, ME, shd, 5, padata, KEYS[(int(shd.kind), shd.index, shd.gen)]))
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(frame) - 1))
        r = run(bytes(frame[:cut]))
        assert isinstance(r, C.ErrorCode)
        return
    i = data.draw(st.integers(0, len(frame) - 1))
    frame[i] ^= data.draw(st.integers(1, 255))
    r = run(bytes(frame))
    if i == 0 and frame[0] == C.HD_PLAIN:
        # HD 0x11 -> 0x10 is a well-formed plain frame: it carries authority 0 only (6.5).
        assert isinstance(r, C.Received) and r.shd is None and r.authority == 0
    elif shd.service == C.Service.CONF:
        # Service 2 has no MDAS (profile 7.2.6): a flip inside the ciphertext may go
        # unnoticed by BCC with probability ~2^-16; everything else is caught.
        assert isinstance(r, (C.ErrorCode, C.Received))
        if isinstance(r, C.Received):
            assert i >= 19
    else:
        assert isinstance(r, C.ErrorCode)


pdu_strats = st.one_of(
    st.builds(C.EnrolChallenge, st.integers(0, 65535), st.binary(min_size=16, max_size=16)),
    st.builds(C.MkuStart, st.integers(0, 65535), st.integers(1, 255), st.binary(min_size=16, max_size=16),
              st.binary(min_size=256, max_size=256)),
    st.builds(C.SyncResp, st.integers(0, 65535), st.binary(min_size=16, max_size=16), st.integers(0, 255),
              st.integers(0, 255), st.integers(0, 65535)),
    st.builds(C.AppSet, st.integers(0, 65535), st.integers(0, 255), st.binary(max_size=C.MAX_PADATA - 4)),
    st.builds(C.AppResult, st.integers(0, 65535), st.integers(0, 255), st.integers(0, 255), st.binary(max_size=100)),
)


@FAST
@given(pdu_strats)
def test_pdu_round_trip(p):
    assert C.decode_pdu(p.encode()) == p


@FAST
@given(st.binary(max_size=1100))
def test_pdu_garbage(data):
    try:
        C.decode_pdu(data)
    except C.ScpmError as e:
        assert e.code in (C.ErrorCode.MALFORMED, C.ErrorCode.UNKNOWN_OP, C.ErrorCode.OVERSIZE)


@FAST
@given(st.lists(st.integers(0, 200), max_size=60))
def test_window_accepts_each_snf_at_most_once(seq):
    w, accepted = C.ReplayWindow(), []
    for s in seq:
        try:
            w.check(s)
        except C.ScpmError:
            continue
        w.commit(s)
        accepted.append(s)
    assert len(accepted) == len(set(accepted)) and 0 not in accepted
    assert w.high == max(accepted, default=0)
