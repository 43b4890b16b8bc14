# Finite-field Diffie-Hellman on the RFC 3526 2048-bit MODP group (group 14, g = 2) with
# short exponents: a 256-bit secret gives ~128-bit work against the discrete log while
# costing about 1/8 of a full-length exponent (NIST SP 800-56A: >= 2x the 112-bit strength).
import os
from micropython import const

P_HEX = (
    "ffffffffffffffffc90fdaa22168c234c4c6628b80dc1cd129024e088a67cc74"
    "020bbea63b139b22514a08798e3404ddef9519b3cd3a431b302b0a6df25f1437"
    "4fe1356d6d51c245e485b576625e7ec6f44c42e9a637ed6b0bff5cb6f406b7ed"
    "ee386bfb5a899fa5ae9f24117c4b1fe649286651ece45b3dc2007cb8a163bf05"
    "98da48361c55d39a69163fa8fd24cf5f83655d23dca3ad961c62f356208552bb"
    "9ed529077096966d670c354e4abc9804f1746c08ca18217c32905e462e36ce3b"
    "e39e772c180e86039b2783a2ec07a28fb5c55df06f4c52c9de2bcbf695581718"
    "3995497cea956ae515d2261898fa051015728e5a8aacaa68ffffffffffffffff"
)
P = int(P_HEX, 16)
G = const(2)
SIZE = const(256)  # bytes in a public value or shared secret
EXP_BITS = const(256)


class DHError(ValueError):
    pass


def check_public(y):
    """Reject degenerate public values (RFC 2631 2.1.5 range check): 2 <= y <= p-2.
    y = 0, 1 or p-1 would force the shared secret into {0, 1, p-1}."""
    if not 2 <= y <= P - 2:
        raise DHError("DH public value out of range")


def decode_public(b):
    if len(b) != SIZE:
        raise DHError("DH public value must be 256 bytes")
    y = int.from_bytes(b, "big")
    check_public(y)
    return y


class DH:
    """One side of an exchange. `secret` (bytes) fixes the exponent for test vectors;
    otherwise EXP_BITS random bits come from os.urandom (hardware RNG on ESP32/RP2040)."""

    def __init__(self, secret=None, exp_bits=EXP_BITS):
        if secret is None:
            secret = os.urandom(exp_bits // 8)
        x = int.from_bytes(secret, "big")
        if x < 2:
            raise DHError("DH exponent too small")
        self._x = x
        self.public_int = pow(G, x, P)
        self.public = self.public_int.to_bytes(SIZE, "big")

    def shared(self, peer_public):
        y = decode_public(peer_public)
        z = pow(y, self._x, P)
        if z < 2:  # cannot happen for a valid y and x < q, kept as a last guard
            raise DHError("degenerate DH shared secret")
        return z.to_bytes(SIZE, "big")

    def forget(self):
        self._x = 0
