"""The binary STKM this project produces (layout v1), and the CW_provision side data
(access_criteria TLV, CW_encryption) it is built from.

OMA BCAST defines the real STKM formats in Service and Content Protection 5.5 (DRM
profile) and 6.5 (Smartcard profile); that text is not available to this project, so
EVERY layout here is defined by Tessera, not by a standard. docs/bcast-profile.md is
the reference. All integers big-endian.

STKM v1:
  version 1 (=0x01) | profile 1 (0x01 DRM, 0x02 Smartcard) | Super_CAS_id 4 | ECM_id 2 |
  CP_number 2 | key_kind 1 (0x01 SEK, 0x02 PEK) | key_id 4 | protection 1 |
  tp_len 2 | traffic-protection params | ar_len 2 | access rule | nonce 16 |
  n_teks 1 | encrypted TEK block | tag 16
TEK block (before encryption): n x (CP_number 2 | tek_len 1 | TEK).
Encryption AES-CTR (initial counter = nonce) under k_enc, tag = first 16 bytes of
HMAC-SHA-256(k_mac, every preceding byte); k_enc/k_mac = HMAC-SHA-256(key, label)[:16]
with labels b"tessera-stkm-v1 enc" / b"tessera-stkm-v1 mac".
"""
from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass, field

from tessera.crypto import aes, mac

VERSION = 1
TAG_LEN = 16
NONCE_LEN = 16


class Protection(enum.IntEnum):
    """Traffic protection of the service (BCAST SP-4: IPsec, SRTP or ISMACryp); codes are ours."""
    IPSEC = 0x01
    SRTP = 0x02
    ISMACRYP = 0x03


class KeyKind(enum.IntEnum):
    SEK = 0x01
    PEK = 0x02


class StkmError(ValueError):
    """param: the SimulCrypt parameter_type the fault is in, when known (error_information)."""

    def __init__(self, detail: str, param: int | None = None) -> None:
        super().__init__(detail)
        self.param = param


def derive(key: bytes, label: bytes) -> bytes:
    return mac.hmac(key, label)[:16]


# ---- access_criteria TLV (ours): tag 1 | length 2 | value
AC_PROTECTION = 0x01
AC_TRAFFIC_PARAMS = 0x02
AC_ACCESS_RULE = 0x03


@dataclass
class AccessCriteria:
    protection: Protection
    traffic_params: bytes = b""
    access_rule: bytes = b""

    def encode(self) -> bytes:
        out = b""
        for tag, val in ((AC_PROTECTION, bytes([self.protection])), (AC_TRAFFIC_PARAMS, self.traffic_params),
                         (AC_ACCESS_RULE, self.access_rule)):
            out += struct.pack(">BH", tag, len(val)) + val
        return out

    @classmethod
    def decode(cls, data: bytes) -> AccessCriteria:
        fields: dict[int, bytes] = {}
        pos = 0
        while pos < len(data):
            if len(data) - pos < 3:
                raise StkmError("truncated access_criteria")
            tag, n = struct.unpack_from(">BH", data, pos)
            pos += 3
            if n > len(data) - pos:
                raise StkmError("access_criteria field runs past the end")
            fields[tag] = data[pos:pos + n]
            pos += n
        p = fields.get(AC_PROTECTION)
        if p is None or len(p) != 1 or p[0] not in set(Protection):
            raise StkmError("access_criteria lacks a valid protection type")
        return cls(Protection(p[0]), fields.get(AC_TRAFFIC_PARAMS, b""), fields.get(AC_ACCESS_RULE, b""))


# ---- CW_encryption (ours). The first byte is the layout:
#   v1 0x01: AES-CTR under the CWT key | key_id 4 | counter 16. Confidentiality only
#            (legacy; a generator refuses it unless accept_cwe_v1 is set).
#   v2 0x02: AES-CTR + HMAC-SHA-256, encrypt-then-MAC, separate derived keys:
#            0x02 | key_id 4 | counter 16 | tag 16
#            k_enc = HMAC-SHA-256(CWT, "tessera-cwe-v2 enc")[:16], k_mac likewise with "... mac";
#            the CWs of one CW_provision, concatenated in message order, are AES-CTR under
#            k_enc from the counter; tag = HMAC-SHA-256(k_mac, "tessera-cwe-v2" |
#            Super_CAS_id 4 | ECM_id 2 | CP_number 2 | 0x02 | key_id 4 | counter 16 | n 1 |
#            n x (CP 2 | len 1 | encrypted CW))[:16]
CWE_V1_AES_CTR = 0x01
CWE_V2_AES_CTR_HMAC = 0x02
CWE_LABEL = b"tessera-cwe-v2"
_CWE_LEN = {CWE_V1_AES_CTR: 21, CWE_V2_AES_CTR_HMAC: 37}


@dataclass(frozen=True)
class CwContext:
    """What the v2 tag binds the CWs to: the STKM stream and the crypto-period."""
    super_cas_id: int
    ecm_id: int
    cp_number: int


def crypt_cws(key: bytes, counter: bytes, cws: list[bytes]) -> list[bytes]:
    """AES-CTR over the CWs of one CW_provision, concatenated in message order (both ways)."""
    stream = aes.ctr_crypt(key, counter, b"".join(cws))
    out, pos = [], 0
    for cw in cws:
        out.append(stream[pos:pos + len(cw)])
        pos += len(cw)
    return out


def _cwe_tag(cwt: bytes, head: bytes, ctx: CwContext, enc: list[tuple[int, bytes]]) -> bytes:
    data = (CWE_LABEL + struct.pack(">IHH", ctx.super_cas_id, ctx.ecm_id, ctx.cp_number) + head + bytes([len(enc)])
            + b"".join(cp.to_bytes(2, "big") + bytes([len(cw)]) + cw for cp, cw in enc))
    return mac.hmac(derive(cwt, b"tessera-cwe-v2 mac"), data)[:TAG_LEN]


def seal_cws(cwt: bytes, key_id: int, ctx: CwContext, cws: list[tuple[int, bytes]],
             counter: bytes | None = None) -> tuple[bytes, list[bytes]]:
    """Encrypts and authenticates the (CP, CW) pairs of one CW_provision (layout v2).
    Returns the CW_encryption value and the encrypted CWs in the same order."""
    counter = counter if counter is not None else os.urandom(NONCE_LEN)
    if len(cws) > 255:
        raise StkmError("too many CWs for one CW_provision")
    enc = crypt_cws(derive(cwt, b"tessera-cwe-v2 enc"), counter, [cw for _, cw in cws])
    head = bytes([CWE_V2_AES_CTR_HMAC]) + key_id.to_bytes(4, "big") + counter
    return head + _cwe_tag(cwt, head, ctx, [(cp, e) for (cp, _), e in zip(cws, enc)]), enc


def seal_cws_v1(cwt: bytes, key_id: int, cws: list[bytes], counter: bytes | None = None) -> tuple[bytes, list[bytes]]:
    """The legacy layout v1 (no integrity), kept to talk to old SCSs in tests and migrations."""
    counter = counter if counter is not None else os.urandom(NONCE_LEN)
    return bytes([CWE_V1_AES_CTR]) + key_id.to_bytes(4, "big") + counter, crypt_cws(cwt, counter, cws)


def cw_encryption_header(value: bytes) -> tuple[int, int]:
    """(layout, CWT key_id) of a CW_encryption value, without any key."""
    if not value or _CWE_LEN.get(value[0]) != len(value):
        raise StkmError("unsupported CW_encryption layout")
    return value[0], int.from_bytes(value[1:5], "big")


def open_cws(cwt: bytes, value: bytes, ctx: CwContext, cws: list[tuple[int, bytes]], *,
             accept_v1: bool = False) -> list[bytes]:
    """Checks (v2) and decrypts the CWs of one CW_provision. A v2 tag that does not match
    (any CW, CP number, the stream, the crypto-period or the header altered) raises
    StkmError before anything is decrypted. v1 has no tag and is refused unless accept_v1."""
    layout, _ = cw_encryption_header(value)
    if len(cws) > 255:
        # the v2 tag counts the CWs in one byte (and an STKM carries at most 255 TEKs)
        raise StkmError(f"{len(cws)} CWs in one CW_provision: at most 255")
    counter = value[5:21]
    if layout == CWE_V1_AES_CTR:
        if not accept_v1:
            raise StkmError("CW_encryption layout 0x01 has no integrity protection; layout 0x02 required")
        return crypt_cws(cwt, counter, [cw for _, cw in cws])
    if not mac.ct_equal(_cwe_tag(cwt, value[:21], ctx, cws), value[21:]):
        raise StkmError("CW_encryption tag mismatch")
    return crypt_cws(derive(cwt, b"tessera-cwe-v2 enc"), counter, [cw for _, cw in cws])


@dataclass
class Stkm:
    profile: int
    super_cas_id: int
    ecm_id: int
    cp_number: int
    key_kind: KeyKind
    key_id: int
    protection: Protection
    traffic_params: bytes
    access_rule: bytes
    teks: list[tuple[int, bytes]] = field(repr=False)


_HEAD = struct.Struct(">BBIHHBIB")


def build(s: Stkm, key: bytes, nonce: bytes | None = None) -> bytes:
    nonce = nonce if nonce is not None else os.urandom(NONCE_LEN)
    if len(s.teks) > 255 or len(s.traffic_params) > 0xFFFF or len(s.access_rule) > 0xFFFF:
        raise StkmError("STKM field too large")
    block = b"".join(cp.to_bytes(2, "big") + bytes([len(t)]) + t for cp, t in s.teks)
    enc = aes.ctr_crypt(derive(key, b"tessera-stkm-v1 enc"), nonce, block)
    body = (_HEAD.pack(VERSION, s.profile, s.super_cas_id, s.ecm_id, s.cp_number, s.key_kind, s.key_id, s.protection)
            + struct.pack(">H", len(s.traffic_params)) + s.traffic_params
            + struct.pack(">H", len(s.access_rule)) + s.access_rule
            + nonce + bytes([len(s.teks)]) + enc)
    return body + mac.hmac(derive(key, b"tessera-stkm-v1 mac"), body)[:TAG_LEN]


def header(data: bytes) -> tuple[int, int, int, int, int, int]:
    """(profile, Super_CAS_id, ECM_id, CP_number, key_kind, key_id) without the key."""
    if len(data) < _HEAD.size or data[0] != VERSION:
        raise StkmError("not a v1 STKM")
    _, prof, scid, ecm_id, cp, kind, kid, _prot = _HEAD.unpack_from(data)
    return prof, scid, ecm_id, cp, kind, kid


def parse(data: bytes, key: bytes) -> Stkm:
    """Check the tag and decrypt (what a terminal of this profile would do)."""
    if len(data) < _HEAD.size + 4 + NONCE_LEN + 1 + TAG_LEN or data[0] != VERSION:
        raise StkmError("not a v1 STKM")
    body, tag = data[:-TAG_LEN], data[-TAG_LEN:]
    if not mac.ct_equal(mac.hmac(derive(key, b"tessera-stkm-v1 mac"), body)[:TAG_LEN], tag):
        raise StkmError("STKM tag mismatch")
    _, prof, scid, ecm_id, cp, kind, kid, prot = _HEAD.unpack_from(body)
    pos = _HEAD.size
    (n,) = struct.unpack_from(">H", body, pos)
    tp = body[pos + 2:pos + 2 + n]
    pos += 2 + n
    (n,) = struct.unpack_from(">H", body, pos)
    ar = body[pos + 2:pos + 2 + n]
    pos += 2 + n
    nonce = body[pos:pos + NONCE_LEN]
    count = body[pos + NONCE_LEN]
    block = aes.ctr_crypt(derive(key, b"tessera-stkm-v1 enc"), nonce, body[pos + NONCE_LEN + 1:])
    teks, p = [], 0
    for _ in range(count):
        if len(block) - p < 3:
            raise StkmError("truncated TEK block")
        cpn, ln = int.from_bytes(block[p:p + 2], "big"), block[p + 2]
        teks.append((cpn, block[p + 3:p + 3 + ln]))
        p += 3 + ln
    if p != len(block):
        raise StkmError("TEK block length mismatch")
    return Stkm(prof, scid, ecm_id, cp, KeyKind(kind), kid, Protection(prot), tp, ar, teks)
