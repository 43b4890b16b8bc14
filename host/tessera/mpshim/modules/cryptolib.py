"""CPython stand-in for MicroPython's cryptolib (ECB = 1, CBC = 2), on `cryptography`.

Like the real module an object either encrypts or decrypts, keeps CBC state across calls,
and accepts an optional output buffer.
"""
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


class aes:  # noqa: N801 - mirrors the MicroPython name
    def __init__(self, key, mode, iv=None):
        if mode == 1:
            m = modes.ECB()
        elif mode == 2:
            m = modes.CBC(bytes(iv) if iv is not None else bytes(16))
        else:
            raise ValueError("mode")
        self._cipher = Cipher(algorithms.AES(bytes(key)), m)
        self._ctx = None
        self._dir = None

    def _run(self, direction, data, out):
        if self._dir is None:
            self._dir = direction
            self._ctx = self._cipher.encryptor() if direction == "e" else self._cipher.decryptor()
        elif self._dir != direction:
            raise OSError("cryptolib.aes object can only encrypt or decrypt")
        if len(data) % 16:
            raise ValueError("blksize")
        res = self._ctx.update(bytes(data))
        if out is None:
            return res
        out[: len(res)] = res
        return None

    def encrypt(self, data, out=None):
        return self._run("e", data, out)

    def decrypt(self, data, out=None):
        return self._run("d", data, out)
