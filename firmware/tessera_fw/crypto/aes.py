# AES-128/256 on cryptolib: ECB and CBC are native; CTR is built from ECB because stock
# ESP32/RP2040 builds lack cryptolib mode 6 (see docs/ARCHITECTURE.md, "Crypto core").
try:
    import cryptolib
except ImportError:  # firmware older than v1.19
    import ucryptolib as cryptolib
from micropython import const

_MODE_ECB = const(1)
_MODE_CBC = const(2)
BLOCK = const(16)


class AESError(ValueError):
    pass


def _check(key, data):
    if len(key) not in (16, 32):
        raise AESError("key must be 16 or 32 bytes")
    if len(data) % BLOCK:
        raise AESError("data must be a multiple of 16 bytes")


def ecb_encrypt(key, data):
    _check(key, data)
    return cryptolib.aes(key, _MODE_ECB).encrypt(data)


def ecb_decrypt(key, data):
    _check(key, data)
    return cryptolib.aes(key, _MODE_ECB).decrypt(data)


def cbc_encrypt(key, iv, data, out=None):
    """Encrypt whole blocks; `out` (same length) avoids an allocation."""
    _check(key, data)
    if len(iv) != BLOCK:
        raise AESError("IV must be 16 bytes")
    c = cryptolib.aes(key, _MODE_CBC, iv)
    if out is None:
        return c.encrypt(data)
    c.encrypt(data, out)
    return out


def cbc_decrypt(key, iv, data, out=None):
    _check(key, data)
    if len(iv) != BLOCK:
        raise AESError("IV must be 16 bytes")
    c = cryptolib.aes(key, _MODE_CBC, iv)
    if out is None:
        return c.decrypt(data)
    c.decrypt(data, out)
    return out


class CTR:
    """AES-CTR keystream from ECB, big-endian increment of the whole 16-byte counter
    (NIST SP 800-38A, appendix B.1 standard incrementing function).

    Buffers are preallocated for `chunk` blocks; crypt() processes any length and may be
    called repeatedly to continue the stream."""

    def __init__(self, key, counter, chunk=8):
        if len(key) not in (16, 32):
            raise AESError("key must be 16 or 32 bytes")
        if len(counter) != BLOCK:
            raise AESError("counter must be 16 bytes")
        self._ecb = cryptolib.aes(key, _MODE_ECB)
        self._ctr = int.from_bytes(counter, "big")
        self._blocks = bytearray(BLOCK * chunk)
        self._stream = bytearray(BLOCK * chunk)
        self._chunk = chunk
        self._left = 0  # unused keystream bytes at the end of _stream

    def _refill(self):
        b = self._blocks
        c = self._ctr
        mask = (1 << 128) - 1
        for i in range(self._chunk):
            b[i * 16:i * 16 + 16] = c.to_bytes(16, "big")
            c = (c + 1) & mask
        self._ctr = c
        self._ecb.encrypt(b, self._stream)
        self._left = len(self._stream)

    def crypt(self, data, out=None):
        n = len(data)
        if out is None:
            out = bytearray(n)
        s = self._stream
        pos = 0
        while pos < n:
            if not self._left:
                self._refill()
            start = len(s) - self._left
            take = min(self._left, n - pos)
            # XOR a run at once through big integers: one C-level operation per run.
            x = int.from_bytes(data[pos:pos + take], "big") ^ int.from_bytes(s[start:start + take], "big")
            out[pos:pos + take] = x.to_bytes(take, "big")
            pos += take
            self._left -= take
        return out
