"""Diffie-Hellman over the RFC 3526 2048-bit MODP group (group 14, g = 2).

Exponents are short (256 bits by default, as on the boards: >= 2x the group's 112-bit
strength, NIST SP 800-56A). Public values are validated fully on the host: the range
2 <= y <= p-2 (RFC 2631 2.1.5) and membership of the prime-order subgroup,
y^q = 1 mod p with q = (p-1)/2 (boards only do the range check: the subgroup check is a
full-length exponentiation). The exchange itself runs in `cryptography`.
"""
from __future__ import annotations

import secrets
import warnings

from cryptography.hazmat.primitives.asymmetric import dh as _dh

P = int(
    "ffffffffffffffffc90fdaa22168c234c4c6628b80dc1cd129024e088a67cc74"
    "020bbea63b139b22514a08798e3404ddef9519b3cd3a431b302b0a6df25f1437"
    "4fe1356d6d51c245e485b576625e7ec6f44c42e9a637ed6b0bff5cb6f406b7ed"
    "ee386bfb5a899fa5ae9f24117c4b1fe649286651ece45b3dc2007cb8a163bf05"
    "98da48361c55d39a69163fa8fd24cf5f83655d23dca3ad961c62f356208552bb"
    "9ed529077096966d670c354e4abc9804f1746c08ca18217c32905e462e36ce3b"
    "e39e772c180e86039b2783a2ec07a28fb5c55df06f4c52c9de2bcbf695581718"
    "3995497cea956ae515d2261898fa051015728e5a8aacaa68ffffffffffffffff",
    16,
)
G = 2
Q = (P - 1) // 2
SIZE = 256
EXP_BITS = 256


class DHError(ValueError):
    pass


def _params() -> _dh.DHParameterNumbers:
    return _dh.DHParameterNumbers(P, G)


def check_public(y: int, full: bool = True) -> None:
    if not 2 <= y <= P - 2:
        raise DHError("DH public value out of range")
    if full and pow(y, Q, P) != 1:
        raise DHError("DH public value not in the prime-order subgroup")


def decode_public(b: bytes, full: bool = True) -> int:
    if len(b) != SIZE:
        raise DHError("DH public value must be 256 bytes")
    y = int.from_bytes(b, "big")
    check_public(y, full)
    return y


class DH:
    """One side of an exchange; `secret` fixes the exponent (test vectors only)."""

    def __init__(self, secret: bytes | None = None, exp_bits: int = EXP_BITS) -> None:
        if secret is None:
            secret = secrets.token_bytes(exp_bits // 8)
        x = int.from_bytes(secret, "big")
        if x < 2:
            raise DHError("DH exponent too small")
        y = pow(G, x, P)
        with warnings.catch_warnings():
            # cryptography marks FFDH deprecated; SCPM needs group 14, kept here only.
            warnings.simplefilter("ignore")
            pn = _params()
            self._key = _dh.DHPrivateNumbers(x, _dh.DHPublicNumbers(y, pn)).private_key()
        self.public_int = y
        self.public = y.to_bytes(SIZE, "big")

    def shared(self, peer_public: bytes, full_check: bool = True) -> bytes:
        y = decode_public(peer_public, full_check)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peer = _dh.DHPublicNumbers(y, _params()).public_key()
            z = self._key.exchange(peer)
        return z.rjust(SIZE, b"\0")

    def __repr__(self) -> str:  # never show the exponent
        return f"<DH group14 public={self.public[:4].hex()}...>"
