"""Message protection envelope and key derivations (docs/rmcp2-profile.md B.5-B.7).

Everything in this module is **defined by this project**: the amendment says which key
protects which message (Table 11) but not how. `seal` turns a plain encoded message into a
protected one; `unseal` checks it in the order of B.7 and gives back the plain message
bytes for `codec.decode`. Failures are `Rmcp2Error` with codes 14-18 (or the header codes).
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable

from tessera.crypto import aes
from tessera.crypto.mac import ct_equal, hmac
from tessera.rmcp2.codec import HEADER_LEN, AuthId, EnDecId, ErrorCode, Rmcp2Error, check_header, decode

SEC_LEN = 8  # KeyRef EncAlg AuthAlg KeyGen Seq(4)
IV_LEN = 16
TAG_LEN = 16
OVERHEAD = SEC_LEN + IV_LEN + TAG_LEN
SEQ_MAX = 0x3FFFFFFF  # B.7: keeps it a small int on a board
WINDOW = 32
_HASH = {AuthId.HMAC_SHA1: "sha1", AuthId.HMAC_MD5: "md5"}


class KeyRef(IntEnum):
    """B.7 KeyRef (Table 25 values for Ks/Kg/Kc, project values for the others)."""

    KS = 0x01
    KG = 0x02
    KC = 0x03
    KTLS = 0x81
    KMAS = 0x82
    HASHED_KTLS = 0x83


GENERATIONAL = (KeyRef.KS, KeyRef.KG, KeyRef.KC)


@dataclass(frozen=True)
class Suite:
    enc: EnDecId
    auth: AuthId


BOOTSTRAP = Suite(EnDecId.AES_CBC_128, AuthId.HMAC_SHA1)  # B.7, until the policy is in force


class ProtKey:
    """One protection key with its derived keys per algorithm (B.7). Never printed."""

    __slots__ = ("ref", "gen", "_raw", "_enc", "_mac")

    def __init__(self, ref: KeyRef, raw: bytes, gen: int = 0) -> None:
        if len(raw) != 16:
            raise ValueError("RMCP-2 keys are 16 bytes")
        if (ref in GENERATIONAL) != (1 <= gen <= 255) or not 0 <= gen <= 255:
            raise ValueError("Ks/Kg/Kc carry a generation 1..255, the others 0")
        self.ref, self.gen, self._raw = KeyRef(ref), gen, bytes(raw)
        self._enc: dict[int, bytes] = {}
        self._mac: dict[int, bytes] = {}

    def __repr__(self) -> str:
        return f"<ProtKey {self.ref.name} gen {self.gen}>"

    def k_enc(self, alg: int) -> bytes:
        if alg not in self._enc:
            self._enc[alg] = hmac(self._raw, b"RMCP2-ENC" + bytes((alg,)))[:16]
        return self._enc[alg]

    def k_mac(self, alg: int) -> bytes:
        if alg not in self._mac:
            self._mac[alg] = hmac(self._raw, b"RMCP2-MAC" + bytes((alg,)))
        return self._mac[alg]


@dataclass
class ReplayWindow:
    """Highest Seq and a 32-message window below it (B.7)."""

    high: int = 0
    seen: int = field(default=0, repr=False)  # bit i: high - i was accepted

    def check(self, seq: int) -> None:
        if not 1 <= seq <= SEQ_MAX:
            raise Rmcp2Error(ErrorCode.REPLAY, "sequence number out of range")
        if seq <= self.high:
            d = self.high - seq
            if d >= WINDOW or self.seen >> d & 1:
                raise Rmcp2Error(ErrorCode.REPLAY, "repeated or too old")

    def commit(self, seq: int) -> None:
        if seq > self.high:
            shift = seq - self.high
            self.seen = ((self.seen << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            self.high = seq
        else:
            self.seen |= 1 << (self.high - seq)


def _mac(key: ProtKey, auth: int, *parts: bytes) -> bytes:
    return hmac(key.k_mac(auth), b"".join(parts), _HASH[AuthId(auth)])[:TAG_LEN]


def seal(plain: bytes, key: ProtKey, suite: Suite, seq: int, iv: bytes) -> bytes:
    """Protect one encoded plain message (header + controls) under `key` (B.7)."""
    plain = bytes(plain)
    if len(iv) != IV_LEN or not 1 <= seq <= SEQ_MAX:
        raise ValueError("IV is 16 bytes, Seq 1..0x3FFFFFFF")
    if suite.enc not in (EnDecId.AES_CBC_128, EnDecId.AES_CTR_128) or suite.auth not in _HASH:
        raise Rmcp2Error(ErrorCode.ALGORITHM, "messages use AES-CBC/CTR-128 with HMAC-SHA1/MD5 (B.7)")
    body = plain[HEADER_LEN:]
    if suite.enc == EnDecId.AES_CBC_128:
        p = 16 - len(body) % 16
        c = aes.cbc_encrypt(key.k_enc(suite.enc), iv, body + bytes((p,)) * p)
    else:
        c = aes.ctr_crypt(key.k_enc(suite.enc), iv, body)
    n = HEADER_LEN + OVERHEAD + len(c)
    if n > 0xFFFF:
        raise ValueError("protected message longer than 65535 bytes")
    hdr = plain[:2] + n.to_bytes(2, "big") + plain[4:HEADER_LEN]
    sec = struct.pack(">BBBBI", key.ref, suite.enc, suite.auth, key.gen, seq)
    return hdr + sec + iv + c + _mac(key, suite.auth, hdr, sec, iv, c)


@dataclass(frozen=True)
class SecHeader:
    ref: KeyRef
    suite: Suite
    gen: int
    seq: int


def peek(data: bytes) -> tuple[bytes, SecHeader]:
    """Sizes, common header and the security header of a protected message (B.7 steps
    before the key is looked up). Returns (MAID of the header, SecHeader)."""
    data = bytes(data)
    n = len(data)
    check_header(data, HEADER_LEN + OVERHEAD)
    ref, enc, auth, gen, seq = struct.unpack(">BBBBI", data[HEADER_LEN:HEADER_LEN + SEC_LEN])
    try:
        kref = KeyRef(ref)
    except ValueError:
        raise Rmcp2Error(ErrorCode.KEY, f"KeyRef {ref:#04x}") from None
    if (kref in GENERATIONAL) != (gen != 0):
        raise Rmcp2Error(ErrorCode.KEY, "generation")
    if enc not in (EnDecId.AES_CBC_128, EnDecId.AES_CTR_128) or auth not in _HASH:
        raise Rmcp2Error(ErrorCode.ALGORITHM, f"EncAlg {enc:#04x} AuthAlg {auth:#04x}")
    clen = n - HEADER_LEN - OVERHEAD
    if enc == EnDecId.AES_CBC_128 and (clen == 0 or clen % 16):
        raise Rmcp2Error(ErrorCode.PADDING, "CBC ciphertext is not whole blocks")
    return data[12:20], SecHeader(kref, Suite(EnDecId(enc), AuthId(auth)), gen, seq)


KeyLookup = Callable[[bytes, SecHeader], "ProtKey | None"]
WindowLookup = Callable[[bytes, ProtKey], ReplayWindow]


def unseal(data: bytes, suite: Suite, keys: KeyLookup, windows: WindowLookup) -> bytes:
    """Check a protected message (B.7 order) and return the plain message bytes. `suite`
    is the one in force for the link; `keys(maid, sec)` finds the key or None;
    `windows(maid, key)` gives the replay window (the caller creates it on demand; it is
    committed only once the Tag has verified)."""
    data = bytes(data)
    maid, sec = peek(data)
    if sec.suite != suite:
        raise Rmcp2Error(ErrorCode.ALGORITHM, "not the suite in force for this link")
    key = keys(maid, sec)
    if key is None:
        raise Rmcp2Error(ErrorCode.KEY, f"no {sec.ref.name} gen {sec.gen} for this sender")
    win = windows(maid, key)
    win.check(sec.seq)
    n = len(data)
    end = n - TAG_LEN
    iv = data[HEADER_LEN + SEC_LEN:HEADER_LEN + SEC_LEN + IV_LEN]
    c = data[HEADER_LEN + SEC_LEN + IV_LEN:end]
    if not ct_equal(_mac(key, suite.auth, data[:end]), data[end:]):
        raise Rmcp2Error(ErrorCode.MAC, "tag")
    if suite.enc == EnDecId.AES_CBC_128:
        p = aes.cbc_decrypt(key.k_enc(suite.enc), iv, c)
        k = p[-1]
        if not 1 <= k <= 16 or p[-k:] != bytes((k,)) * k:
            raise Rmcp2Error(ErrorCode.PADDING, "PKCS#7")
        body = p[:-k]
    else:
        body = aes.ctr_crypt(key.k_enc(suite.enc), iv, c)
    win.commit(sec.seq)
    return data[:2] + (HEADER_LEN + len(body)).to_bytes(2, "big") + data[4:HEADER_LEN] + body


def unseal_decode(data: bytes, suite: Suite, keys: KeyLookup, windows: WindowLookup):
    """unseal() then codec.decode() of the plain message."""
    return decode(unseal(data, suite, keys, windows))


# ---------------------------------------------------------------------------- B.5, B.6
def ktls(seed: bytes, session_id: int, maid: bytes, nonce_c: bytes, cert_der: bytes) -> bytes:
    """K_TLS (B.5) from the SM's seed, the MA's nonce and the MA's certificate (DER)."""
    if len(seed) != 32 or len(nonce_c) != 16 or len(maid) != 8:
        raise ValueError("seed 32, nonce 16, MAID 8 bytes")
    return hmac(seed, b"RMCP2-KTLS" + session_id.to_bytes(8, "big") + maid + nonce_c +
                hashlib.sha256(cert_der).digest())[:16]


def hashed_ktls(k_tls: bytes, session_id: int) -> bytes:
    return hmac(k_tls, b"RMCP2-HASHED-KTLS" + session_id.to_bytes(8, "big"))[:16]


def hashed_maid(session_id: int, maid: bytes) -> bytes:
    return hashlib.sha256(b"RMCP2-HASHED-MAID" + session_id.to_bytes(8, "big") + maid).digest()[:16]


def ks_next(ks: bytes, session_id: int, next_gen: int) -> bytes:
    """B.6 hash step of Ks: generation g -> g+1 (255 is followed by 1)."""
    return hmac(ks, b"RMCP2-KS-NEXT" + session_id.to_bytes(8, "big") + bytes((next_gen,)))[:16]


def next_gen(gen: int) -> int:
    return 1 if gen >= 255 else gen + 1


def probe_proof(h_ktls: bytes, session_id: int, nonce: bytes) -> bytes:
    """PROBE_AUTH proof (B.4)."""
    return hmac(h_ktls, b"RMCP2-PROBE" + session_id.to_bytes(8, "big") + nonce)[:8]
