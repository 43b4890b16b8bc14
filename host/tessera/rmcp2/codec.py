"""Secure RMCP-2 message codec (host side), written from docs/rmcp2-profile.md alone.

Messages are one generic `Message` (common header of profile A.4 plus a tuple of typed
controls); which node types may send a message and which controls it carries is the table
`RULES` (profile A.5 and B.3). Controls and sub-controls are frozen dataclasses (A.6, B.4).
Decoding follows the check order of profile B.12 and raises `Rmcp2Error` with one
`ErrorCode`; nothing else escapes `decode`. Unknown control types are skipped by their
Length (B.2). Values marked "defined by this project" in the profile are Tessera's own.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import ClassVar, Iterator, TypeVar

from tessera.errors import TesseraError

VERSION = 0x4  # 11.1 a
HEADER_LEN = 20  # A.4: Ver/NT(1) type(1) Length(2) Session ID(8) MAID(8)
MAID_LEN = 8  # A.4 (HRSREQ Length 0x14), layout B.1
MAX_MESSAGE = 0xFFFF
MAX_KEY_MATERIAL = 0x804  # 11.2.9.3 b
MAX_CAPAB = 16  # B.2: per *_CAPAB kind
MAX_CANDIDATES = 8  # B.3 HLEAVE, B.18 HANNOUNCE
MAX_ACL = 2000  # B.8
ACL_ENTRY_LEN = 32  # B.8: HASHED_MAID(16) || HASHED_KTLS(16)


class ErrorCode(IntEnum):
    """Profile B.12 (shared with the firmware codec)."""

    TRUNCATED = 1
    LENGTH = 2
    OVERSIZE = 3
    VERSION = 4
    NODE_TYPE = 5
    UNKNOWN_MESSAGE = 6
    CONTROL_LENGTH = 7
    MISSING_CONTROL = 8
    UNEXPECTED_CONTROL = 9
    DUPLICATE_CONTROL = 10
    VALUE = 11
    SUBCONTROL = 12
    MAID = 13
    KEY = 14
    ALGORITHM = 15
    MAC = 16
    REPLAY = 17
    PADDING = 18
    # B.17 content packets (p2-data): numbered apart from the message codecs' range
    OBJECT = 40
    DIGEST = 41


class Rmcp2Error(TesseraError):
    """A specific RMCP-2 failure; the message never carries key material."""

    def __init__(self, code: ErrorCode, msg: str = "") -> None:
        self.code = ErrorCode(code)
        super().__init__(f"RMCP2_{self.code.name}" + (f": {msg}" if msg else ""))


class NodeType(IntEnum):
    """Table 12."""

    SM = 0x01
    SMA = 0x02
    RMA = 0x03
    DMA = 0x05


class MsgType(IntEnum):
    # Table 13 (amendment; 0x02, 0x09, 0x0C are base Table 2 codes it reuses)
    SUBSREQ = 0x02
    RELREQ = 0x09
    RELANS = 0x0C
    SECAGREQ = 0x21
    SECLIST = 0x22
    SECAGANS = 0x23
    KEYDELIVER = 0x24
    HRSREQ = 0x25
    HRSANS = 0x26
    SECALGREQ = 0x27
    # defined by this project (profile B.3)
    SUBSANS = 0xA1
    PPROBREQ = 0xA2
    PPROBANS = 0xA3
    HSOLICIT = 0xA4
    HANNOUNCE = 0xA5
    HLEAVE = 0xA6
    STREQ = 0xA7
    STANS = 0xA8
    STCOLREQ = 0xA9
    STCOLANS = 0xAA
    LEAVREQ = 0xAB
    LEAVANS = 0xAC
    HB = 0xAD
    TERMREQ = 0xAE
    TERMANS = 0xAF
    SECALGANS = 0xB0
    KTLSREQ = 0xB1
    KTLSANS = 0xB2
    KCREQ = 0xB6  # B.16: a DMA asks the SMA for a fresh Kc


class CtlType(IntEnum):
    # Table 14
    SMA_PROPOSE = 0x11
    GK_MECH_CAPAB = 0x12
    EN_DEC_CAPAB = 0x13
    AUTH_ALG_CAPAB = 0x14
    GK_MECH = 0x15
    AUTH_MECH = 0x16
    CON_EN_DEC_ALG = 0x17
    GK_EN_DEC_ALG = 0x18
    AUTH_ALG = 0x19
    GK_MECH_DELIVER = 0x1A
    AUTH_MECH_DELIVER = 0x1B
    CON_EN_DEC_DELIVER = 0x1C
    GK_EN_DEC_DELIVER = 0x1D
    AUTH_ALG_DELIVER = 0x1E
    SEC_RETURN = 0x1F
    KEY_INFO = 0x20
    ACL_LIST = 0x21
    SERV_USER_IDENT = 0x22
    AUTH = 0x23
    AUTH_ANS = 0x24
    # defined by this project (profile B.4)
    RESULT = 0xC1
    KTLS_NONCE = 0xC2
    KTLS_SEED = 0xC3
    DELIVER_RESULT = 0xC4
    STATUS = 0xC5
    PROBE_AUTH = 0xC6
    CANDIDATE = 0xC7
    CONTENT_ADDR = 0xC8


class SubType(IntEnum):
    KEY_MATERIAL = 0x01  # Table 15
    ACL_DATA = 0x02  # Table 15
    MA_AUTH = 0x81  # defined by this project (B.4, B.11)


class EnDecId(IntEnum):
    """Table 16 (one-byte fields: the "1x0n" values cannot be coded)."""

    AES_CBC_128 = 0x01
    AES_CTR_128 = 0x02
    PKCS1 = 0x03
    SEED = 0x04


class AuthId(IntEnum):
    """Table 17."""

    HMAC_SHA1 = 0x01
    HMAC_MD5 = 0x02
    MD5 = 0x03


class GpAttribute(IntEnum):
    """Table 18."""

    OPEN = 0x01
    CLOSED = 0x02


class GkMecha(IntEnum):
    """Table 19: a bit mask of PERIODIC, BACKWARD, FORWARD (0 = STATIC)."""

    STATIC = 0x00
    PERIODIC = 0x01
    BACKWARD = 0x02
    PERIODIC_BACKWARD = 0x03
    FORWARD = 0x04
    PERIODIC_FORWARD = 0x05
    BACKWARD_FORWARD = 0x06
    PERIODIC_FORWARD_BACKWARD = 0x07


class GkName(IntEnum):
    """Table 20."""

    KDC = 0x01
    GKMP = 0x02
    MIKEY = 0x03
    GSAKMP = 0x04
    LKH = 0x05


class AuthAttribute(IntEnum):
    MEMBERSHIP = 0x01  # Table 21


class AuthName(IntEnum):
    MEM_AUTH = 0x01  # Table 22


class SecReturn(IntEnum):
    """Table 24 (SEC_RETURN and Auth_result; FAILED_CONFIGURATION for SEC_RETURN only)."""

    OK = 0x01
    ERROR = 0x02
    RETRANSMISSION_REQ = 0x03
    FAILED_CONFIGURATION = 0x04


class KeyType(IntEnum):
    """Table 25."""

    KS = 0x01
    KG = 0x02
    KC = 0x03


class Result(IntEnum):
    """RESULT codes: Table 23 (0x41, 0x42) plus those defined by this project (B.9)."""

    ACCEPTED = 0x01
    REJECTED = 0x10
    SESSION_UNKNOWN = 0x11
    SESSION_FULL = 0x12
    NOT_ALLOWED = 0x13
    MAID_IN_USE = 0x14
    POLICY_REFUSED = 0x15
    NOT_IN_ACL = 0x16
    LEAVE_NORMAL = 0x20
    EXPELLED = 0x21
    SESSION_TERMINATED = 0x22
    SERV_USER_ID_MISSING = 0x41  # Table 23
    SERV_USER_ID_NOT_RECOGNIZED = 0x42  # Table 23


class DeliverResult(IntEnum):
    """DELIVER_RESULT (B.4, defined by this project)."""

    AVAILABLE = 0x01
    NOT_DELIVERABLE = 0x02


class KeyMode(IntEnum):
    """KEY_DATA Mode (B.6, defined by this project)."""

    FRESH = 0x01
    HASHED = 0x02


E = TypeVar("E", bound=IntEnum)


def _enum(cls: type[E], v: int, what: str) -> E:
    try:
        return cls(v)
    except ValueError:
        raise Rmcp2Error(ErrorCode.VALUE, f"{what} {v:#04x}") from None


def _zero(b: bytes, what: str) -> None:
    if any(b):
        raise Rmcp2Error(ErrorCode.VALUE, f"{what} reserved bytes not zero")


def _check_maid(maid: bytes) -> bytes:
    maid = bytes(maid)
    if len(maid) != MAID_LEN:
        raise ValueError("a MAID is 8 bytes")
    return maid


# ---------------------------------------------------------------------------- MAID (B.1)
def make_maid(ipv4: str, port: int, instance: int) -> bytes:
    """B.1: IPv4(4) | port(2) | instance(2), instance non-zero."""
    parts = [int(p) for p in ipv4.split(".")]
    if len(parts) != 4 or not all(0 <= p <= 255 for p in parts):
        raise ValueError(f"not an IPv4 address: {ipv4!r}")
    if not 0 <= port <= 0xFFFF or not 0 < instance <= 0xFFFF:
        raise ValueError("port 0..65535, instance 1..65535")
    return bytes(parts) + struct.pack(">HH", port, instance)


def parse_maid(maid: bytes) -> tuple[str, int, int]:
    maid = _check_maid(maid)
    port, inst = struct.unpack(">HH", maid[4:])
    return ".".join(str(b) for b in maid[:4]), port, inst


# ---------------------------------------------------------------------------- controls
class Control:
    """Base of the typed controls. `CODE` is the control type; `LENGTH` the fixed Length
    (None when variable). `body()` gives the bytes after type and length (fixed part);
    `tail()` the sub-controls that follow it."""

    CODE: ClassVar[CtlType]
    LENGTH: ClassVar[int | None] = 4

    def body(self) -> bytes:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def tail(self) -> bytes:
        return b""

    def encode(self) -> bytes:
        b = self.body()
        n = 2 + len(b)
        if n > 0xFF or (self.LENGTH is not None and n != self.LENGTH):
            raise ValueError(f"{self.CODE.name}: control length {n}")
        return bytes((self.CODE, n)) + b + self.tail()


def _sub(code: int, body: bytes) -> bytes:
    n = 3 + len(body)
    if n > 0xFFFF:
        raise ValueError("sub-control too long")
    return bytes((code,)) + n.to_bytes(2, "big") + body


@dataclass(frozen=True)
class KeyMaterial:
    """KEY_MATERIAL sub-control (11.2.4.3, 11.2.9.3): Key_Type and KEY_DATA (B.6)."""

    key_type: KeyType
    key_data: bytes = field(repr=False)  # key material: never shown

    def encode(self) -> bytes:
        if 4 + len(self.key_data) > MAX_KEY_MATERIAL:
            raise ValueError("KEY_MATERIAL longer than 0x804")
        return _sub(SubType.KEY_MATERIAL, bytes((self.key_type,)) + self.key_data)


@dataclass(frozen=True)
class MaAuth:
    """MA_AUTH sub-control (B.4, B.11; defined by this project, opaque until part 2)."""

    pass_no: int
    data: bytes

    def encode(self) -> bytes:
        if not 1 <= self.pass_no <= 3:
            raise ValueError("MA_AUTH pass 1..3")
        return _sub(SubType.MA_AUTH, bytes((self.pass_no,)) + self.data)


class _Three(Control):
    """Controls of Length 8: three code bytes, then three zero bytes (figures 109, 114)."""

    LENGTH = 8
    ENUMS: ClassVar[tuple[type[IntEnum], ...]]

    def body(self) -> bytes:
        return bytes(tuple(getattr(self, f.name) for f in fields(self)) + (0, 0, 0))

    @classmethod
    def parse(cls, b: bytes):
        _zero(b[3:6], cls.CODE.name)
        return cls(*(_enum(e, b[i], f"{cls.CODE.name} field {i}") for i, e in enumerate(cls.ENUMS)))


@dataclass(frozen=True)
class SmaPropose(_Three):
    """11.2.5.2, figure 109."""

    CODE = CtlType.SMA_PROPOSE
    ENUMS = (GpAttribute, GkMecha, EnDecId)
    gp_attribute: GpAttribute
    gk_mecha: GkMecha
    con_en_dec_id: EnDecId


@dataclass(frozen=True)
class _Capab(Control):
    """*_CAPAB controls (11.2.5.3-5): an algorithm and its preference (1 = highest)."""

    value: IntEnum
    prefer: int
    ENUM: ClassVar[type[IntEnum]]
    MAX_PREFER: ClassVar[int]

    def body(self) -> bytes:
        if not 1 <= self.prefer <= self.MAX_PREFER:
            raise ValueError(f"{self.CODE.name}: PREFER 1..{self.MAX_PREFER}")
        return bytes((self.value, self.prefer))

    @classmethod
    def parse(cls, b: bytes) -> _Capab:
        v = _enum(cls.ENUM, b[0], cls.CODE.name)
        if not 1 <= b[1] <= cls.MAX_PREFER:
            raise Rmcp2Error(ErrorCode.VALUE, f"{cls.CODE.name} PREFER {b[1]}")
        return cls(v, b[1])


@dataclass(frozen=True)
class GkMechCapab(_Capab):
    CODE = CtlType.GK_MECH_CAPAB
    ENUM = GkName
    MAX_PREFER = 6  # 11.2.5.3 d


@dataclass(frozen=True)
class EnDecCapab(_Capab):
    CODE = CtlType.EN_DEC_CAPAB
    ENUM = EnDecId
    MAX_PREFER = 5  # 11.2.5.4 d


@dataclass(frozen=True)
class AuthAlgCapab(_Capab):
    CODE = CtlType.AUTH_ALG_CAPAB
    ENUM = AuthId
    MAX_PREFER = 3  # 11.2.5.5 d


@dataclass(frozen=True)
class GkMech(_Three):
    """11.2.6.2, figure 114."""

    CODE = CtlType.GK_MECH
    ENUMS = (GpAttribute, GkMecha, GkName)
    gp_attribute: GpAttribute
    gk_mecha: GkMecha
    gk_name: GkName


@dataclass(frozen=True)
class AuthMech(Control):
    """11.2.6.3, figure 115: both fields have a single legal value."""

    CODE = CtlType.AUTH_MECH
    auth_attribute: AuthAttribute = AuthAttribute.MEMBERSHIP
    auth_name: AuthName = AuthName.MEM_AUTH

    def body(self) -> bytes:
        return bytes((self.auth_attribute, self.auth_name))

    @classmethod
    def parse(cls, b: bytes) -> AuthMech:
        return cls(_enum(AuthAttribute, b[0], "AUTH_ATTRIBUTE"), _enum(AuthName, b[1], "AUTH_NAME"))


@dataclass(frozen=True)
class _OneByte(Control):
    """Controls of Length 4 with one code byte and one reserved zero byte."""

    value: IntEnum
    ENUM: ClassVar[type[IntEnum]]

    def body(self) -> bytes:
        return bytes((self.value, 0))

    @classmethod
    def parse(cls, b: bytes) -> _OneByte:
        _zero(b[1:2], cls.CODE.name)
        return cls(_enum(cls.ENUM, b[0], cls.CODE.name))


def _one(name: str, code: CtlType, enum: type[IntEnum], doc: str) -> type[_OneByte]:
    cls = dataclass(frozen=True)(type(name, (_OneByte,), {"CODE": code, "ENUM": enum, "__doc__": doc,
                                                           "__module__": __name__}))
    return cls


ConEnDecAlg = _one("ConEnDecAlg", CtlType.CON_EN_DEC_ALG, EnDecId, "11.2.6.4, figure 116.")
GkEnDecAlg = _one("GkEnDecAlg", CtlType.GK_EN_DEC_ALG, EnDecId, "11.2.6.5, figure 117.")
AuthAlg = _one("AuthAlg", CtlType.AUTH_ALG, AuthId, "11.2.6.6, figure 118.")
GkMechDeliver = _one("GkMechDeliver", CtlType.GK_MECH_DELIVER, GkName, "11.2.7.2, figure 120.")
AuthMechDeliver = _one("AuthMechDeliver", CtlType.AUTH_MECH_DELIVER, AuthName, "11.2.7.3, figure 121.")
ConEnDecDeliver = _one("ConEnDecDeliver", CtlType.CON_EN_DEC_DELIVER, EnDecId, "11.2.7.4, figure 122.")
GkEnDecDeliver = _one("GkEnDecDeliver", CtlType.GK_EN_DEC_DELIVER, EnDecId, "11.2.7.5, figure 123.")
AuthAlgDeliver = _one("AuthAlgDeliver", CtlType.AUTH_ALG_DELIVER, AuthId, "11.2.7.6, figure 124.")
SecReturnCtl = _one("SecReturnCtl", CtlType.SEC_RETURN, SecReturn, "SEC_RETURN, 11.2.8.2, figure 126.")
ResultCtl = _one("ResultCtl", CtlType.RESULT, Result, "RESULT (B.4, defined by this project).")
DeliverResultCtl = _one("DeliverResultCtl", CtlType.DELIVER_RESULT, DeliverResult,
                        "DELIVER_RESULT (B.4, defined by this project).")
DELIVER_CONTROLS = (CtlType.GK_MECH_DELIVER, CtlType.AUTH_MECH_DELIVER, CtlType.CON_EN_DEC_DELIVER,
                    CtlType.GK_EN_DEC_DELIVER, CtlType.AUTH_ALG_DELIVER)


@dataclass(frozen=True)
class KeyInfo(Control):
    """KEY_INFO with its KEY_MATERIAL sub-control (11.2.9.2-3, figure 128). The two
    Key_Type fields must agree (B.2)."""

    CODE = CtlType.KEY_INFO
    key_type: KeyType
    key_data: bytes = field(repr=False)  # key material: never shown

    def body(self) -> bytes:
        return bytes((self.key_type, 0))

    def tail(self) -> bytes:
        return KeyMaterial(self.key_type, self.key_data).encode()


@dataclass(frozen=True)
class AclList(Control):
    """ACL_LIST with its ACL_DATA sub-control (11.2.11.2-3, figure 131); entries are
    HASHED_MAID(16) || HASHED_KTLS(16) (B.8)."""

    CODE = CtlType.ACL_LIST
    LENGTH = 2
    entries: tuple[bytes, ...] = ()

    def body(self) -> bytes:
        return b""

    def tail(self) -> bytes:
        if len(self.entries) > MAX_ACL or any(len(e) != ACL_ENTRY_LEN for e in self.entries):
            raise ValueError("ACL: at most 2000 entries of 32 bytes")
        return _sub(SubType.ACL_DATA, b"\x00" + len(self.entries).to_bytes(2, "big") + b"".join(self.entries))


@dataclass(frozen=True)
class ServUserIdent(Control):
    """SERV_USER_IDENT (11.2.1, figure 105): the CP's identifier, 1..253 bytes."""

    CODE = CtlType.SERV_USER_IDENT
    LENGTH = None
    ident: bytes

    def body(self) -> bytes:
        if not 1 <= len(self.ident) <= 253:
            raise ValueError("SERV_USER_ID is 1..253 bytes")
        return bytes(self.ident)


@dataclass(frozen=True)
class Auth(Control):
    """AUTH (11.2.3.2, figure 106), optionally followed by MA_AUTH (B.11)."""

    CODE = CtlType.AUTH
    auth_name: AuthName = AuthName.MEM_AUTH
    ma_auth: MaAuth | None = None

    def body(self) -> bytes:
        return bytes((self.auth_name, 0))

    def tail(self) -> bytes:
        return self.ma_auth.encode() if self.ma_auth else b""


@dataclass(frozen=True)
class AuthAns(Control):
    """AUTH_ANS (11.2.4.2, figure 107): Key_Flag is 1 exactly when `key` is given; then
    KEY_MATERIAL follows. MA_AUTH (B.11) may follow last."""

    CODE = CtlType.AUTH_ANS
    auth_result: SecReturn
    key: KeyMaterial | None = None
    ma_auth: MaAuth | None = None

    def body(self) -> bytes:
        if self.auth_result == SecReturn.FAILED_CONFIGURATION:
            raise ValueError("FAILED CONFIGURATION applies only to SEC_RETURN (Table 24)")
        return bytes((self.auth_result, 1 if self.key else 0))

    def tail(self) -> bytes:
        return (self.key.encode() if self.key else b"") + (self.ma_auth.encode() if self.ma_auth else b"")


@dataclass(frozen=True)
class _Fixed(Control):
    """Project controls with Reserved(2) then fixed bytes (a seed or a nonce: never shown)."""

    value: bytes = field(repr=False)
    SIZE: ClassVar[int]

    def body(self) -> bytes:
        if len(self.value) != self.SIZE:
            raise ValueError(f"{self.CODE.name}: {self.SIZE} bytes")
        return b"\x00\x00" + bytes(self.value)

    @classmethod
    def parse(cls, b: bytes) -> _Fixed:
        _zero(b[:2], cls.CODE.name)
        return cls(bytes(b[2:]))


@dataclass(frozen=True)
class KtlsNonce(_Fixed):
    """KTLS_NONCE (B.4, B.5): the MA's 16-byte nonce."""

    CODE = CtlType.KTLS_NONCE
    LENGTH = 20
    SIZE = 16


@dataclass(frozen=True)
class KtlsSeed(_Fixed):
    """KTLS_SEED (B.4, B.5): the SM's 32-byte seed."""

    CODE = CtlType.KTLS_SEED
    LENGTH = 36
    SIZE = 32


@dataclass(frozen=True)
class Status(Control):
    """STATUS (B.4, defined by this project)."""

    CODE = CtlType.STATUS
    LENGTH = 8
    children: int
    members: int
    key_gen: int

    def body(self) -> bytes:
        return struct.pack(">HHBB", self.children, self.members, self.key_gen, 0)

    @classmethod
    def parse(cls, b: bytes) -> Status:
        _zero(b[5:6], "STATUS")
        c, m, g, _ = struct.unpack(">HHBB", b)
        return cls(c, m, g)


@dataclass(frozen=True)
class ProbeAuth(Control):
    """PROBE_AUTH (B.4): HASHED_MAID(16) nonce(8) proof(8), the hashed AUTH of 10.2.4."""

    CODE = CtlType.PROBE_AUTH
    LENGTH = 36
    hashed_maid: bytes
    nonce: bytes
    proof: bytes

    def body(self) -> bytes:
        if (len(self.hashed_maid), len(self.nonce), len(self.proof)) != (16, 8, 8):
            raise ValueError("PROBE_AUTH: 16 + 8 + 8 bytes")
        return b"\x00\x00" + self.hashed_maid + self.nonce + self.proof

    @classmethod
    def parse(cls, b: bytes) -> ProbeAuth:
        _zero(b[:2], "PROBE_AUTH")
        return cls(bytes(b[2:18]), bytes(b[18:26]), bytes(b[26:34]))


@dataclass(frozen=True)
class Candidate(Control):
    """CANDIDATE (B.4): the MAID of a candidate HMA."""

    CODE = CtlType.CANDIDATE
    LENGTH = 10
    maid: bytes

    def body(self) -> bytes:
        return _check_maid(self.maid)

    @classmethod
    def parse(cls, b: bytes) -> Candidate:
        if not any(b):
            raise Rmcp2Error(ErrorCode.MAID, "CANDIDATE MAID all zero")
        return cls(bytes(b))


@dataclass(frozen=True)
class ContentAddr(Control):
    """CONTENT_ADDR (B.4, defined by this project): the content ports of the sender, UDP and TCP;
    0 = not over that transport. The address is never in the message: a receiver takes the peer
    address of the TCP link the control arrived on (B.15, B.17), so nobody can point content at
    a third party."""

    CODE = CtlType.CONTENT_ADDR
    LENGTH = 8
    udp: int = 0
    tcp: int = 0

    def body(self) -> bytes:
        if not (0 <= self.udp <= 0xFFFF and 0 <= self.tcp <= 0xFFFF):
            raise ValueError("CONTENT_ADDR: ports are 16 bits")
        return struct.pack(">HHH", 0, self.udp, self.tcp)

    @classmethod
    def parse(cls, b: bytes) -> ContentAddr:
        _zero(b[:2], "CONTENT_ADDR")
        _r, udp, tcp = struct.unpack(">HHH", b)
        return cls(udp, tcp)


# Fixed Length of each known control (None: variable), and its parser for simple ones.
CONTROL_LENGTH: dict[int, int | None] = {
    CtlType.SMA_PROPOSE: 8, CtlType.GK_MECH: 8, CtlType.ACL_LIST: 2, CtlType.SERV_USER_IDENT: None,
    CtlType.KTLS_NONCE: 20, CtlType.KTLS_SEED: 36, CtlType.STATUS: 8, CtlType.PROBE_AUTH: 36,
    CtlType.CANDIDATE: 10, CtlType.CONTENT_ADDR: 8,
}
_SIMPLE = {c.CODE: c for c in (SmaPropose, GkMechCapab, EnDecCapab, AuthAlgCapab, GkMech, AuthMech, ConEnDecAlg,
                               GkEnDecAlg, AuthAlg, GkMechDeliver, AuthMechDeliver, ConEnDecDeliver, GkEnDecDeliver,
                               AuthAlgDeliver, SecReturnCtl, ResultCtl, DeliverResultCtl, KtlsNonce, KtlsSeed,
                               Status, ProbeAuth, Candidate, ContentAddr)}
SUB_TYPES = frozenset(int(s) for s in SubType)


def control_length(code: int) -> int | None:
    return CONTROL_LENGTH.get(code, 4)


# ---------------------------------------------------------------------------- messages
@dataclass(frozen=True)
class Rule:
    """Which node types may send a message, which controls it carries (A.5, B.3)."""

    nts: frozenset[NodeType]
    mandatory: frozenset[CtlType] = frozenset()
    optional: frozenset[CtlType] = frozenset()
    repeat: dict[CtlType, int] = field(default_factory=dict)  # repeatable -> max count
    fixed_length: int | None = None


def _r(nts, mandatory=(), optional=(), repeat=None, fixed_length=None) -> Rule:
    return Rule(frozenset(nts), frozenset(mandatory), frozenset(optional), repeat or {}, fixed_length)


N = NodeType
C = CtlType
_MAS = (N.SMA, N.DMA, N.RMA)
_ALL = (N.SM, N.SMA, N.DMA, N.RMA)
_CAPAB = {C.GK_MECH_CAPAB: MAX_CAPAB, C.EN_DEC_CAPAB: MAX_CAPAB, C.AUTH_ALG_CAPAB: MAX_CAPAB}
RULES: dict[MsgType, Rule] = {
    MsgType.SUBSREQ: _r(_MAS, optional=[C.SERV_USER_IDENT]),
    MsgType.RELREQ: _r([N.DMA, N.RMA], [C.AUTH]),
    MsgType.RELANS: _r([N.SMA, N.DMA], [C.AUTH_ANS], [C.KEY_INFO]),
    MsgType.SECAGREQ: _r(_MAS, optional=[C.SMA_PROPOSE, *_CAPAB], repeat=_CAPAB),
    MsgType.SECLIST: _r([N.SM], [C.GK_MECH, C.AUTH_MECH, C.CON_EN_DEC_ALG, C.GK_EN_DEC_ALG, C.AUTH_ALG]),
    MsgType.SECALGREQ: _r(_MAS, optional=DELIVER_CONTROLS),
    MsgType.SECAGANS: _r(_MAS, [C.SEC_RETURN]),
    MsgType.KEYDELIVER: _r([N.SM, N.SMA, N.DMA], [C.KEY_INFO]),
    MsgType.HRSREQ: _r([N.DMA], fixed_length=HEADER_LEN),
    MsgType.HRSANS: _r([N.SM], [C.ACL_LIST]),
    MsgType.SUBSANS: _r([N.SM], [C.RESULT]),
    MsgType.PPROBREQ: _r([N.DMA, N.RMA], optional=[C.PROBE_AUTH, C.CONTENT_ADDR]),
    MsgType.PPROBANS: _r([N.SMA, N.DMA], [C.RESULT], [C.STATUS]),
    MsgType.HSOLICIT: _r([N.RMA, N.DMA]),
    # CANDIDATE on HANNOUNCE: the HMA's ordered candidate list (B.18, defined by this project)
    MsgType.HANNOUNCE: _r([N.DMA], optional=[C.CANDIDATE], repeat={C.CANDIDATE: MAX_CANDIDATES}),
    MsgType.HLEAVE: _r([N.DMA], optional=[C.CANDIDATE], repeat={C.CANDIDATE: MAX_CANDIDATES}),
    MsgType.STREQ: _r([N.SM]),
    MsgType.STANS: _r(_MAS, [C.STATUS]),
    MsgType.STCOLREQ: _r([N.SMA, N.DMA]),
    MsgType.STCOLANS: _r([N.DMA, N.RMA], [C.STATUS]),
    MsgType.LEAVREQ: _r(_ALL, [C.RESULT]),
    MsgType.LEAVANS: _r(_ALL, [C.RESULT]),
    MsgType.HB: _r(_ALL, optional=[C.CONTENT_ADDR]),
    MsgType.TERMREQ: _r([N.SM, N.SMA, N.DMA], [C.RESULT]),
    MsgType.TERMANS: _r(_MAS, [C.RESULT]),
    MsgType.SECALGANS: _r([N.SM], optional=[*DELIVER_CONTROLS, C.DELIVER_RESULT],
                          repeat={C.DELIVER_RESULT: len(DELIVER_CONTROLS)}),
    MsgType.KTLSREQ: _r(_MAS, [C.KTLS_NONCE]),
    MsgType.KTLSANS: _r([N.SM], [C.KTLS_SEED]),
    MsgType.KCREQ: _r([N.DMA], [C.RESULT]),
}
# encoder order (B.2): the order of the control types in the tables
_ORDER = {c: i for i, c in enumerate(CtlType)}
KEY_NT = {KeyType.KS: NodeType.SM, KeyType.KG: NodeType.DMA, KeyType.KC: NodeType.SMA}  # 11.2.9.1 b

CT = TypeVar("CT", bound=Control)


@dataclass(frozen=True)
class Message:
    """A secure RMCP-2 message: the common header (A.4) and its controls, in wire order.
    `skipped` counts unknown controls the decoder skipped (B.2); encode() ignores it."""

    type: MsgType
    nt: NodeType
    session_id: int
    maid: bytes
    controls: tuple[Control, ...] = ()
    skipped: int = field(default=0, compare=False)

    def get(self, cls: type[CT]) -> CT | None:
        for c in self.controls:
            if isinstance(c, cls):
                return c
        return None

    def all(self, cls: type[CT]) -> list[CT]:
        return [c for c in self.controls if isinstance(c, cls)]

    def encode(self) -> bytes:
        """Encode, checking the message against the same rules as decode()."""
        if not 0 <= self.session_id <= 0xFFFFFFFFFFFFFFFF:
            raise ValueError("Session ID is 64 bits")
        maid = _check_maid(self.maid)
        body = b"".join(c.encode() for c in self.controls)
        n = HEADER_LEN + len(body)
        if n > MAX_MESSAGE:
            raise ValueError("message longer than 65535 bytes")
        out = bytes(((VERSION << 4) | int(self.nt), int(self.type))) + n.to_bytes(2, "big") + \
            self.session_id.to_bytes(8, "big") + maid + body
        try:
            again = decode(out)
        except Rmcp2Error as e:
            raise ValueError(f"not a valid {self.type.name}: {e}") from None
        if again != self:
            raise ValueError(f"{self.type.name} does not survive its own decoder")
        return out


def canonical(msg: Message) -> Message:
    """The same message with its controls in encoder order (B.2)."""
    return Message(msg.type, msg.nt, msg.session_id, msg.maid,
                   tuple(sorted(msg.controls, key=lambda c: _ORDER[c.CODE])))


def _subcontrol(data: bytes, i: int, end: int, want: int, minimum: int, what: str) -> tuple[int, int]:
    """Locate the sub-control `want` at data[i]; return (body start, next offset)."""
    if i + 3 > end or data[i] != want:
        raise Rmcp2Error(ErrorCode.SUBCONTROL, f"{what}: missing {SubType(want).name}")
    n = int.from_bytes(data[i + 1:i + 3], "big")
    if n < minimum or i + n > end:
        raise Rmcp2Error(ErrorCode.SUBCONTROL, f"{what}: {SubType(want).name} length {n}")
    return i + 3, i + n


def _ma_auth(data: bytes, i: int, end: int) -> tuple[MaAuth | None, int]:
    if i < end and data[i] == SubType.MA_AUTH:
        s, nxt = _subcontrol(data, i, end, SubType.MA_AUTH, 4, "MA_AUTH")
        if not 1 <= data[s] <= 3:
            raise Rmcp2Error(ErrorCode.VALUE, f"MA_AUTH pass {data[s]}")
        return MaAuth(data[s], bytes(data[s + 1:nxt])), nxt
    return None, i


def _key_material(data: bytes, i: int, end: int, what: str) -> tuple[KeyMaterial, int]:
    s, nxt = _subcontrol(data, i, end, SubType.KEY_MATERIAL, 4, what)
    if nxt - i > MAX_KEY_MATERIAL:
        raise Rmcp2Error(ErrorCode.SUBCONTROL, f"{what}: KEY_MATERIAL longer than 0x804")
    return KeyMaterial(_enum(KeyType, data[s], "Key_Type"), bytes(data[s + 1:nxt])), nxt


def _parse_control(code: CtlType, body: bytes, data: bytes, nxt: int, end: int) -> tuple[Control, int]:
    """Parse one known control whose fixed part is `body`; sub-controls start at nxt."""
    simple = _SIMPLE.get(code)
    if simple is not None:
        return simple.parse(body), nxt
    if code == C.SERV_USER_IDENT:
        if not body:
            raise Rmcp2Error(ErrorCode.CONTROL_LENGTH, "empty SERV_USER_ID")
        return ServUserIdent(bytes(body)), nxt
    if code == C.AUTH:
        _zero(body[1:2], "AUTH")
        name = _enum(AuthName, body[0], "AUTH_NAME")
        ma, nxt = _ma_auth(data, nxt, end)
        return Auth(name, ma), nxt
    if code == C.AUTH_ANS:
        res = _enum(SecReturn, body[0], "Auth_result")
        if res == SecReturn.FAILED_CONFIGURATION or body[1] > 1:
            raise Rmcp2Error(ErrorCode.VALUE, "Auth_result 0x04 or Key_Flag")
        key = None
        if body[1]:
            key, nxt = _key_material(data, nxt, end, "AUTH_ANS")
        ma, nxt = _ma_auth(data, nxt, end)
        return AuthAns(res, key, ma), nxt
    if code == C.KEY_INFO:
        _zero(body[1:2], "KEY_INFO")
        kt = _enum(KeyType, body[0], "Key_Type")
        km, nxt = _key_material(data, nxt, end, "KEY_INFO")
        if km.key_type != kt:
            raise Rmcp2Error(ErrorCode.SUBCONTROL, "KEY_MATERIAL Key_Type differs from KEY_INFO's")
        return KeyInfo(kt, km.key_data), nxt
    # ACL_LIST
    s, e = _subcontrol(data, nxt, end, SubType.ACL_DATA, 6, "ACL_LIST")
    _zero(data[s:s + 1], "ACL_DATA")
    count = int.from_bytes(data[s + 1:s + 3], "big")
    if count > MAX_ACL or e - (s + 3) != count * ACL_ENTRY_LEN:
        raise Rmcp2Error(ErrorCode.SUBCONTROL, f"ACL_DATA: N_ACL {count} vs length")
    entries = tuple(bytes(data[p:p + ACL_ENTRY_LEN]) for p in range(s + 3, e, ACL_ENTRY_LEN))
    return AclList(entries), e


def iter_controls(data: bytes, start: int = HEADER_LEN) -> Iterator[tuple[int, int, int]]:
    """Walk the control area: yield (type, start, length) of each control (B.2 step 1)."""
    i, end = start, len(data)
    while i < end:
        if i + 2 > end:
            raise Rmcp2Error(ErrorCode.CONTROL_LENGTH, "control header cut")
        t, n = data[i], data[i + 1]
        if n < 2 or i + n > end:
            raise Rmcp2Error(ErrorCode.CONTROL_LENGTH, f"control {t:#04x} length {n}")
        yield t, i, n
        i += n


def check_header(data: bytes, minimum: int) -> tuple[MsgType, NodeType]:
    """Step 1 of profile B.12 (shared with the envelope, B.7): sizes, Length, Ver, type, NT, MAID."""
    n = len(data)
    if n < minimum:
        raise Rmcp2Error(ErrorCode.TRUNCATED, f"{n} bytes")
    if int.from_bytes(data[2:4], "big") != n:
        raise Rmcp2Error(ErrorCode.LENGTH, f"Length field vs {n} bytes")
    if data[0] >> 4 != VERSION:
        raise Rmcp2Error(ErrorCode.VERSION, f"{data[0] >> 4}")
    try:
        mtype = MsgType(data[1])
    except ValueError:
        raise Rmcp2Error(ErrorCode.UNKNOWN_MESSAGE, f"{data[1]:#04x}") from None
    nt = data[0] & 0x0F
    if nt not in RULES[mtype].nts:
        raise Rmcp2Error(ErrorCode.NODE_TYPE, f"{nt:#x} may not send {mtype.name}")
    if not any(data[12:20]):
        raise Rmcp2Error(ErrorCode.MAID, "all-zero MAID")
    return mtype, NodeType(nt)


def decode(data: bytes) -> Message:
    """Decode one message (profile B.2, B.12 order). Raises Rmcp2Error only."""
    data = bytes(data)
    n = len(data)
    mtype, nt = check_header(data, HEADER_LEN)
    rule = RULES[mtype]
    maid = data[12:20]
    if rule.fixed_length is not None and n != rule.fixed_length:
        raise Rmcp2Error(ErrorCode.LENGTH, f"{mtype.name} Length must be {rule.fixed_length:#x}")
    controls: list[Control] = []
    counts: dict[int, int] = {}
    skipped = 0
    i = HEADER_LEN
    while i < n:
        if i + 2 > n:
            raise Rmcp2Error(ErrorCode.CONTROL_LENGTH, "control header cut")
        t, ln = data[i], data[i + 1]
        if t in SUB_TYPES:
            raise Rmcp2Error(ErrorCode.SUBCONTROL, f"sub-control {t:#04x} where a control is expected")
        if ln < 2 or i + ln > n:
            raise Rmcp2Error(ErrorCode.CONTROL_LENGTH, f"control {t:#04x} length {ln}")
        if t not in _ORDER_CODES:
            skipped += 1  # unknown: skipped by its Length (B.2)
            i += ln
            continue
        code = CtlType(t)
        want = control_length(code)
        if want is not None and ln != want:
            raise Rmcp2Error(ErrorCode.CONTROL_LENGTH, f"{code.name} length {ln}, must be {want}")
        if code not in rule.mandatory and code not in rule.optional:
            raise Rmcp2Error(ErrorCode.UNEXPECTED_CONTROL, f"{code.name} in {mtype.name}")
        counts[code] = counts.get(code, 0) + 1
        if counts[code] > rule.repeat.get(code, 1):
            raise Rmcp2Error(ErrorCode.DUPLICATE_CONTROL, f"{code.name} in {mtype.name}")
        ctl, i = _parse_control(code, data[i + 2:i + ln], data, i + ln, n)
        controls.append(ctl)
    for code in rule.mandatory:
        if code not in counts:
            raise Rmcp2Error(ErrorCode.MISSING_CONTROL, f"{code.name} in {mtype.name}")
    _cross_checks(mtype, nt, controls, counts)
    return Message(mtype, nt, int.from_bytes(data[4:12], "big"), bytes(maid), tuple(controls), skipped)


_ORDER_CODES = frozenset(int(c) for c in CtlType)


def _cross_checks(mtype: MsgType, nt: NodeType, controls: list[Control], counts: dict[int, int]) -> None:
    """Conditions that span several fields (A.5, B.2, B.3), checked after the walk."""
    if mtype == MsgType.SUBSREQ and C.SERV_USER_IDENT in counts and nt != N.RMA:
        raise Rmcp2Error(ErrorCode.UNEXPECTED_CONTROL, "SERV_USER_IDENT from a non-RMA (11.2.1)")
    elif mtype == MsgType.SECAGREQ:
        if nt == N.SMA and C.SMA_PROPOSE not in counts:
            raise Rmcp2Error(ErrorCode.MISSING_CONTROL, "SMA_PROPOSE from the SMA (11.2.5.1 g)")
        if nt != N.SMA and C.SMA_PROPOSE in counts:
            raise Rmcp2Error(ErrorCode.UNEXPECTED_CONTROL, "SMA_PROPOSE from a non-SMA (11.2.5.1 g)")
        if nt == N.RMA and any(c in counts for c in _CAPAB):
            raise Rmcp2Error(ErrorCode.UNEXPECTED_CONTROL, "capabilities from an RMA (11.2.5.1 g)")
        for cls in (GkMechCapab, EnDecCapab, AuthAlgCapab):
            vals = [c.value for c in controls if isinstance(c, cls)]
            if len(vals) != len(set(vals)):
                raise Rmcp2Error(ErrorCode.DUPLICATE_CONTROL, f"{cls.CODE.name}: a value twice")
    elif mtype == MsgType.SECALGREQ and not counts:
        raise Rmcp2Error(ErrorCode.MISSING_CONTROL, "SECALGREQ without a *_DELIVER control")
    elif mtype == MsgType.SECALGANS:
        _check_secalgans(controls)
    elif mtype == MsgType.PPROBREQ and (nt == N.RMA) != (C.PROBE_AUTH in counts):
        raise Rmcp2Error(ErrorCode.MISSING_CONTROL if nt == N.RMA else ErrorCode.UNEXPECTED_CONTROL,
                         "PROBE_AUTH is carried exactly by an RMA's PPROBREQ (B.3)")
    elif mtype == MsgType.KEYDELIVER:
        ki = controls[0]
        assert isinstance(ki, KeyInfo)
        if KEY_NT[ki.key_type] != nt:
            raise Rmcp2Error(ErrorCode.NODE_TYPE, f"{ki.key_type.name} delivered by {nt.name} (11.2.9.1 b)")


def _check_secalgans(controls: list[Control]) -> None:
    """B.3: pairs of (*_DELIVER, DELIVER_RESULT), at least one, each kind once."""
    if not controls or len(controls) % 2:
        raise Rmcp2Error(ErrorCode.MISSING_CONTROL, "SECALGANS: *_DELIVER / DELIVER_RESULT pairs")
    for k in range(0, len(controls), 2):
        if controls[k].CODE not in DELIVER_CONTROLS or controls[k + 1].CODE != C.DELIVER_RESULT:
            raise Rmcp2Error(ErrorCode.MISSING_CONTROL, "SECALGANS: *_DELIVER then DELIVER_RESULT")


# ---------------------------------------------------------------------------- KEY_DATA (B.6)
@dataclass(frozen=True)
class KeyData:
    """KEY_DATA of KEY_MATERIAL (B.6, defined by this project): Gen Mode Period Key."""

    gen: int
    mode: KeyMode
    period: int
    key: bytes = field(repr=False)

    LEN: ClassVar[int] = 20

    def encode(self) -> bytes:
        if not 1 <= self.gen <= 255 or not 0 <= self.period <= 0xFFFF or len(self.key) != 16:
            raise ValueError("KEY_DATA: gen 1..255, period 0..65535, 16-byte key")
        return struct.pack(">BBH", self.gen, self.mode, self.period) + self.key

    @classmethod
    def decode(cls, b: bytes) -> KeyData:
        if len(b) != cls.LEN:
            raise Rmcp2Error(ErrorCode.SUBCONTROL, f"KEY_DATA is {cls.LEN} bytes, not {len(b)}")
        gen, mode, period = struct.unpack(">BBH", b[:4])
        if gen == 0:
            raise Rmcp2Error(ErrorCode.VALUE, "KEY_DATA generation 0")
        return cls(gen, _enum(KeyMode, mode, "KEY_DATA Mode"), period, bytes(b[4:]))
