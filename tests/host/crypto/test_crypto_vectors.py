"""The host crypto core reproduces tests/vectors/crypto byte for byte."""
import json
from pathlib import Path

import pytest

from tessera.crypto import aes, dh, mac

VEC = Path(__file__).resolve().parents[2] / "vectors" / "crypto"


def load(name):
    return json.loads((VEC / name).read_text())


@pytest.mark.parametrize("case", load("aes.json")["cases"], ids=lambda c: c["name"])
def test_aes(case):
    k, p, want = (bytes.fromhex(case[x]) for x in ("key", "plaintext", "ciphertext"))
    if case["mode"] == "ecb":
        assert aes.ecb_encrypt(k, p) == want
        assert aes.ecb_decrypt(k, want) == p
    elif case["mode"] == "cbc":
        iv = bytes.fromhex(case["iv"])
        assert aes.cbc_encrypt(k, iv, p) == want
        assert aes.cbc_decrypt(k, iv, want) == p
    else:
        assert aes.ctr_crypt(k, bytes.fromhex(case["counter"]), p) == want


@pytest.mark.parametrize("case", load("hmac.json")["cases"], ids=lambda c: c["name"])
def test_hmac(case):
    assert mac.hmac(bytes.fromhex(case["key"]), bytes.fromhex(case["data"]), case["hash"]) == bytes.fromhex(case["mac"])


def test_hmac_unknown_hash():
    with pytest.raises(mac.MACError):
        mac.hmac(b"k", b"m", "sha3")


def test_dh_vector():
    e = load("dh.json")["exchange"]
    a = dh.DH(bytes.fromhex(e["secret_a"]))
    b = dh.DH(bytes.fromhex(e["secret_b"]))
    assert a.public.hex() == e["public_a"]
    assert b.public.hex() == e["public_b"]
    assert a.shared(b.public).hex() == e["shared"]
    assert b.shared(a.public).hex() == e["shared"]


@pytest.mark.parametrize("case", load("dh.json")["invalid_public"], ids=lambda c: c["why"])
def test_dh_rejects(case):
    with pytest.raises(dh.DHError):
        dh.DH().shared(bytes.fromhex(case["value"]))


def test_dh_full_check_rejects_outside_subgroup():
    v = bytes.fromhex(load("dh.json")["outside_subgroup"]["value"])
    with pytest.raises(dh.DHError, match="subgroup"):
        dh.DH().shared(v)
    dh.DH().shared(v, full_check=False)  # the boards' range-only check lets it through


def test_dh_repr_hides_exponent():
    d = dh.DH(b"\x01" * 32)
    assert "01010101" not in repr(d)


def test_aes_errors():
    with pytest.raises(aes.AESError):
        aes.ecb_encrypt(b"short", bytes(16))
    with pytest.raises(aes.AESError):
        aes.cbc_encrypt(bytes(16), bytes(16), bytes(3))
