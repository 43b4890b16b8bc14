"""ASM codec: KLV framing and every request / response of SMPTE 430-6-2008.

Framing (clause 6.2): 16-byte UL key, BER long-form length fixed at 4 bytes
(0x83 + 3 bytes big-endian), then a fixed-length pack of big-endian items (clause 6.3).
Batches (clause 6.3): UInt32 item count, UInt32 item length, then the items.
UL values are from Annex A: 06 0E 2B 34 02 05 01 01 02 07 01 XX YY 00 00 00.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import ClassVar

UL_PREFIX = bytes.fromhex("060e2b34020501010207 01".replace(" ", ""))  # Annex A, bytes 1-11
SMPTE_UL_HEADER = bytes.fromhex("060e2b34")  # any SMPTE UL starts with these 4 bytes
KEY_LEN = 16
LEN_LEN = 4  # clause 6.2: long-form BER, fixed 4 bytes total
HEADER_LEN = KEY_LEN + LEN_LEN
BER_4 = 0x83
# Project choice, not the standard's: the largest Value a peer accepts. The biggest request
# (LEKeyLoad) with 1024 keys is 8 + 32*1024 + 4 bytes; log records are small XML documents.
MAX_VALUE_LEN = 64 * 1024
MAX_UINT32 = 0xFFFFFFFF


class GeneralResponse(enum.IntEnum):
    """General Response Elements, clause 6.3."""

    SUCCESSFUL = 0
    FAILED = 1
    INVALID = 2
    BUSY = 3


class SPBStatus(enum.IntEnum):
    """QuerySPB response status (clause 7.5)."""

    NOT_PLAYING = 0
    PLAYING = 1
    SECURITY_ALERT = 2


class CodecError(ValueError):
    """A message cannot be decoded. `fatal` means the stream can no longer be framed."""

    def __init__(self, kind: str, detail: str, fatal: bool = False) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.fatal = fatal


def ul(xx: int, yy: int) -> bytes:
    return UL_PREFIX + bytes([xx, yy, 0, 0, 0])


def encode_length(n: int) -> bytes:
    """Clause 6.2: e.g. 12 -> 83 00 00 0C."""
    if not 0 <= n <= 0xFFFFFF:
        raise ValueError("KLV value too long for a 4-byte BER length")
    return bytes([BER_4]) + n.to_bytes(3, "big")


def klv(key: bytes, value: bytes) -> bytes:
    return key + encode_length(len(value)) + value


# --------------------------------------------------------------------------- items
@dataclass(frozen=True)
class LEKey:
    """One LEKeyBatch item (clause 8.1): 32 bytes."""

    key_id: int
    key: bytes = field(repr=False)  # never printed: key material
    expire: int  # seconds of validity from load
    attribute: int  # UInt64 AES counter-mode seed

    SIZE: ClassVar[int] = 32

    def __post_init__(self) -> None:
        if len(self.key) != 16:
            raise ValueError("an LE key is 16 bytes (AES-128)")

    def pack(self) -> bytes:
        return struct.pack(">I16sIQ", self.key_id, self.key, self.expire, self.attribute)

    @classmethod
    def unpack(cls, b: bytes) -> LEKey:
        kid, key, exp, attr = struct.unpack(">I16sIQ", b)
        return cls(kid, key, exp, attr)


def pack_batch(items: list[bytes], item_len: int) -> bytes:
    out = bytearray(struct.pack(">II", len(items), item_len))
    for it in items:
        if len(it) != item_len:
            raise ValueError("batch item of the wrong size")
        out += it
    return bytes(out)


def unpack_batch(buf: bytes, pos: int, item_len: int) -> tuple[list[bytes], int]:
    """Clause 6.3 batch; the item length must be the one the message defines."""
    if len(buf) - pos < 8:
        raise CodecError("truncated-batch", "batch header missing")
    count, length = struct.unpack_from(">II", buf, pos)
    pos += 8
    if length != item_len:
        raise CodecError("batch-item-length", f"item length {length}, expected {item_len}")
    if count * length > len(buf) - pos:
        raise CodecError("truncated-batch", f"{count} items of {length} bytes exceed the message")
    items = [bytes(buf[pos + i * length: pos + (i + 1) * length]) for i in range(count)]
    return items, pos + count * length


# --------------------------------------------------------------------------- messages
# Field kinds: "I" UInt32, "Q" UInt64, "B" UInt8, "ids" batch of UInt32,
# "keys" batch of LEKey, "var" variable text/bytes (the rest of the value minus fixed tail).
_FMT = {"I": ">I", "Q": ">Q", "B": ">B"}


@dataclass(frozen=True)
class Message:
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = ()
    KEY: ClassVar[bytes] = b""
    IS_REQUEST: ClassVar[bool] = True
    NAME: ClassVar[str] = ""

    def encode_value(self) -> bytes:
        out = bytearray()
        for name, kind in self.FIELDS:
            v = getattr(self, name)
            if kind in _FMT:
                out += struct.pack(_FMT[kind], int(v))
            elif kind == "ids":
                out += pack_batch([struct.pack(">I", i) for i in v], 4)
            elif kind == "keys":
                out += pack_batch([k.pack() for k in v], LEKey.SIZE)
            elif kind == "var":
                out += bytes(v)
        return bytes(out)

    def encode(self) -> bytes:
        return klv(self.KEY, self.encode_value())

    @classmethod
    def decode_value(cls, value: bytes) -> Message:
        vals: dict[str, object] = {}
        pos = 0
        fixed_after_var = 0
        seen_var = False
        for _, kind in cls.FIELDS:
            if seen_var:
                fixed_after_var += struct.calcsize(_FMT[kind])
            if kind == "var":
                seen_var = True
        for name, kind in cls.FIELDS:
            if kind in _FMT:
                size = struct.calcsize(_FMT[kind])
                if len(value) - pos < size:
                    raise CodecError("short-value", f"{cls.NAME}: value ends before {name}")
                (vals[name],) = struct.unpack_from(_FMT[kind], value, pos)
                pos += size
            elif kind == "ids":
                items, pos = unpack_batch(value, pos, 4)
                ids = [struct.unpack(">I", i)[0] for i in items]
                if len(set(ids)) != len(ids):  # clause 7.3: one entry per ID
                    raise CodecError("duplicate-id", f"{cls.NAME}: duplicate IDs in batch")
                vals[name] = tuple(ids)
            elif kind == "keys":
                items, pos = unpack_batch(value, pos, LEKey.SIZE)
                keys = tuple(LEKey.unpack(i) for i in items)
                if len({k.key_id for k in keys}) != len(keys):
                    raise CodecError("duplicate-id", f"{cls.NAME}: duplicate key IDs in batch")
                vals[name] = keys
            elif kind == "var":
                end = len(value) - fixed_after_var
                if end < pos:
                    raise CodecError("short-value", f"{cls.NAME}: value too short")
                vals[name] = bytes(value[pos:end])
                pos = end
        if pos != len(value):
            raise CodecError("long-value", f"{cls.NAME}: {len(value) - pos} trailing bytes")
        try:
            return cls(**vals)  # type: ignore[arg-type]
        except ValueError as exc:
            raise CodecError("bad-field", f"{cls.NAME}: {exc}") from None


def _resp(v: int) -> GeneralResponse | int:
    try:
        return GeneralResponse(v)
    except ValueError:
        return v


@dataclass(frozen=True)
class BadRequestResponse(Message):
    """Clause 7.1. No Request_ID: the copy carries it. Busy: the copy is empty."""

    request_copy: bytes = field(default=b"", repr=False)  # the copy may hold LE keys
    response: int = GeneralResponse.INVALID
    FIELDS = (("request_copy", "var"), ("response", "B"))
    KEY = ul(0x01, 0x01)
    IS_REQUEST = False
    NAME = "BadRequest"


@dataclass(frozen=True)
class GetTimeRequest(Message):
    request_id: int
    FIELDS = (("request_id", "I"),)
    KEY = ul(0x02, 0x10)
    NAME = "GetTime"


@dataclass(frozen=True)
class GetTimeResponse(Message):
    request_id: int
    time: int
    response: int = GeneralResponse.SUCCESSFUL
    FIELDS = (("request_id", "I"), ("time", "Q"), ("response", "B"))
    KEY = ul(0x02, 0x11)
    IS_REQUEST = False
    NAME = "GetTime"


@dataclass(frozen=True)
class GetEventListRequest(Message):
    request_id: int
    time_start: int
    time_stop: int
    FIELDS = (("request_id", "I"), ("time_start", "I"), ("time_stop", "I"))
    KEY = ul(0x02, 0x12)
    NAME = "GetEventList"


@dataclass(frozen=True)
class GetEventListResponse(Message):
    request_id: int
    event_ids: tuple[int, ...] = ()
    response: int = GeneralResponse.SUCCESSFUL
    FIELDS = (("request_id", "I"), ("event_ids", "ids"), ("response", "B"))
    KEY = ul(0x02, 0x13)
    IS_REQUEST = False
    NAME = "GetEventList"


@dataclass(frozen=True)
class GetEventIDRequest(Message):
    request_id: int
    event_id: int
    FIELDS = (("request_id", "I"), ("event_id", "I"))
    KEY = ul(0x02, 0x14)
    NAME = "GetEventID"


@dataclass(frozen=True)
class GetEventIDResponse(Message):
    request_id: int
    log_record: bytes = b""
    response: int = GeneralResponse.SUCCESSFUL
    FIELDS = (("request_id", "I"), ("log_record", "var"), ("response", "B"))
    KEY = ul(0x02, 0x15)
    IS_REQUEST = False
    NAME = "GetEventID"


@dataclass(frozen=True)
class QuerySPBRequest(Message):
    request_id: int
    FIELDS = (("request_id", "I"),)
    KEY = ul(0x02, 0x16)
    NAME = "QuerySPB"


@dataclass(frozen=True)
class QuerySPBResponse(Message):
    request_id: int
    protocol_version: int = 1
    status: int = SPBStatus.NOT_PLAYING
    response: int = GeneralResponse.SUCCESSFUL
    FIELDS = (("request_id", "I"), ("protocol_version", "B"), ("status", "B"), ("response", "B"))
    KEY = ul(0x02, 0x17)
    IS_REQUEST = False
    NAME = "QuerySPB"


@dataclass(frozen=True)
class LEKeyLoadRequest(Message):
    request_id: int
    keys: tuple[LEKey, ...] = ()
    FIELDS = (("request_id", "I"), ("keys", "keys"))
    KEY = ul(0x03, 0x20)
    NAME = "LEKeyLoad"


@dataclass(frozen=True)
class LEKeyLoadResponse(Message):
    request_id: int
    overflow: int = 0
    response: int = GeneralResponse.SUCCESSFUL
    FIELDS = (("request_id", "I"), ("overflow", "B"), ("response", "B"))
    KEY = ul(0x03, 0x21)
    IS_REQUEST = False
    NAME = "LEKeyLoad"


@dataclass(frozen=True)
class LEKeyQueryIDRequest(Message):
    request_id: int
    key_id: int
    FIELDS = (("request_id", "I"), ("key_id", "I"))
    KEY = ul(0x03, 0x22)
    NAME = "LEKeyQueryID"


@dataclass(frozen=True)
class LEKeyQueryIDResponse(Message):
    request_id: int
    present: int = 0
    response: int = GeneralResponse.SUCCESSFUL
    FIELDS = (("request_id", "I"), ("present", "B"), ("response", "B"))
    KEY = ul(0x03, 0x23)
    IS_REQUEST = False
    NAME = "LEKeyQueryID"


@dataclass(frozen=True)
class LEKeyQueryAllRequest(Message):
    request_id: int
    FIELDS = (("request_id", "I"),)
    KEY = ul(0x03, 0x24)
    NAME = "LEKeyQueryAll"


@dataclass(frozen=True)
class LEKeyQueryAllResponse(Message):
    request_id: int
    key_ids: tuple[int, ...] = ()
    response: int = GeneralResponse.SUCCESSFUL
    FIELDS = (("request_id", "I"), ("key_ids", "ids"), ("response", "B"))
    KEY = ul(0x03, 0x25)
    IS_REQUEST = False
    NAME = "LEKeyQueryAll"


@dataclass(frozen=True)
class LEKeyPurgeIDRequest(Message):
    request_id: int
    key_id: int
    FIELDS = (("request_id", "I"), ("key_id", "I"))
    KEY = ul(0x03, 0x26)
    NAME = "LEKeyPurgeID"


@dataclass(frozen=True)
class LEKeyPurgeIDResponse(Message):
    request_id: int
    no_key_id: int = 0
    response: int = GeneralResponse.SUCCESSFUL
    FIELDS = (("request_id", "I"), ("no_key_id", "B"), ("response", "B"))
    KEY = ul(0x03, 0x27)
    IS_REQUEST = False
    NAME = "LEKeyPurgeID"


@dataclass(frozen=True)
class LEKeyPurgeAllRequest(Message):
    request_id: int
    FIELDS = (("request_id", "I"),)
    KEY = ul(0x03, 0x28)
    NAME = "LEKeyPurgeAll"


@dataclass(frozen=True)
class LEKeyPurgeAllResponse(Message):
    request_id: int
    response: int = GeneralResponse.SUCCESSFUL
    FIELDS = (("request_id", "I"), ("response", "B"))
    KEY = ul(0x03, 0x29)
    IS_REQUEST = False
    NAME = "LEKeyPurgeAll"


MESSAGES: tuple[type[Message], ...] = (
    BadRequestResponse,
    GetTimeRequest, GetTimeResponse, GetEventListRequest, GetEventListResponse,
    GetEventIDRequest, GetEventIDResponse, QuerySPBRequest, QuerySPBResponse,
    LEKeyLoadRequest, LEKeyLoadResponse, LEKeyQueryIDRequest, LEKeyQueryIDResponse,
    LEKeyQueryAllRequest, LEKeyQueryAllResponse, LEKeyPurgeIDRequest, LEKeyPurgeIDResponse,
    LEKeyPurgeAllRequest, LEKeyPurgeAllResponse,
)
BY_KEY: dict[bytes, type[Message]] = {m.KEY: m for m in MESSAGES}
RESPONSE_FOR: dict[type[Message], type[Message]] = {
    req: next(r for r in MESSAGES if not r.IS_REQUEST and r.KEY[11] == req.KEY[11] and r.KEY[12] == req.KEY[12] + 1)
    for req in MESSAGES if req.IS_REQUEST
}


# --------------------------------------------------------------------------- framing
@dataclass(frozen=True)
class Frame:
    key: bytes
    value: bytes = field(repr=False)  # an LEKeyLoad value carries LE keys

    @property
    def raw(self) -> bytes:
        return klv(self.key, self.value)


def parse_header(buf: bytes | bytearray, max_value: int = MAX_VALUE_LEN) -> int | None:
    """Value length from a KLV header, None if more bytes are needed.

    Raises a fatal CodecError when the stream cannot be framed: not a SMPTE UL, a BER
    length that is not the clause 6.2 4-byte long form, or a length above `max_value`.
    """
    if len(buf) >= 4 and bytes(buf[:4]) != SMPTE_UL_HEADER:
        raise CodecError("not-klv", "key is not a SMPTE universal label", fatal=True)
    if len(buf) < KEY_LEN + 1:
        return None
    b0 = buf[KEY_LEN]
    if b0 < 0x80:
        raise CodecError("ber-short-form", "short-form BER length (clause 6.2 requires 4-byte long form)", fatal=True)
    if b0 != BER_4:
        raise CodecError("ber-size", f"BER length of {1 + (b0 & 0x7F)} bytes (clause 6.2 requires 4)", fatal=True)
    if len(buf) < HEADER_LEN:
        return None
    n = int.from_bytes(buf[KEY_LEN + 1:HEADER_LEN], "big")
    if n > max_value:
        raise CodecError("too-long", f"value of {n} bytes exceeds the {max_value}-byte limit", fatal=True)
    return n


MAX_BER_VALUE = 0xFFFFFF  # clause 6.2: the largest length a 4-byte BER field can carry


@dataclass(frozen=True)
class OversizedFrame:
    """A well-framed KLV whose value exceeded the framer's limit and was skipped unread."""

    key: bytes
    length: int


class Framer:
    """Sans-IO KLV reassembly: feed bytes, get complete frames.

    By default a value above `max_value` is fatal (the responder: an unauthenticated or
    broken peer's stream is dropped). With `skip_oversized` (the initiator, reading an
    authenticated responder) such a value is discarded as it arrives, never buffered, and
    reported as an OversizedFrame once it has passed, so the stream stays in step.
    """

    def __init__(self, max_value: int = MAX_VALUE_LEN, skip_oversized: bool = False) -> None:
        self._buf = bytearray()
        self.max_value = max_value
        self.skip_oversized = skip_oversized
        self._skip = 0  # value bytes of an oversized frame still to discard
        self._skipped: OversizedFrame | None = None

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (a request is in progress)."""
        return len(self._buf) + self._skip

    def feed(self, data: bytes) -> list[Frame | OversizedFrame]:
        frames: list[Frame | OversizedFrame] = []
        if self._skip:
            drop = min(self._skip, len(data))
            self._skip -= drop
            data = data[drop:]
            if self._skip:
                return frames
            assert self._skipped is not None
            frames.append(self._skipped)
            self._skipped = None
        self._buf += data
        while True:
            n = parse_header(self._buf, MAX_BER_VALUE if self.skip_oversized else self.max_value)
            if n is None:
                return frames
            if n > self.max_value:  # only in skip mode: parse_header raised otherwise
                key, have = bytes(self._buf[:KEY_LEN]), len(self._buf) - HEADER_LEN
                if have < n:
                    self._skip, self._skipped = n - have, OversizedFrame(key, n)
                    self._buf.clear()
                    return frames
                frames.append(OversizedFrame(key, n))
                del self._buf[:HEADER_LEN + n]
                continue
            if len(self._buf) < HEADER_LEN + n:
                return frames
            frames.append(Frame(bytes(self._buf[:KEY_LEN]), bytes(self._buf[HEADER_LEN:HEADER_LEN + n])))
            del self._buf[:HEADER_LEN + n]


def decode_frame(frame: Frame) -> Message:
    """Decode one complete frame; non-fatal CodecError for unknown keys or bad values."""
    if frame.key[:11] != UL_PREFIX or frame.key[13:] != b"\0\0\0":
        raise CodecError("wrong-ul", "not an ASM universal label (Annex A)")
    cls = BY_KEY.get(frame.key)
    if cls is None:
        raise CodecError("unknown-command", "unknown ASM command")
    return cls.decode_value(frame.value)


def decode(data: bytes) -> Message:
    """Decode exactly one KLV message (no trailing bytes)."""
    n = parse_header(data)
    if n is None:
        raise CodecError("truncated", "incomplete KLV header")
    if len(data) != HEADER_LEN + n:
        raise CodecError("length-mismatch", f"length field says {n}, message carries {len(data) - HEADER_LEN}")
    return decode_frame(Frame(bytes(data[:KEY_LEN]), bytes(data[HEADER_LEN:])))
