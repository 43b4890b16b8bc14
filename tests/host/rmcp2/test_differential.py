"""Differential fuzzing: the firmware codec and envelope (imported under CPython through
tessera.mpshim) and the host's, written independently, must agree on every input: the same
error number (profile B.12) or the same message, and the same protected bytes."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera import mpshim
from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P

from .test_fuzz import SUITES, messages

mpshim.install()
from tessera_fw.rmcp2 import msg as FW  # noqa: E402
from tessera_fw.rmcp2 import seal as FS  # noqa: E402
from tessera_fw.rmcp2.const import Rmcp2Error as FwError  # noqa: E402

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DEC = FW.Decoder()


def both(raw: bytes):
    try:
        host = C.decode(raw)
        h = 0
    except C.Rmcp2Error as e:
        host, h = None, int(e.code)
    try:
        DEC.decode(raw)
        f = 0
    except FwError as e:
        f = e.code
    assert h == f, (raw.hex(), h, f)
    if host is not None:
        assert DEC.count == len(host.controls) and DEC.skipped == host.skipped
        for k, c in enumerate(host.controls):
            assert raw[DEC.starts[k]:DEC.ends[k]] == c.encode()
    return h


@FAST
@given(messages().filter(lambda m: len(m.encode()) <= 1024))
def test_valid_messages_agree(m):
    assert both(m.encode()) == 0


@FAST
@given(messages().filter(lambda m: len(m.encode()) <= 1024), st.data())
def test_mutated_messages_agree(m, data):
    raw = bytearray(m.encode())
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
        if len(raw) >= 4 and data.draw(st.booleans()):
            raw[2:4] = len(raw).to_bytes(2, "big")
    both(bytes(raw))


@FAST
@given(st.sampled_from([0x02, 0x09, 0x0C, 0x21, 0x22, 0x23, 0x24, 0x26, 0x27, 0xA1, 0xA2, 0xA6, 0xB0, 0xB1]),
       st.sampled_from([1, 2, 3, 5]), st.lists(st.sampled_from(
           [0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x1A, 0x1C, 0x1F, 0x20, 0x21, 0x22, 0x23, 0x24, 0xC1, 0xC4,
            0xC6, 0xC7, 0x01, 0x81, 0x7E]), max_size=6), st.data())
def test_control_soup_agrees(t, nt, codes, data):
    """Plausible controls with random fields behind a valid header: the deep checks."""
    body = b""
    for code in codes:
        n = data.draw(st.sampled_from([2, 4, 8, 10, 36, data.draw(st.integers(0, 40))]))
        fields = bytes(data.draw(st.integers(0, 8)) if data.draw(st.booleans()) else data.draw(st.integers(0, 255))
                       for _ in range(max(n - 2, 0)))
        body += bytes((code, n)) + fields
        if code in (0x20, 0x24, 0x21, 0x23) and data.draw(st.booleans()):
            sub = data.draw(st.sampled_from([1, 2, 0x81]))
            payload = data.draw(st.binary(max_size=40))
            ln = data.draw(st.sampled_from([4 + len(payload), 3, 6, len(payload)]))
            body += bytes((sub,)) + ln.to_bytes(2, "big") + payload
    raw = bytes((0x40 | nt, t)) + (20 + len(body)).to_bytes(2, "big") + bytes(8) + b"\x07" * 8 + body
    both(raw[:1024])


@FAST
@given(st.binary(max_size=200))
def test_random_bytes_agree(data):
    both(data)


@FAST
@given(messages().filter(lambda m: len(m.encode()) <= 1024), st.sampled_from(SUITES), st.integers(1, P.SEQ_MAX),
       st.binary(min_size=16, max_size=16), st.sampled_from([P.KeyRef.KTLS, P.KeyRef.KMAS, P.KeyRef.KG]),
       st.data())
def test_envelopes_agree(m, suite, seq, iv, ref, data):
    raw = bytes(range(16))
    gen = 9 if ref == P.KeyRef.KG else 0
    hk, fk = P.ProtKey(ref, raw, gen), FS.ProtKey(int(ref), raw, gen)
    plain = m.encode()
    sealed = P.seal(plain, hk, suite, seq, iv)
    env = FS.Envelope()
    assert bytes(env.seal(plain, fk, int(suite.enc), int(suite.auth), seq, iv)) == sealed
    b = bytearray(sealed)
    if data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] ^= data.draw(st.integers(1, 255))
    try:
        h = P.unseal(bytes(b), suite, lambda mm, s: hk if (s.ref, s.gen) == (ref, gen) else None,
                     lambda mm, k: P.ReplayWindow())
        he = 0
    except C.Rmcp2Error as e:
        he = int(e.code)
    try:
        f = bytes(env.unseal(bytes(b), int(suite.enc), int(suite.auth),
                             lambda mm, r, g: fk if (r, g) == (int(ref), gen) else None, lambda mm, k: FS.Window()))
        fe = 0
    except FwError as e:
        fe = e.code
    assert he == fe
    if not he:
        assert f == h == plain


@FAST
@given(st.lists(st.one_of(st.integers(0, 120), st.integers(P.SEQ_MAX - 40, P.SEQ_MAX + 2)), max_size=80))
def test_replay_windows_agree(seqs):
    h, f = P.ReplayWindow(), FS.Window()
    for s in seqs:
        try:
            h.check(s)
            hok = True
        except C.Rmcp2Error:
            hok = False
        try:
            f.check(s)
            fok = True
        except FwError:
            fok = False
        assert hok == fok, (s, h.high)
        if hok:
            h.commit(s)
            f.commit(s)
        assert h.high == f.high
