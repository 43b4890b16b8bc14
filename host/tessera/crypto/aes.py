"""AES on `cryptography`. Whole-block ECB/CBC (callers pad) and CTR."""
from __future__ import annotations

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BLOCK = 16


class AESError(ValueError):
    pass


def _check(key: bytes, data: bytes, whole_blocks: bool = True) -> None:
    if len(key) not in (16, 32):
        raise AESError("key must be 16 or 32 bytes")
    if whole_blocks and len(data) % BLOCK:
        raise AESError("data must be a multiple of 16 bytes")


def _run(mode: modes.Mode, key: bytes, data: bytes, encrypt: bool) -> bytes:
    c = Cipher(algorithms.AES(key), mode)
    ctx = c.encryptor() if encrypt else c.decryptor()
    return ctx.update(data) + ctx.finalize()


def ecb_encrypt(key: bytes, data: bytes) -> bytes:
    _check(key, data)
    return _run(modes.ECB(), key, data, True)


def ecb_decrypt(key: bytes, data: bytes) -> bytes:
    _check(key, data)
    return _run(modes.ECB(), key, data, False)


def cbc_encrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    _check(key, data)
    if len(iv) != BLOCK:
        raise AESError("IV must be 16 bytes")
    return _run(modes.CBC(iv), key, data, True)


def cbc_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    _check(key, data)
    if len(iv) != BLOCK:
        raise AESError("IV must be 16 bytes")
    return _run(modes.CBC(iv), key, data, False)


def ctr_crypt(key: bytes, counter: bytes, data: bytes) -> bytes:
    """CTR with the 128-bit big-endian counter increment of SP 800-38A B.1."""
    _check(key, data, whole_blocks=False)
    if len(counter) != BLOCK:
        raise AESError("counter must be 16 bytes")
    return _run(modes.CTR(counter), key, data, True)
