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
_MAX_CTR = (1 << 128) - 1


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
        self._ctr = int.from_bytes(counter, "big")  # counter of the next keystream block
        self._blocks = bytearray(BLOCK * chunk)
        self._stream = bytearray(BLOCK * chunk)
        self._chunk = chunk
        self._left = 0  # unused keystream bytes at the end of _stream
        # All `chunk` counter blocks in one big-integer expression, c*R + S, where R repeats
        # a 1 in every 128-bit lane and S holds 0, 1, 2, ... : a few C-level operations per
        # refill instead of a Python loop per block.
        r = s = 0
        for i in range(chunk):
            r = (r << 128) | 1
            s = (s << 128) | i
        self._rep = r
        self._steps = s

    def _refill(self):
        c = self._ctr
        n = self._chunk
        if c + n <= _MAX_CTR:
            self._blocks[:] = (c * self._rep + self._steps).to_bytes(BLOCK * n, "big")
        else:  # the counter wraps inside this chunk: lane by lane, modulo 2^128
            b = self._blocks
            for i in range(n):
                b[i * BLOCK:(i + 1) * BLOCK] = ((c + i) & _MAX_CTR).to_bytes(BLOCK, "big")
        self._ctr = (c + n) & _MAX_CTR
        self._ecb.encrypt(self._blocks, self._stream)
        self._left = len(self._stream)

    def crypt(self, data, out=None):
        n = len(data)
        if out is None:
            out = bytearray(n)
        s = self._stream
        mv = memoryview(data)
        sv = memoryview(s)
        pos = 0
        while pos < n:
            if not self._left:
                self._refill()
            start = len(s) - self._left
            take = min(self._left, n - pos)
            # XOR a run at once through big integers: one C-level operation per run.
            x = int.from_bytes(mv[pos:pos + take], "big") ^ int.from_bytes(sv[start:start + take], "big")
            out[pos:pos + take] = x.to_bytes(take, "big")
            pos += take
            self._left -= take
        return out
