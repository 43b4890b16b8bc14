"""TLV codec of TS 103 197 (sans-IO).

Frame: protocol_version (1), message_type (2), message_length (2, counts the bytes after
the 5-byte header), then parameters parameter_type (2), parameter_length (2), value; all
big-endian. `decode` checks the header and TLV structure, `validate` the per-message
cardinality rules; both raise ProtocolError carrying the error_status of the interface
(TS 103 197 5.6 / 6.2.6) and whatever ids could be parsed, so the caller can answer
with channel_error / stream_error and carry on with the next message.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from tessera.simulcrypt.tables import (
    EE, EM, EP, MESSAGES, ME, MM, MP, PARAMS, USER_DEFINED_MIN, VERSIONS, Interface, ParamSpec,
)

HEADER = struct.Struct(">BHH")
TLV = struct.Struct(">HH")
# Largest message body a peer may send us; bigger ones are answered "message too long" and
# skipped. Project choice: the 16-bit length allows 65535, a STKM/LTKM needs far less.
DEFAULT_MAX_BODY = 16384

Value = int | bytes
# Parameters whose value is key material: repr shows only their length.
SECRET_PARAMS = frozenset({(Interface.ECMG, int(EP.CP_CW_COMBINATION))})


class ProtocolError(Exception):
    """A received message broke a rule; `status` is the error_status to send back."""

    def __init__(self, status: int, detail: str, msg: Message | None = None, version: int | None = None,
                 param: int | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.msg = msg  # partially decoded message, when the TLVs could be read
        self.version = version
        self.param = param  # parameter_type of the faulty parameter, when one is to blame


# generic error kinds -> interface-specific error_status
_STATUS = {
    Interface.ECMG: {
        "invalid": EE.INVALID_MESSAGE, "version": EE.UNSUPPORTED_PROTOCOL_VERSION,
        "type": EE.UNKNOWN_MESSAGE_TYPE, "long": EE.MESSAGE_TOO_LONG,
        "param": EE.UNKNOWN_PARAMETER_TYPE, "length": EE.INCONSISTENT_LENGTH,
        "missing": EE.MISSING_MANDATORY_PARAMETER, "value": EE.INVALID_VALUE,
    },
    Interface.EMMG: {
        "invalid": ME.INVALID_MESSAGE, "version": ME.UNSUPPORTED_PROTOCOL_VERSION,
        "type": ME.UNKNOWN_MESSAGE_TYPE, "long": ME.MESSAGE_TOO_LONG,
        "param": ME.UNKNOWN_PARAMETER_TYPE, "length": ME.INCONSISTENT_LENGTH,
        "missing": ME.MISSING_MANDATORY_PARAMETER, "value": ME.INVALID_VALUE,
    },
}


def status(itf: Interface, kind: str) -> int:
    return int(_STATUS[itf][kind])


def encode_value(spec: ParamSpec, value: Value) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if spec.length is None:
        raise ValueError(f"{spec.name} is variable length: give bytes")
    return int(value).to_bytes(spec.length, "big", signed=spec.signed)


@dataclass
class Message:
    itf: Interface
    type: int
    params: list[tuple[int, bytes]] = field(default_factory=list)
    version: int = 3

    @classmethod
    def build(cls, itf: Interface, mtype: int, version: int, params: Iterable[tuple[int, Value]]) -> Message:
        table = PARAMS[itf]
        out = []
        for code, value in params:
            spec = table.get(code)
            out.append((int(code), encode_value(spec, value) if spec else bytes(value)))  # type: ignore[arg-type]
        return cls(itf, int(mtype), out, version)

    def __repr__(self) -> str:
        """Parameters as (code, value), except CP_CW_combination, whose CW is key material."""
        shown = [(c, f"<{len(v)} bytes>" if (self.itf, c) in SECRET_PARAMS else v) for c, v in self.params]
        return f"Message({self.itf.value} {self.name} v{self.version} params={shown})"

    @property
    def name(self) -> str:
        spec = MESSAGES[self.itf].get(self.type)
        return spec.name if spec else f"0x{self.type:04x}"

    def get(self, code: int) -> bytes | None:
        for c, v in self.params:
            if c == code:
                return v
        return None

    def all(self, code: int) -> list[bytes]:
        return [v for c, v in self.params if c == code]

    def int(self, code: int, default: int | None = None) -> int | None:
        v = self.get(code)
        if v is None or not v:
            return default
        spec = PARAMS[self.itf].get(code)
        return int.from_bytes(v, "big", signed=bool(spec and spec.signed))

    def ints(self, code: int) -> list[int]:
        return [int.from_bytes(v, "big") for v in self.all(code)]

    def encode(self) -> bytes:
        body = b"".join(TLV.pack(c, len(v)) + v for c, v in self.params)
        if len(body) > 0xFFFF:
            raise ValueError("message body exceeds 65535 bytes")
        return HEADER.pack(self.version, self.type, len(body)) + body


def decode(itf: Interface, frame: bytes, *, user_types: frozenset[int] = frozenset()) -> Message:
    """Decode one whole frame (header included). Structural checks only."""
    if len(frame) < HEADER.size:
        raise ProtocolError(status(itf, "invalid"), "short header")
    version, mtype, length = HEADER.unpack_from(frame)
    if length != len(frame) - HEADER.size:
        raise ProtocolError(status(itf, "invalid"), "message_length does not match the frame", version=version)
    if version not in VERSIONS[itf]:
        raise ProtocolError(status(itf, "version"), f"protocol_version {version} not supported", version=version)
    params: list[tuple[int, bytes]] = []
    msg = Message(itf, mtype, params, version)
    pos = HEADER.size
    table = PARAMS[itf]
    errors: list[tuple[str, str, int]] = []
    while pos < len(frame):
        if len(frame) - pos < TLV.size:
            raise ProtocolError(status(itf, "length"), "truncated parameter header", msg, version)
        code, plen = TLV.unpack_from(frame, pos)
        pos += TLV.size
        if plen > len(frame) - pos:
            raise ProtocolError(status(itf, "length"), f"parameter 0x{code:04x} runs past the message end", msg, version,
                                code)
        value = frame[pos:pos + plen]
        pos += plen
        spec = table.get(code)
        if spec is None:
            if mtype not in user_types:
                errors.append(("param", f"unknown parameter_type 0x{code:04x}", code))
        elif (spec.length is not None and plen != spec.length) or plen < spec.min_length:
            errors.append(("length", f"{spec.name} has length {plen}", code))
        params.append((code, value))
    if mtype not in MESSAGES[itf] and mtype not in user_types:
        raise ProtocolError(status(itf, "type"), f"unknown message_type 0x{mtype:04x}", msg, version)
    if errors:
        kind, detail, code = errors[0]
        raise ProtocolError(status(itf, kind), detail, msg, version, code)
    return msg


def validate(msg: Message) -> None:
    """Per-message parameter rules (TS 103 197 5.4 / 6.2 tables)."""
    itf = msg.itf
    spec = MESSAGES[itf].get(msg.type)
    if spec is None:
        if msg.type >= USER_DEFINED_MIN:
            return  # user-defined message: no DVB rules
        raise ProtocolError(status(itf, "type"), f"unknown message_type 0x{msg.type:04x}", msg, msg.version)
    counts: dict[int, int] = {}
    for code, _ in msg.params:
        counts[code] = counts.get(code, 0) + 1
    for code in counts:
        if code not in spec.rules:
            raise ProtocolError(status(itf, "invalid"), f"parameter 0x{code:04x} not allowed in {spec.name}", msg,
                                msg.version, code)
    for code, (lo, hi) in spec.rules.items():
        n = counts.get(code, 0)
        pname = PARAMS[itf][code].name
        if n < lo:
            raise ProtocolError(status(itf, "missing"), f"{spec.name} lacks {pname}", msg, msg.version, code)
        if hi is not None and n > hi:
            raise ProtocolError(status(itf, "invalid"), f"{spec.name} repeats {pname}", msg, msg.version, code)


def parse(itf: Interface, frame: bytes, *, user_types: frozenset[int] = frozenset()) -> Message:
    msg = decode(itf, frame, user_types=user_types)
    validate(msg)
    return msg


class Framer:
    """Splits a TCP byte stream into frames. A frame whose body exceeds `max_body` is
    skipped as it streams in and reported as a ProtocolError("message too long"), after
    which framing resumes at the next message."""

    def __init__(self, itf: Interface, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.itf = itf
        self.max_body = max_body
        self._buf = bytearray()
        self._skip = 0
        self.frames = 0  # messages (or skipped oversized ones) delimited so far

    def pending(self) -> bool:
        """A message has started arriving and is not complete yet."""
        return bool(self._buf) or self._skip > 0

    def feed(self, data: bytes) -> list[bytes | ProtocolError]:
        self._buf += data
        out: list[bytes | ProtocolError] = []
        while True:
            if self._skip:
                n = min(self._skip, len(self._buf))
                del self._buf[:n]
                self._skip -= n
                if self._skip:
                    break
            if len(self._buf) < HEADER.size:
                break
            version, mtype, length = HEADER.unpack_from(self._buf)
            if length > self.max_body:
                del self._buf[:HEADER.size]
                self._skip = length
                out.append(ProtocolError(status(self.itf, "long"), f"message_length {length} exceeds {self.max_body}",
                                         Message(self.itf, mtype, [], version), version))
                continue
            if len(self._buf) < HEADER.size + length:
                break
            out.append(bytes(self._buf[:HEADER.size + length]))
            del self._buf[:HEADER.size + length]
        self.frames += len(out)
        return out


# Convenience names used by the engines and tests
__all__ = ["EM", "EP", "MM", "MP", "Framer", "Message", "ProtocolError", "decode", "parse", "validate", "status"]
