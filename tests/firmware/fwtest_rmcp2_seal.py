# The host's RMCP-2 protection vectors (tests/vectors/rmcp2/envelope.json, keys.json)
# reproduced by the firmware envelope inside MicroPython (docs/rmcp2-profile.md B.5-B.7).
import gc

from tessera_fw.rmcp2 import seal as S  # first: compiling it needs the most heap

gc.collect()
from fwtest_scpm_util import iter_array  # noqa: E402
from mpytest import unhex, vectors  # noqa: E402
from tessera_fw.rmcp2.const import Rmcp2Error  # noqa: E402
from tessera_fw.rmcp2.msg import Decoder  # noqa: E402
from tessera_fw.rmcp2 import tree  # noqa: E402 (HASHED_MAID, probe proof)


def test_sealed_byte_for_byte_and_opened():
    env = S.Envelope()
    d = Decoder()
    n = 0
    for c in iter_array("rmcp2/envelope.json", "cases"):
        key = S.ProtKey(c["key_ref"], unhex(c["key"]), c["gen"])
        assert key.k_enc(c["enc"]) == unhex(c["k_enc"]), c["name"]
        assert S.hmac256(unhex(c["key"]), b"RMCP2-MAC", bytes((c["auth"],))) == unhex(c["k_mac"])
        plain = unhex(c["plain"])
        out = env.seal(plain, key, c["enc"], c["auth"], c["seq"], unhex(c["iv"]))
        assert bytes(out) == unhex(c["sealed"]), c["name"]
        w = S.Window()
        got = env.unseal(unhex(c["sealed"]), c["enc"], c["auth"], lambda m, r, g: key, lambda m, k: w)
        assert bytes(got) == plain, c["name"]
        assert w.high == c["seq"]
        assert d.decode(got) == plain[1]  # the opened message goes straight into the decoder
        n += 1
    assert n >= 40


def test_tampered_same_error_numbers():
    key = S.ProtKey(0x81, unhex(_tamper_key()))
    env = S.Envelope()
    seen = set()
    for c in iter_array("rmcp2/envelope.json", "tamper"):
        w = S.Window()
        if c["high"]:
            w.commit(c["high"])
        try:
            env.unseal(unhex(c["sealed"]), 1, 1, lambda m, r, g: key if r == 0x81 else None, lambda m, k: w)
            got = 0
        except Rmcp2Error as e:
            got = e.code
        assert got == c["error"], (c["tag"], got, c["error"])
        seen.add(got)
    assert 16 in seen and 17 in seen and 0 in seen


def _tamper_key():
    # "key_tamper" is a top-level string of envelope.json: read it without loading the file
    with open(_root() + "/tests/vectors/rmcp2/envelope.json", "rb") as f:
        head = f.read(2048)
    i = head.find(b'"key_tamper": "') + 15
    return head[i:i + 32].decode()


def _root():
    import mpytest

    return mpytest.ROOT


def test_key_derivations():
    v = vectors("rmcp2/keys.json")
    sid, maid = unhex(v["session_id"]), unhex(v["maid"])
    k = S.ktls(unhex(v["seed"]), sid, maid, unhex(v["nonce_c"]), unhex(v["cert"]))
    assert k == unhex(v["k_tls"])
    hk = S.hashed_ktls(k, sid)
    assert hk == unhex(v["hashed_ktls"])
    assert tree.hashed_maid(sid, maid) == unhex(v["hashed_maid"])
    assert tree.probe_proof(hk, sid, unhex(v["probe_nonce"])) == unhex(v["probe_proof"])


def test_window_each_seq_once():
    w = S.Window()
    ok = []
    seq = [5, 5, 3, 40, 8, 9, 39, 41, 41, 10, 1000, 969, 968, 1000, 999]
    for s in seq:
        try:
            w.check(s)
        except Rmcp2Error:
            continue
        w.commit(s)
        ok.append(s)
    assert ok == [5, 3, 40, 9, 39, 41, 10, 1000, 969, 999], ok
    for bad in (0, S.SEQ_MAX + 1):
        try:
            w.check(bad)
        except Rmcp2Error as e:
            assert e.code == 17
        else:
            raise AssertionError(bad)
