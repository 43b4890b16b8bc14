# HMAC (RFC 2104) over MicroPython hashlib, which has no copy(): the padded keys are kept
# and the inner/outer hashes are restarted for every message.
import hashlib

from micropython import const

from tessera_fw import ct_equal  # noqa: F401 - this module's public API as before

_BLOCK = const(64)  # SHA-1, SHA-256 and MD5 all use 64-byte blocks


class HMACError(ValueError):
    pass


def available(name):
    return hasattr(hashlib, name)


class HMAC:
    """`ipad`/`opad` are the padded keys (K xor 0x36.., K xor 0x5C..), public so that a hot
    path can restart the two hashes itself without a method call."""

    def __init__(self, key, hash_name="sha256"):
        h = getattr(hashlib, hash_name, None)
        if h is None:
            raise HMACError("hash not available on this board: " + hash_name)
        self._h = h
        if len(key) > _BLOCK:
            key = h(key).digest()
        ipad = bytearray(_BLOCK)
        opad = bytearray(_BLOCK)
        for i in range(_BLOCK):
            k = key[i] if i < len(key) else 0
            ipad[i] = k ^ 0x36
            opad[i] = k ^ 0x5C
        self.ipad = bytes(ipad)
        self.opad = bytes(opad)
        self.digest_size = len(h(b"").digest())

    def digest(self, *parts):
        """MAC over the concatenation of `parts` (bytes, bytearray or memoryview)."""
        h = self._h(self.ipad)
        for p in parts:
            h.update(p)
        inner = h.digest()
        h = self._h(self.opad)
        h.update(inner)
        return h.digest()


def hmac(key, msg, hash_name="sha256"):
    return HMAC(key, hash_name).digest(msg)
