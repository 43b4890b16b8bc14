# Crypto core vectors (tests/vectors/crypto) reproduced by the firmware inside MicroPython.
from mpytest import raises, unhex, vectors

from tessera_fw.crypto import aes, dh, hmac


def test_aes_vectors():
    for c in vectors("crypto/aes.json")["cases"]:
        k, p, want = unhex(c["key"]), unhex(c["plaintext"]), unhex(c["ciphertext"])
        if c["mode"] == "ecb":
            assert aes.ecb_encrypt(k, p) == want, c["name"]
            assert aes.ecb_decrypt(k, want) == p, c["name"]
        elif c["mode"] == "cbc":
            iv = unhex(c["iv"])
            assert aes.cbc_encrypt(k, iv, p) == want, c["name"]
            assert aes.cbc_decrypt(k, iv, want) == p, c["name"]
            out = bytearray(len(p))
            aes.cbc_encrypt(k, iv, p, out)
            assert out == want, c["name"] + " (into buffer)"
        else:
            assert bytes(aes.CTR(k, unhex(c["counter"])).crypt(p)) == want, c["name"]


def test_ctr_streams_across_calls_and_chunks():
    c = vectors("crypto/aes.json")["cases"][3]
    k, p, want = unhex(c["key"]), unhex(c["plaintext"]), unhex(c["ciphertext"])
    ctr = aes.CTR(k, unhex(c["counter"]), chunk=1)  # refill every block
    got = bytes(ctr.crypt(p[:5])) + bytes(ctr.crypt(p[5:37])) + bytes(ctr.crypt(p[37:]))
    assert got == want


def test_ctr_counter_wraps_at_2_128():
    k = bytes(16)
    a = aes.CTR(k, b"\xff" * 16).crypt(bytes(32))
    assert bytes(a[16:]) == aes.ecb_encrypt(k, bytes(16))


def test_aes_rejects_bad_sizes():
    raises(aes.AESError, aes.ecb_encrypt, bytes(15), bytes(16))
    raises(aes.AESError, aes.ecb_encrypt, bytes(16), bytes(17))
    raises(aes.AESError, aes.cbc_encrypt, bytes(16), bytes(8), bytes(16))


def test_hmac_vectors():
    for c in vectors("crypto/hmac.json")["cases"]:
        if not hmac.available(c["hash"]):
            continue
        m = hmac.hmac(unhex(c["key"]), unhex(c["data"]), c["hash"])
        assert m == unhex(c["mac"]), c["name"]


def test_hmac_parts_equal_whole():
    h = hmac.HMAC(b"k" * 20, "sha256")
    assert h.digest(b"ab", memoryview(b"cdef")[1:], bytearray(b"g")) == h.digest(b"abdefg")


def test_ct_equal():
    assert hmac.ct_equal(b"abc", b"abc")
    assert not hmac.ct_equal(b"abc", b"abd")
    assert not hmac.ct_equal(b"abc", b"ab")


def test_dh_vector():
    v = vectors("crypto/dh.json")
    e = v["exchange"]
    a = dh.DH(unhex(e["secret_a"]))
    b = dh.DH(unhex(e["secret_b"]))
    assert a.public == unhex(e["public_a"])
    assert b.public == unhex(e["public_b"])
    assert a.shared(b.public) == unhex(e["shared"])
    assert b.shared(a.public) == unhex(e["shared"])


def test_dh_rejects_invalid_public_values():
    a = dh.DH()
    for c in vectors("crypto/dh.json")["invalid_public"]:
        raises(dh.DHError, a.shared, unhex(c["value"]))
