"""The binary LTKM this project produces (layout v1), DRM profile only.

OMA BCAST defines the DRM-profile LTKM in Service and Content Protection 5.5, which is
not available here: this layout is Tessera's own (docs/bcast-profile.md). It delivers one
service or program key to a group of terminals, encrypted under the group's delivery
key (LTK) from the key store.

LTKM v1:
  version 1 (=0x01) | profile 1 (=0x01 DRM) | client_id 4 | data_id 2 | group_id 4 |
  ltk_id 4 | key_kind 1 (0x01 SEK, 0x02 PEK) | key_owner 4 (Super_CAS_id) |
  key_scope 2 (ECM_id) | key_id 4 | nonce 16 | key_len 1 | encrypted key | tag 16
AES-CTR under HMAC-SHA-256(LTK, b"tessera-ltkm-v1 enc")[:16]; tag = HMAC-SHA-256(
HMAC-SHA-256(LTK, b"tessera-ltkm-v1 mac")[:16], preceding bytes)[:16].
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from tessera.crypto import aes, mac
from tessera.simulcrypt.stkm import KeyKind, derive
from tessera.simulcrypt.tables import PROFILE_DRM, profile_of

VERSION = 1
_HEAD = struct.Struct(">BBIHIIBIHI")


class LtkmError(ValueError):
    pass


@dataclass
class Ltkm:
    client_id: int
    data_id: int
    group_id: int
    ltk_id: int
    key_kind: KeyKind
    key_owner: int
    key_scope: int
    key_id: int
    key: bytes = field(repr=False)


def build(m: Ltkm, ltk: bytes, nonce: bytes | None = None) -> bytes:
    if profile_of(m.client_id) != PROFILE_DRM:
        raise LtkmError("LTKMs are broadcast for the DRM profile only (BCAST 14.1.1.3.4)")
    nonce = nonce if nonce is not None else os.urandom(16)
    body = (_HEAD.pack(VERSION, 0x01, m.client_id, m.data_id, m.group_id, m.ltk_id, m.key_kind, m.key_owner,
                       m.key_scope, m.key_id) + nonce + bytes([len(m.key)])
            + aes.ctr_crypt(derive(ltk, b"tessera-ltkm-v1 enc"), nonce, m.key))
    return body + mac.hmac(derive(ltk, b"tessera-ltkm-v1 mac"), body)[:16]


def header(data: bytes) -> tuple[int, int, int, int]:
    """(client_id, data_id, group_id, ltk_id) without the key."""
    if len(data) < _HEAD.size or data[0] != VERSION:
        raise LtkmError("not a v1 LTKM")
    f = _HEAD.unpack_from(data)
    return f[2], f[3], f[4], f[5]


def parse(data: bytes, ltk: bytes) -> Ltkm:
    if len(data) < _HEAD.size + 16 + 1 + 16 or data[0] != VERSION:
        raise LtkmError("not a v1 LTKM")
    body, tag = data[:-16], data[-16:]
    if not mac.ct_equal(mac.hmac(derive(ltk, b"tessera-ltkm-v1 mac"), body)[:16], tag):
        raise LtkmError("LTKM tag mismatch")
    f = _HEAD.unpack_from(body)
    nonce = body[_HEAD.size:_HEAD.size + 16]
    n = body[_HEAD.size + 16]
    enc = body[_HEAD.size + 17:]
    if len(enc) != n:
        raise LtkmError("LTKM key length mismatch")
    key = aes.ctr_crypt(derive(ltk, b"tessera-ltkm-v1 enc"), nonce, enc)
    return Ltkm(f[2], f[3], f[4], f[5], KeyKind(f[6]), f[7], f[8], f[9], key)
