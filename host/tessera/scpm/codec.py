"""SCPM codec (host side), written from docs/scpm-profile.md alone.

Pure functions and small value types: general frames (profile section 2, ISO/IEC
24767-2 7.1), secure frames with the three services (section 3, 7.2 / 8.2), the IV
(section 5, 8.1.6), the replay window and send counters (section 4, 8.1.5), and the
key-management and application PDUs (sections 6, 7). Every failure is a `ScpmError`
carrying one `ErrorCode` of section 8; nothing else escapes the decoder.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import ClassVar

from tessera.crypto import aes
from tessera.crypto.mac import ct_equal, hmac
from tessera.errors import TesseraError

HD_PLAIN = 0x10
HD_SECURE = 0x11
HEADER_LEN = 11  # HD(1) SA(4) DA(4) BC(2)
MAX_ADATA = 1100
MAX_FRAME = HEADER_LEN + MAX_ADATA
MAX_PADATA = 1024
MDAS_LEN = 16
SHD_SNF_LEN = 8
WINDOW = 32
SNF_RESERVE = 64
SNF_LIMIT = 0xFFFFFFFF  # never sent (section 4)
MASTER_SNF_REQUEST = 0xFFFF0000
PORT = 24767
KSN_ADDRESS = 0x00000001
BLOCK = 16


class ErrorCode(IntEnum):
    """Profile section 8."""

    TRUNCATED = 1
    LENGTH = 2
    OVERSIZE = 3
    HEADER = 4
    SHD = 5
    ALGORITHM = 6
    NOT_FOR_ME = 7
    NO_KEY = 8
    SNF = 9
    REPLAY = 10
    TOO_OLD = 11
    MAC = 12
    PADDING = 13
    BCC = 14
    AUTHORITY = 15
    WRONG_KSN = 16
    STATE = 17
    MALFORMED = 18
    DH = 19
    CONFIRM = 20
    SNF_EXHAUSTED = 21
    UNKNOWN_OP = 22


class ScpmError(TesseraError):
    """A specific SCPM failure. The message never contains key material."""

    def __init__(self, code: ErrorCode, msg: str = "") -> None:
        self.code = ErrorCode(code)
        super().__init__(f"ERR_{self.code.name}" + (f": {msg}" if msg else ""))


class Service(IntEnum):
    AUTH = 1  # 8.2.2 authentication only
    CONF = 2  # 8.2.3 confidentiality only
    AUTH_CONF = 3  # 8.2.4 authentication and confidentiality


# service -> (cipher id, MAC id), section 3 (5.3.4 algorithm independence)
ALGORITHMS = {Service.AUTH: (0, 1), Service.CONF: (1, 0), Service.AUTH_CONF: (1, 1)}


class KeyKind(IntEnum):
    """Key kinds of section 1; the value is also the authority level (6.5)."""

    SETUP = 0
    USER = 1
    SP = 2
    MAKER = 3
    MASTER = 4


def next_gen(gen: int) -> int:
    """Generations run 1..255 and wrap to 1 (section 1)."""
    return 1 if gen >= 255 else gen + 1


class UsageKey:
    """A 16-byte usage key with its derived keys (8.1.2, 8.1.3). Never shown."""

    __slots__ = ("raw", "enc", "mac")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 16:
            raise ValueError("usage keys are 16 bytes")
        self.raw = bytes(raw)
        self.enc = hmac(self.raw, b"SCPM-ENC")[:16]
        self.mac = hmac(self.raw, b"SCPM-MAC")

    def __repr__(self) -> str:
        return "<UsageKey ...>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UsageKey) and ct_equal(self.raw, other.raw)

    def __hash__(self) -> int:  # keys are not dict keys; identity is enough
        return id(self)


@dataclass(frozen=True)
class SecureHeader:
    """SHD, figure 7 of the profile."""

    service: Service
    kind: KeyKind
    index: int = 0
    gen: int = 1

    def encode(self) -> bytes:
        c, m = ALGORITHMS[self.service]
        return bytes(((1 << 4) | int(self.service), (c << 4) | m, (int(self.kind) << 4) | self.index, self.gen))

    @classmethod
    def decode(cls, b: bytes) -> SecureHeader:
        # Check order pinned in section 3 step 1.4: ERR_SHD fields, then algorithm ids.
        b0, b1, b2, b3 = b[0], b[1], b[2], b[3]
        if b0 >> 4 != 1 or b0 & 0x0C or b0 & 0x03 == 0:
            raise ScpmError(ErrorCode.SHD, "version, reserved bits or service")
        kind, index = b2 >> 4, b2 & 0x0F
        if kind > 4 or (index and kind != KeyKind.SP):
            raise ScpmError(ErrorCode.SHD, "key kind or index")
        if b3 == 0:
            raise ScpmError(ErrorCode.SHD, "generation 0")
        service = Service(b0 & 0x03)
        if (b1 >> 4, b1 & 0x0F) != ALGORITHMS[service]:
            raise ScpmError(ErrorCode.ALGORITHM, f"ids {b1:#04x} for service {int(service)}")
        return cls(service, KeyKind(kind), index, b3)


@dataclass(frozen=True)
class PlainFrame:
    """A general frame with HD 0x10: ADATA is PADATA in clear (authority 0)."""

    sa: int
    da: int
    padata: bytes


@dataclass(frozen=True)
class SecureFrame:
    """A secure frame that passed step 1 (sizes and headers) but is NOT yet verified."""

    sa: int
    da: int
    shd: SecureHeader
    snf: int
    raw: bytes  # the whole general frame

    @property
    def body(self) -> bytes:
        end = len(self.raw) - (MDAS_LEN if self.shd.service != Service.CONF else 0)
        return self.raw[HEADER_LEN + SHD_SNF_LEN:end]


def _addr(a: int) -> bytes:
    if not 0 < a <= 0xFFFFFFFF:
        raise ValueError("node address must be 1..0xFFFFFFFF")
    return a.to_bytes(4, "big")


def encode_general(hd: int, sa: int, da: int, adata: bytes) -> bytes:
    if len(adata) > MAX_ADATA:
        raise ScpmError(ErrorCode.OVERSIZE, "ADATA beyond 1100 bytes")
    return bytes([hd]) + _addr(sa) + _addr(da) + len(adata).to_bytes(2, "big") + adata


def encode_plain(sa: int, da: int, padata: bytes) -> bytes:
    return encode_general(HD_PLAIN, sa, da, padata)


def decode(frame: bytes, me: int | None = None) -> PlainFrame | SecureFrame:
    """Step 1 of the receiver (section 3), in the pinned order. `me` enables the DA check."""
    frame = bytes(frame)
    n = len(frame)
    if n < HEADER_LEN:
        raise ScpmError(ErrorCode.TRUNCATED, f"{n} bytes")
    if n > MAX_FRAME:
        raise ScpmError(ErrorCode.OVERSIZE, f"{n} bytes")
    hd = frame[0]
    if hd not in (HD_PLAIN, HD_SECURE):
        raise ScpmError(ErrorCode.HEADER, f"HD {hd:#04x}")
    sa, da, bc = struct.unpack_from(">IIH", frame, 1)
    if bc != n - HEADER_LEN:
        raise ScpmError(ErrorCode.LENGTH, f"BC {bc} for {n - HEADER_LEN} bytes")
    adata = frame[HEADER_LEN:]
    if hd == HD_PLAIN:
        if me is not None and da != me:
            raise ScpmError(ErrorCode.NOT_FOR_ME)
        return PlainFrame(sa, da, adata)
    if len(adata) < SHD_SNF_LEN:
        raise ScpmError(ErrorCode.TRUNCATED, "secure frame shorter than SHD + SNF")
    shd = SecureHeader.decode(adata[:4])
    body_len = len(adata) - SHD_SNF_LEN
    minimum = {Service.AUTH: 2 + MDAS_LEN, Service.CONF: BLOCK, Service.AUTH_CONF: BLOCK + MDAS_LEN}[shd.service]
    if body_len < minimum:
        raise ScpmError(ErrorCode.TRUNCATED, f"body {body_len} bytes for service {int(shd.service)}")
    if shd.service != Service.AUTH:
        enc_len = body_len - (MDAS_LEN if shd.service == Service.AUTH_CONF else 0)
        if enc_len % BLOCK:
            raise ScpmError(ErrorCode.PADDING, "encrypted part not whole blocks")
    if me is not None and da != me:
        raise ScpmError(ErrorCode.NOT_FOR_ME)
    snf = int.from_bytes(adata[4:8], "big")
    return SecureFrame(sa, da, shd, snf, frame)


def _iv(key: UsageKey, shd: bytes, snf: bytes, sa: int, da: int) -> bytes:
    # Section 5 (8.1.6, figure 11): one ECB block over SHD | SNF | SA | DA.
    return aes.ecb_encrypt(key.enc, shd + snf + _addr(sa) + _addr(da))


def bcc(pbc_padata: bytes) -> bytes:
    """BCC, 7.2.6: first two bytes of SHA-256(PBC | PADATA)."""
    return hashlib.sha256(pbc_padata).digest()[:2]


def seal(sa: int, da: int, shd: SecureHeader, snf: int, padata: bytes, key: UsageKey) -> bytes:
    """Build a secure frame (sections 2, 3, 5)."""
    if len(padata) > MAX_PADATA:
        raise ScpmError(ErrorCode.OVERSIZE, "PADATA beyond MAX_PADATA")
    if not 0 < snf < SNF_LIMIT:
        raise ScpmError(ErrorCode.SNF, "SNF out of range")
    shd_b, snf_b = shd.encode(), snf.to_bytes(4, "big")
    pp = len(padata).to_bytes(2, "big") + bytes(padata)
    if shd.service == Service.AUTH:
        body = pp
    else:
        plain = pp + (bcc(pp) if shd.service == Service.CONF else b"")
        plain += bytes(-len(plain) % BLOCK)  # PDG, 7.2.7
        body = aes.cbc_encrypt(key.enc, _iv(key, shd_b, snf_b, sa, da), plain)
    has_mac = shd.service != Service.CONF
    adata_len = SHD_SNF_LEN + len(body) + (MDAS_LEN if has_mac else 0)
    head = bytes([HD_SECURE]) + _addr(sa) + _addr(da) + adata_len.to_bytes(2, "big") + shd_b + snf_b
    out = head + body
    if has_mac:  # MDAS, 7.2.8 / 8.1.3: encrypt-then-MAC over everything before it
        out += hmac(key.mac, out)[:MDAS_LEN]
    return out


def verify_mac(sf: SecureFrame, key: UsageKey) -> None:
    """Step 4: MDAS for services 1 and 3, constant-time comparison."""
    if sf.shd.service == Service.CONF:
        return
    want = hmac(key.mac, sf.raw[:-MDAS_LEN])[:MDAS_LEN]
    if not ct_equal(want, sf.raw[-MDAS_LEN:]):
        raise ScpmError(ErrorCode.MAC)


def unprotect(sf: SecureFrame, key: UsageKey) -> bytes:
    """Step 5: decrypt and check PBC, PDG and BCC. Call verify_mac first."""
    body = sf.body
    if sf.shd.service == Service.AUTH:
        pbc = int.from_bytes(body[:2], "big")
        if pbc > MAX_PADATA:
            raise ScpmError(ErrorCode.OVERSIZE, "PBC beyond MAX_PADATA")
        if pbc != len(body) - 2:
            raise ScpmError(ErrorCode.LENGTH, "PBC disagrees with the body")
        return body[2:]
    raw = sf.raw
    plain = aes.cbc_decrypt(key.enc, _iv(key, raw[11:15], raw[15:19], sf.sa, sf.da), body)
    pbc = int.from_bytes(plain[:2], "big")
    if pbc > MAX_PADATA:
        raise ScpmError(ErrorCode.OVERSIZE, "PBC beyond MAX_PADATA")
    used = 2 + pbc + (2 if sf.shd.service == Service.CONF else 0)
    if used > len(plain):
        raise ScpmError(ErrorCode.LENGTH, "PBC beyond the plaintext")
    if len(plain) - used >= BLOCK:
        raise ScpmError(ErrorCode.PADDING, "more than 15 padding bytes")
    if any(plain[used:]):
        raise ScpmError(ErrorCode.PADDING, "non-zero padding")
    padata = plain[2:2 + pbc]
    if sf.shd.service == Service.CONF and not ct_equal(bcc(plain[:2 + pbc]), plain[2 + pbc:used]):
        raise ScpmError(ErrorCode.BCC)
    return padata


def open_frame(sf: SecureFrame, key: UsageKey) -> bytes:
    """Steps 4 and 5 together (no window): PADATA of a verified frame."""
    verify_mac(sf, key)
    return unprotect(sf, key)


# ------------------------------------------------------------------ SNF (section 4)


@dataclass
class ReplayWindow:
    """Receiver state for one (peer, kind, index, direction): highest accepted SNF `high`
    and a bitmap of the 32 numbers below it (bit i = high - 1 - i seen). `reserved` is the
    flash reservation (section 4): after a reboot, `restore()` treats all <= it as seen."""

    high: int = 0
    bits: int = 0
    reserved: int = 0

    def check(self, snf: int) -> None:
        """Step 3: pre-check without updating."""
        if snf == 0:
            raise ScpmError(ErrorCode.SNF, "SNF 0")
        if snf > self.high:
            return
        if snf < self.high - WINDOW:
            raise ScpmError(ErrorCode.TOO_OLD, f"SNF {snf} below the window")
        if snf == self.high or (self.bits >> (self.high - 1 - snf)) & 1:
            raise ScpmError(ErrorCode.REPLAY, f"SNF {snf} already accepted")

    def commit(self, snf: int) -> bool:
        """Step 6. Returns True when the reservation moved (the caller persists it)."""
        if snf > self.high:
            shift = snf - self.high
            if not self.high or shift > WINDOW:
                self.bits = 0
            else:
                self.bits = ((self.bits << shift) | (1 << (shift - 1))) & ((1 << WINDOW) - 1)
            self.high = snf
        else:
            self.bits |= 1 << (self.high - 1 - snf)
        if self.high >= self.reserved:  # equal moves it too, as on the device (profile 4)
            self.reserved = min(self.high + SNF_RESERVE, SNF_LIMIT)
            return True
        return False

    @classmethod
    def restore(cls, reserved: int) -> ReplayWindow:
        return cls(high=reserved, bits=(1 << WINDOW) - 1 if reserved else 0, reserved=reserved)


@dataclass
class SendCounter:
    """Sender state: the next SNF and its flash reservation (section 4)."""

    next: int = 1
    reserved: int = 0

    def take(self) -> tuple[int, bool]:
        """The SNF to send and whether the reservation moved (caller persists first)."""
        if self.next >= SNF_LIMIT:
            raise ScpmError(ErrorCode.SNF_EXHAUSTED)
        snf, moved = self.next, False
        if snf >= self.reserved:
            self.reserved = min(snf + SNF_RESERVE, SNF_LIMIT)
            moved = True
        self.next += 1
        return snf, moved

    @classmethod
    def restore(cls, reserved: int) -> SendCounter:
        return cls(next=max(reserved, 1), reserved=reserved)


# ------------------------------------------------------------------ PDUs (sections 6, 7)


class Op(IntEnum):
    ENROL_HELLO = 0x01
    ENROL_CHALLENGE = 0x02
    USER_KEY_INIT = 0x03
    USER_KEY_INIT_ACK = 0x04
    SP_KEY_INIT = 0x05
    SP_KEY_INIT_ACK = 0x06
    MAKER_KEY_INIT = 0x07
    MAKER_KEY_INIT_ACK = 0x08
    USER_KEY_SET = 0x09
    USER_KEY_SET_ACK = 0x0A
    MKU_START = 0x10
    MKU_RESPONSE = 0x11
    MKU_COMMIT = 0x12
    MKU_COMMIT_ACK = 0x13
    MKU_ABORT = 0x14
    MKU_REQUEST = 0x15
    SYNC_REQ = 0x18
    SYNC_RESP = 0x19
    KM_ERROR = 0x1F
    APP_GET = 0x40
    APP_SET = 0x41
    APP_RESULT = 0x42


class MkuReason(IntEnum):
    OPERATOR = 1
    SNF_EXHAUSTION = 2
    COMPROMISE = 3


_PDUS: dict[int, type[Pdu]] = {}


@dataclass(frozen=True)
class Pdu:
    """OP(1) | TXID(2) | fields. Subclasses list their fields in wire order; an int field
    carries its byte width in metadata `size`, a bytes field its length (-1 = the rest)."""

    OP: ClassVar[Op]
    txid: int

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        _PDUS[int(cls.OP)] = cls

    def encode(self) -> bytes:
        out = bytearray([int(self.OP)]) + self.txid.to_bytes(2, "big")
        for f in fields(self)[1:]:
            v, size = getattr(self, f.name), f.metadata["size"]
            if isinstance(v, int):
                out += v.to_bytes(size, "big")
            else:
                if size >= 0 and len(v) != size:
                    raise ValueError(f"{type(self).__name__}.{f.name} must be {size} bytes")
                out += v
        if len(out) > MAX_PADATA:
            raise ScpmError(ErrorCode.OVERSIZE, "PDU beyond MAX_PADATA")
        return bytes(out)


def _u(size: int):
    return field(metadata={"size": size, "int": True})


def _b(size: int, secret: bool = False):
    return field(metadata={"size": size, "int": False}, repr=not secret)


@dataclass(frozen=True)
class EnrolHello(Pdu):
    OP = Op.ENROL_HELLO


@dataclass(frozen=True)
class EnrolChallenge(Pdu):
    OP = Op.ENROL_CHALLENGE
    nonce_d: bytes = _b(16)


@dataclass(frozen=True)
class UserKeyInit(Pdu):
    OP = Op.USER_KEY_INIT
    nonce_d: bytes = _b(16)
    master_gen: int = _u(1)
    master_key: bytes = _b(16, secret=True)
    user_gen: int = _u(1)
    user_key: bytes = _b(16, secret=True)


@dataclass(frozen=True)
class UserKeyInitAck(Pdu):
    OP = Op.USER_KEY_INIT_ACK
    master_gen: int = _u(1)
    user_gen: int = _u(1)


@dataclass(frozen=True)
class SpKeyInit(Pdu):
    OP = Op.SP_KEY_INIT
    index: int = _u(1)
    gen: int = _u(1)
    key: bytes = _b(16, secret=True)


@dataclass(frozen=True)
class SpKeyInitAck(Pdu):
    OP = Op.SP_KEY_INIT_ACK
    index: int = _u(1)
    gen: int = _u(1)


@dataclass(frozen=True)
class MakerKeyInit(Pdu):
    OP = Op.MAKER_KEY_INIT
    gen: int = _u(1)
    key: bytes = _b(16, secret=True)


@dataclass(frozen=True)
class MakerKeyInitAck(Pdu):
    OP = Op.MAKER_KEY_INIT_ACK
    gen: int = _u(1)


@dataclass(frozen=True)
class UserKeySet(Pdu):
    OP = Op.USER_KEY_SET
    gen: int = _u(1)
    key: bytes = _b(16, secret=True)


@dataclass(frozen=True)
class UserKeySetAck(Pdu):
    OP = Op.USER_KEY_SET_ACK
    gen: int = _u(1)


@dataclass(frozen=True)
class MkuStart(Pdu):
    OP = Op.MKU_START
    new_gen: int = _u(1)
    nonce_k: bytes = _b(16)
    ksn_public: bytes = _b(256)


@dataclass(frozen=True)
class MkuResponse(Pdu):
    OP = Op.MKU_RESPONSE
    new_gen: int = _u(1)
    nonce_d: bytes = _b(16)
    dev_public: bytes = _b(256)
    confirm_d: bytes = _b(16)


@dataclass(frozen=True)
class MkuCommit(Pdu):
    OP = Op.MKU_COMMIT
    new_gen: int = _u(1)
    confirm_k: bytes = _b(16)


@dataclass(frozen=True)
class MkuCommitAck(Pdu):
    OP = Op.MKU_COMMIT_ACK
    new_gen: int = _u(1)


@dataclass(frozen=True)
class MkuAbort(Pdu):
    OP = Op.MKU_ABORT
    new_gen: int = _u(1)


@dataclass(frozen=True)
class MkuRequest(Pdu):
    OP = Op.MKU_REQUEST
    reason: int = _u(1)


@dataclass(frozen=True)
class SyncReq(Pdu):
    OP = Op.SYNC_REQ
    nonce: bytes = _b(16)


@dataclass(frozen=True)
class SyncResp(Pdu):
    OP = Op.SYNC_RESP
    nonce: bytes = _b(16)
    current_gen: int = _u(1)
    pending_gen: int = _u(1)
    pending_txid: int = _u(2)


@dataclass(frozen=True)
class KmError(Pdu):
    OP = Op.KM_ERROR
    code: int = _u(1)
    detail: int = _u(1)


@dataclass(frozen=True)
class AppGet(Pdu):
    OP = Op.APP_GET
    prop: int = _u(1)


@dataclass(frozen=True)
class AppSet(Pdu):
    OP = Op.APP_SET
    prop: int = _u(1)
    value: bytes = _b(-1)


@dataclass(frozen=True)
class AppResult(Pdu):
    OP = Op.APP_RESULT
    prop: int = _u(1)
    status: int = _u(1)
    value: bytes = _b(-1)


KM_OPS = frozenset(op for op in Op if op < 0x40)


def decode_pdu(padata: bytes) -> Pdu:
    """Parse KM or application PADATA (pinned errors: ERR_MALFORMED, ERR_UNKNOWN_OP)."""
    padata = bytes(padata)
    if len(padata) > MAX_PADATA:
        raise ScpmError(ErrorCode.OVERSIZE, "PADATA beyond MAX_PADATA")
    if len(padata) < 3:
        raise ScpmError(ErrorCode.MALFORMED, "PDU shorter than OP | TXID")
    cls = _PDUS.get(padata[0])
    if cls is None:
        raise ScpmError(ErrorCode.UNKNOWN_OP, f"OP {padata[0]:#04x}")
    fs = fields(cls)[1:]
    fixed = sum(f.metadata["size"] for f in fs if f.metadata["size"] >= 0)
    variable = any(f.metadata["size"] < 0 for f in fs)
    rest = len(padata) - 3
    if rest < fixed if variable else rest != fixed:
        raise ScpmError(ErrorCode.MALFORMED, f"{cls.OP.name} of {len(padata)} bytes")
    vals: dict[str, object] = {"txid": int.from_bytes(padata[1:3], "big")}
    pos = 3
    for f in fs:
        size = f.metadata["size"]
        if size < 0:
            size = len(padata) - pos
        chunk = padata[pos:pos + size]
        vals[f.name] = int.from_bytes(chunk, "big") if f.metadata["int"] else chunk
        pos += size
    return cls(**vals)


# ------------------------------------------------------------------ receiver (section 3)


@dataclass(frozen=True)
class Received:
    """A frame that passed steps 1-5: its PADATA and the authority of its key (6.5)."""

    sa: int
    da: int
    shd: SecureHeader | None  # None for a plain frame (authority 0)
    snf: int
    # decrypted PADATA: key-management PDUs carry keys, so it stays out of repr (and so
    # out of logs and tracebacks); decode_pdu() gives a repr that hides the key fields
    padata: bytes = field(repr=False)

    @property
    def authority(self) -> int:
        return 0 if self.shd is None else int(self.shd.kind)


def receive(frame: bytes, me: int, key_for, window_for, commit: bool = True) -> Received:
    """Receiver processing order of section 3. `key_for(sa, shd) -> UsageKey | None`,
    `window_for(sa, shd) -> ReplayWindow`. Nothing changes unless steps 1-5 pass."""
    f = decode(frame, me)  # step 1
    if isinstance(f, PlainFrame):
        return Received(f.sa, f.da, None, 0, f.padata)
    key = key_for(f.sa, f.shd)  # step 2
    if key is None:
        raise ScpmError(ErrorCode.NO_KEY, f"{f.shd.kind.name} index {f.shd.index} gen {f.shd.gen}")
    window = window_for(f.sa, f.shd)
    window.check(f.snf)  # step 3
    verify_mac(f, key)  # step 4
    padata = unprotect(f, key)  # step 5
    if commit:
        window.commit(f.snf)  # step 6
    return Received(f.sa, f.da, f.shd, f.snf, padata)
