"""HMAC and constant-time comparison.

HMAC-MD5 exists only because secure RMCP-2 (ITU-T X.603.1 Amd.1) mandates it; do not use
it elsewhere. New designs in this project use HMAC-SHA-256.
"""
from __future__ import annotations

import hmac as _hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _chmac

_HASHES = {"sha256": hashes.SHA256, "sha1": hashes.SHA1, "md5": hashes.MD5}


class MACError(ValueError):
    pass


def hmac(key: bytes, msg: bytes, hash_name: str = "sha256") -> bytes:
    try:
        algo = _HASHES[hash_name]()
    except KeyError:
        raise MACError(f"unsupported hash {hash_name!r}") from None
    h = _chmac.HMAC(key, algo)
    h.update(msg)
    return h.finalize()


def ct_equal(a: bytes, b: bytes) -> bool:
    """Constant-time equality for MAC values."""
    return _hmac.compare_digest(a, b)
