# Known-answer checks for the crypto core (FIPS-197 C.1, SP 800-38A F.2.1/F.5.1,
# RFC 4231 case 2, RFC 2202 case 2, and a DH agreement with short exponents).
from binascii import unhexlify as _u

from tessera_fw.crypto import aes, dh, hmac

_K = _u("2b7e151628aed2a6abf7158809cf4f3c")
_P1 = _u("6bc1bee22e409f96e93d7e117393172a")


def _eq(a, b, what):
    if bytes(a) != bytes(b):
        raise AssertionError(what)


def aes_ecb():
    _eq(aes.ecb_encrypt(_u("000102030405060708090a0b0c0d0e0f"), _u("00112233445566778899aabbccddeeff")),
        _u("69c4e0d86a7b0430d8cdb78070b4c55a"), "FIPS-197 C.1")


def aes_cbc():
    iv = _u("000102030405060708090a0b0c0d0e0f")
    c = aes.cbc_encrypt(_K, iv, _P1)
    _eq(c, _u("7649abac8119b246cee98e9b12e9197d"), "SP 800-38A F.2.1")
    _eq(aes.cbc_decrypt(_K, iv, c), _P1, "CBC round trip")


def aes_ctr():
    c = aes.CTR(_K, _u("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")).crypt(_P1)
    _eq(c, _u("874d6191b620e3261bef6864990db6ce"), "SP 800-38A F.5.1")


def hmac_sha256():
    _eq(hmac.hmac(b"Jefe", b"what do ya want for nothing?", "sha256"),
        _u("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"), "RFC 4231 2")


def hmac_sha1():
    _eq(hmac.hmac(b"Jefe", b"what do ya want for nothing?", "sha1"),
        _u("effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"), "RFC 2202 2")


def hmac_md5():
    if not hmac.available("md5"):
        return  # older RP2040 firmware; only RMCP-2 needs MD5
    _eq(hmac.hmac(b"Jefe", b"what do ya want for nothing?", "md5"),
        _u("750c783e6ab0b503eaa86e310a5db738"), "RFC 2202 2 (MD5)")


def dh_agree():
    a = dh.DH(bytes(31) + b"\x05" * 1)
    b = dh.DH()
    if a.shared(b.public) != b.shared(a.public):
        raise AssertionError("DH agreement")
    try:
        a.shared((1).to_bytes(dh.SIZE, "big"))
    except dh.DHError:
        return
    raise AssertionError("DH accepted y = 1")


CHECKS = (
    ("aes-ecb", aes_ecb),
    ("aes-cbc", aes_cbc),
    ("aes-ctr", aes_ctr),
    ("hmac-sha256", hmac_sha256),
    ("hmac-sha1", hmac_sha1),
    ("hmac-md5", hmac_md5),
    ("dh-group14", dh_agree),
)
