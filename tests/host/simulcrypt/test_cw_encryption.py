"""CW_encryption (project layout): v2 encrypts and authenticates the CWs of a CW_provision,
bound to the STKM stream and crypto-period; any change is rejected. v1 (no integrity) is
told apart by its first byte and refused unless the generator is configured for it."""
import hashlib
import hmac
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .conftest import DRM

from tessera.simulcrypt import engine as E
from tessera.simulcrypt import stkm
from tessera.simulcrypt.codec import parse
from tessera.simulcrypt.ecmg import StkmGenerator
from tessera.simulcrypt.tables import EE, EM, EP, Interface

VEC = json.loads((Path(__file__).resolve().parents[2] / "vectors" / "simulcrypt" / "cw_encryption.json").read_text())
CASES = {c["name"]: c for c in VEC["cases"]}
KEY = bytes(range(0x40, 0x50))
CTX = stkm.CwContext(DRM, 0x101, 7)
CWS = [(7, bytes(range(16, 32))), (8, bytes(range(32, 48)))]


def ctr(key, counter, data):
    e = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
    return e.update(data) + e.finalize()


def test_v2_vector_matches_the_documented_layout():
    """Recomputed from the text of docs/bcast-profile.md with hashlib/hmac and AES-CTR."""
    c = CASES["v2_aes_ctr_hmac"]
    key = bytes.fromhex(c["cwt_key"])
    cws = [(cp, bytes.fromhex(cw)) for cp, cw in c["cws"]]
    value = bytes.fromhex(c["cw_encryption"])
    k_enc = hmac.new(key, b"tessera-cwe-v2 enc", hashlib.sha256).digest()[:16]
    k_mac = hmac.new(key, b"tessera-cwe-v2 mac", hashlib.sha256).digest()[:16]
    assert value[0] == 0x02 and len(value) == 37 and value[1:5] == (1).to_bytes(4, "big")
    counter = value[5:21]
    enc = ctr(k_enc, counter, b"".join(cw for _, cw in cws))
    assert [bytes.fromhex(e) for e in c["encrypted_cws"]] == [enc[:16], enc[16:]]
    tagged = (b"tessera-cwe-v2" + struct.pack(">IHH", int(c["super_cas_id"], 16), c["ecm_id"], c["cp_number"])
              + value[:21] + bytes([2]) + b"".join(cp.to_bytes(2, "big") + b"\x10" + enc[16 * i:16 * i + 16]
                                                   for i, (cp, _) in enumerate(cws)))
    assert value[21:] == hmac.new(k_mac, tagged, hashlib.sha256).digest()[:16]
    # and the code agrees in both directions
    ctx = stkm.CwContext(int(c["super_cas_id"], 16), c["ecm_id"], c["cp_number"])
    assert stkm.seal_cws(key, 1, ctx, cws, counter=counter) == (value, [enc[:16], enc[16:]])
    assert stkm.open_cws(key, value, ctx, [(cp, enc[16 * i:16 * i + 16]) for i, (cp, _) in enumerate(cws)]) == \
        [cw for _, cw in cws]


def test_v1_vector_and_layouts_are_distinguishable():
    c = CASES["v1_aes_ctr_legacy"]
    value = bytes.fromhex(c["cw_encryption"])
    assert value[0] == 0x01 and len(value) == 21
    enc = [bytes.fromhex(e) for e in c["encrypted_cws"]]
    assert b"".join(enc) == ctr(KEY, value[5:21], b"".join(bytes.fromhex(cw) for _, cw in c["cws"]))
    assert stkm.cw_encryption_header(value) == (1, 1)
    assert stkm.cw_encryption_header(bytes.fromhex(CASES["v2_aes_ctr_hmac"]["cw_encryption"])) == (2, 1)
    pairs = list(zip([cp for cp, _ in CWS], enc))
    with pytest.raises(stkm.StkmError, match="no integrity"):
        stkm.open_cws(KEY, value, CTX, pairs)
    assert stkm.open_cws(KEY, value, CTX, pairs, accept_v1=True) == [cw for _, cw in CWS]
    for bad in (b"", b"\x03" + value[1:], value[:20], value + b"\x00", b"\x02" + value[1:]):
        with pytest.raises(stkm.StkmError, match="unsupported"):
            stkm.cw_encryption_header(bad)


def sealed():
    value, enc = stkm.seal_cws(KEY, 1, CTX, CWS)
    return value, [(cp, e) for (cp, _), e in zip(CWS, enc)]


def test_tampering_is_rejected():
    value, pairs = sealed()
    assert stkm.open_cws(KEY, value, CTX, pairs) == [cw for _, cw in CWS]
    flip = lambda b, i: b[:i] + bytes([b[i] ^ 1]) + b[i + 1:]
    attempts = {
        "CW bit": (value, [(7, flip(pairs[0][1], 3)), pairs[1]], CTX),
        "CP of a CW": (value, [(9, pairs[0][1]), pairs[1]], CTX),
        "CWs swapped": (value, [pairs[1], pairs[0]], CTX),
        "CW dropped": (value, pairs[:1], CTX),
        "counter": (flip(value, 10), pairs, CTX),
        "key_id": (flip(value, 4), pairs, CTX),
        "tag": (flip(value, 30), pairs, CTX),
        "other crypto-period": (value, pairs, stkm.CwContext(DRM, 0x101, 8)),
        "other stream": (value, pairs, stkm.CwContext(DRM, 0x102, 7)),
        "other KMS": (value, pairs, stkm.CwContext(DRM + 1, 0x101, 7)),
    }
    for name, (v, p, ctx) in attempts.items():
        with pytest.raises(stkm.StkmError, match="tag mismatch"):
            stkm.open_cws(KEY, v, ctx, p)
    with pytest.raises(stkm.StkmError):
        stkm.open_cws(bytes(16), value, CTX, pairs)  # wrong key


@settings(deadline=None, max_examples=200)
@given(st.data())
def test_any_bit_flip_is_rejected(data):
    value, pairs = sealed()
    blob = bytearray(value + b"".join(e for _, e in pairs))
    bit = data.draw(st.integers(0, len(blob) * 8 - 1))
    blob[bit // 8] ^= 1 << (bit % 8)
    v, rest = bytes(blob[:37]), bytes(blob[37:])
    with pytest.raises(stkm.StkmError):
        stkm.open_cws(KEY, v, CTX, [(7, rest[:16]), (8, rest[16:])])


def generator_answer(keystore, cwe, cws, accept_v1=False):
    """One CW_provision through a real generator (sans-IO connection); returns its answer."""
    gen = StkmGenerator(keystore, {DRM}, accept_cwe_v1=accept_v1)
    g, s = E.EcmgConnection(gen.core), E.ScsConnection(1, DRM)
    s.setup()
    g.receive_data(s.data_to_send())
    s.receive_data(g.data_to_send())
    s.stream_setup(1, 0x101, 10)
    g.receive_data(s.data_to_send())
    s.receive_data(g.data_to_send())
    s.cw_provision(1, 7, cws, cw_encryption=cwe,
                   access_criteria=stkm.AccessCriteria(stkm.Protection.SRTP, b"p").encode())
    [ev] = [e for e in g.receive_data(s.data_to_send()) if isinstance(e, E.CwProvision)]
    gen._provision(g, ev)
    return parse(Interface.ECMG, g.data_to_send())


def test_generator_rejects_tampered_cws(keystore):
    cwt = keystore.current("CWT", DRM, 0)
    clear = [(7, bytes(range(16))), (8, bytes(range(16, 32)))]
    value, enc = stkm.seal_cws(cwt.material, cwt.key_id, CTX, clear)
    ok = generator_answer(keystore, value, list(zip([7, 8], enc)))
    assert ok.type == EM.ECM_RESPONSE
    rec = stkm.parse(ok.get(EP.ECM_DATAGRAM), keystore.traffic_key(DRM, 0x101).material)
    assert rec.teks == clear
    bad = generator_answer(keystore, value, [(7, bytes([enc[0][0] ^ 0x80]) + enc[0][1:]), (8, enc[1])])
    assert bad.type == EM.STREAM_ERROR and bad.int(EP.ERROR_STATUS) == EE.INVALID_VALUE
    assert bad.get(EP.ERROR_INFORMATION) == b"\x00\x18"  # names CW_encryption; no key material in the answer
    # the legacy layout: refused by default, accepted when configured
    v1, enc1 = stkm.seal_cws_v1(cwt.material, cwt.key_id, [cw for _, cw in clear])
    old = generator_answer(keystore, v1, list(zip([7, 8], enc1)))
    assert old.type == EM.STREAM_ERROR and old.int(EP.ERROR_STATUS) == EE.INVALID_VALUE
    legacy = generator_answer(keystore, v1, list(zip([7, 8], enc1)), accept_v1=True)
    assert stkm.parse(legacy.get(EP.ECM_DATAGRAM), keystore.traffic_key(DRM, 0x101).material).teks == clear


def test_256_cws_with_v2_answered_invalid_value(keystore):
    """Issue 11 #8: 256 CWs under CW_encryption v2 made _cwe_tag raise ValueError (its CW
    count is one byte) and dropped the connection; now a stream_error invalid value naming
    CP_CW_combination."""
    cwt = keystore.current("CWT", DRM, 0)
    value, _ = stkm.seal_cws(cwt.material, cwt.key_id, CTX, CWS)
    many = [(i, bytes(16)) for i in range(256)]
    ans = generator_answer(keystore, value, many)
    assert ans.type == EM.STREAM_ERROR and ans.int(EP.ERROR_STATUS) == EE.INVALID_VALUE
    assert ans.get(EP.ERROR_INFORMATION) == int(EP.CP_CW_COMBINATION).to_bytes(2, "big")
    with pytest.raises(stkm.StkmError, match="at most 255"):
        stkm.open_cws(cwt.material, value, CTX, many)


def test_256_cws_over_tcp_keep_the_connection(keystore):
    """The same CW_provision through a served connection: answered, and the channel goes on."""
    import asyncio

    from .conftest import run

    async def main():
        gen = StkmGenerator(keystore, {DRM})
        await gen.start()
        r, w = await asyncio.open_connection("127.0.0.1", gen.port)
        s = E.ScsConnection(1, DRM)
        s.setup()
        w.write(s.data_to_send())

        async def answer():
            while True:
                data = await asyncio.wait_for(r.read(65536), 5)
                if not data:
                    raise ConnectionError("the generator dropped the connection")
                evs = s.receive_data(data)
                if evs:
                    return evs

        await answer()
        s.stream_setup(1, 0x101, 10)
        w.write(s.data_to_send())
        await answer()
        cwt = keystore.current("CWT", DRM, 0)
        value, _ = stkm.seal_cws(cwt.material, cwt.key_id, CTX, CWS)
        s.cw_provision(1, 7, [(i, bytes(16)) for i in range(256)], cw_encryption=value,
                       access_criteria=stkm.AccessCriteria(stkm.Protection.SRTP, b"p").encode())
        s.test()
        w.write(s.data_to_send())
        evs = await answer()
        while not any(isinstance(e, E.Alive) for e in evs):
            evs += await answer()
        w.close()
        await gen.close()
        return evs

    evs = run(main())
    [err] = [e for e in evs if isinstance(e, E.PeerError)]
    assert err.statuses == [EE.INVALID_VALUE]
    assert any(isinstance(e, E.Alive) for e in evs)  # channel_test still answered afterwards
