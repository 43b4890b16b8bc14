"""Host SCPM codec against the vectors (tests/vectors/scpm) and the pinned error rules."""
import json
from pathlib import Path

import pytest

from tessera.scpm import codec as C

VEC = Path(__file__).resolve().parents[2] / "vectors" / "scpm"


def load(name):
    return json.loads((VEC / f"{name}.json").read_text())


def test_frame_vectors_seal_and_open_byte_for_byte():
    v = load("frames")
    assert len(v["cases"]) == 6 * 3 * 7
    for c in v["cases"]:
        key = C.UsageKey(bytes.fromhex(c["key"]))
        assert key.enc.hex() == c["k_enc"] and key.mac.hex() == c["k_mac"]
        shd = C.SecureHeader(C.Service(c["service"]), C.KeyKind(c["kind"]), c["index"], c["gen"])
        assert shd.encode().hex() == c["shd"]
        frame = C.seal(c["sa"], c["da"], shd, c["snf"], bytes.fromhex(c["padata"]), key)
        assert frame.hex() == c["frame"], c["name"]
        sf = C.decode(frame, c["da"])
        assert isinstance(sf, C.SecureFrame) and sf.snf == c["snf"] and sf.shd == shd
        assert C.open_frame(sf, key).hex() == c["padata"]
    for c in v["plain"]:
        assert C.encode_plain(c["sa"], c["da"], bytes.fromhex(c["padata"])).hex() == c["frame"]
        assert C.decode(bytes.fromhex(c["frame"]), c["da"]).padata.hex() == c["padata"]


def test_max_padata_and_one_more():
    key = C.UsageKey(bytes(16))
    for svc in C.Service:
        shd = C.SecureHeader(svc, C.KeyKind.USER)
        f = C.seal(1, 2, shd, 1, bytes(C.MAX_PADATA), key)
        assert C.open_frame(C.decode(f, 2), key) == bytes(C.MAX_PADATA)
        with pytest.raises(C.ScpmError) as e:
            C.seal(1, 2, shd, 1, bytes(C.MAX_PADATA + 1), key)
        assert e.value.code == C.ErrorCode.OVERSIZE


def test_pdu_vectors():
    v = load("pdus")
    for c in v["cases"]:
        p = C.decode_pdu(bytes.fromhex(c["padata"]))
        assert p.OP.name == c["op"] and p.txid == c["txid"]
        for name, want in c["fields"].items():
            got = getattr(p, name)
            assert (got.hex() if isinstance(got, bytes) else got) == want
        assert p.encode().hex() == c["padata"]
    for b in v["bad"]:
        with pytest.raises(C.ScpmError) as e:
            C.decode_pdu(bytes.fromhex(b["padata"]))
        assert e.value.code == b["error"], b


def test_snf_vectors():
    v = load("snf")
    for seq in v["sequences"]:
        w = C.ReplayWindow.restore(seq["reserved"]) if "reserved" in seq else C.ReplayWindow()
        for st in seq["steps"]:
            try:
                w.check(st["snf"])
                w.commit(st["snf"])
                got = 0
            except C.ScpmError as e:
                got = int(e.code)
            assert (got, w.high) == (st["result"], st["high"]), (seq["name"], st)


def test_corpus_decisions():
    v = load("corpus")
    assert len(v["cases"]) >= 300
    keys = {(k["peer"], k["kind"], k["index"], k["gen"]): C.UsageKey(bytes.fromhex(k["key"])) for k in v["keys"]}
    for c in v["cases"]:
        try:
            r = C.receive(bytes.fromhex(c["frame"]), v["me"],
                          lambda sa, shd: keys.get((sa, int(shd.kind), shd.index, shd.gen)),
                          lambda sa, shd: C.ReplayWindow())
            got, padata = 0, r.padata.hex()
        except C.ScpmError as e:
            got, padata = int(e.code), ""
        assert (got, padata) == (c["error"], c["padata"]), c["tag"]
    assert {c["error"] for c in v["cases"]} >= {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14}


@pytest.mark.parametrize("shd,code", [
    (b"\x21\x01\x10\x01", C.ErrorCode.SHD),  # version 2
    (b"\x15\x01\x10\x01", C.ErrorCode.SHD),  # reserved bit
    (b"\x10\x01\x10\x01", C.ErrorCode.SHD),  # service 0
    (b"\x11\x01\x50\x01", C.ErrorCode.SHD),  # kind 5
    (b"\x11\x01\x13\x01", C.ErrorCode.SHD),  # index on a user key
    (b"\x11\x01\x10\x00", C.ErrorCode.SHD),  # generation 0
    (b"\x11\x11\x10\x01", C.ErrorCode.ALGORITHM),  # service 1 with a cipher
    (b"\x13\x21\x10\x01", C.ErrorCode.ALGORITHM),  # unknown cipher id
    (b"\x12\x01\x10\x01", C.ErrorCode.ALGORITHM),
])
def test_shd_errors(shd, code):
    with pytest.raises(C.ScpmError) as e:
        C.SecureHeader.decode(shd)
    assert e.value.code == code


def test_step1_order():
    key = C.UsageKey(bytes(16))
    f = C.seal(1, 2, C.SecureHeader(C.Service.AUTH_CONF, C.KeyKind.USER), 1, b"hi", key)
    cases = [
        (f[:10], C.ErrorCode.TRUNCATED),
        (f + bytes(1200), C.ErrorCode.OVERSIZE),
        (b"\x12" + f[1:], C.ErrorCode.HEADER),
        (f[:-1], C.ErrorCode.LENGTH),
        (f[:11] + b"", C.ErrorCode.LENGTH),
        (C.encode_general(0x11, 1, 2, f[11:16]), C.ErrorCode.TRUNCATED),
        (C.encode_general(0x11, 1, 2, f[11:19] + bytes(20)), C.ErrorCode.TRUNCATED),
        (C.encode_general(0x11, 1, 2, f[11:19] + bytes(33)), C.ErrorCode.PADDING),
        (f, C.ErrorCode.NOT_FOR_ME),
    ]
    for frame, code in cases:
        with pytest.raises(C.ScpmError) as e:
            C.decode(frame, 3 if code == C.ErrorCode.NOT_FOR_ME else 2)
        assert e.value.code == code, code


def test_window_reservation_and_restore():
    w = C.ReplayWindow()
    assert w.commit(1) and w.reserved == 65
    assert not any(w.commit(s) for s in range(2, 65))
    assert w.commit(65) and w.reserved == 129  # reaching the reservation moves it (as on the device)
    r = C.ReplayWindow.restore(w.reserved)
    for s in (65, 100, 129):
        with pytest.raises(C.ScpmError):
            r.check(s)
    r.check(130)


def test_send_counter_never_reuses_across_restore():
    s = C.SendCounter()
    sent = [s.take()[0] for _ in range(70)]
    r = C.SendCounter.restore(s.reserved)
    assert r.take()[0] > max(sent)
    x = C.SendCounter(next=C.SNF_LIMIT)
    with pytest.raises(C.ScpmError) as e:
        x.take()
    assert e.value.code == C.ErrorCode.SNF_EXHAUSTED


def test_keys_never_in_repr_or_errors():
    raw = bytes.fromhex("00112233445566778899aabbccddeeff")
    k = C.UsageKey(raw)
    p = C.UserKeyInit(1, bytes(16), 1, raw, 1, raw)
    for text in (repr(k), repr(p), str(p)):
        assert raw.hex() not in text and "\\x00\\x11" not in text
