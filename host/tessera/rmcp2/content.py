"""Secure RMCP-2 content packets (docs/rmcp2-profile.md B.17, defined by this project).

Sans-IO: `Encoder` is the SMA side (encrypts content under Kc with the agreed
CON_EN_DEC_ID; IVs from an injected random source), `Decoder` the host RMA / checker side
(the same checks, in the same order, as the board's firmware/tessera_fw/rmcp2/content.py).
`FrameReader` frames packets on a TCP stream (reliable delivery). Nothing here touches
sockets or clocks.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum

from tessera.crypto import aes
from tessera.crypto.mac import ct_equal, hmac
from tessera.rmcp2.codec import AuthId, EnDecId, ErrorCode, NodeType, Rmcp2Error
from tessera.rmcp2.protect import SEQ_MAX, ReplayWindow

TYPE_DATA = 0xC0  # B.17: outside the amendment's codes and B.3's 0xA1-0xB2
VER_NT = 0x40 | NodeType.SMA
HEADER_LEN = 20
MIN_PACKET = 60  # header + Kind Alg Auth Gen Seq(4) + IV(16) + Tag(16)
MAX_PLAIN = 1024
MAX_PACKET = 1100  # 60 + 1024 + at most 16 bytes of CBC padding
TAG_LEN = 16
DIGEST_LEN = 32
MAX_OBJECT = 0x3FFFFFFF  # B.17: a small int on a board
_HASH = {AuthId.HMAC_SHA1: "sha1", AuthId.HMAC_MD5: "md5"}
_ENC = (EnDecId.AES_CBC_128, EnDecId.AES_CTR_128)


class Kind(IntEnum):
    STREAM = 1
    OBJ_BEGIN = 2
    OBJ_DATA = 3
    OBJ_END = 4


def data_keys(kc: bytes, enc: int, auth: int) -> tuple[bytes, bytes]:
    """K_enc (16) and K_mac (32) of one Kc for the agreed algorithms (B.17)."""
    if len(kc) != 16:
        raise ValueError("Kc is 16 bytes")
    return (hmac(kc, b"RMCP2-DATA-ENC" + bytes((enc,)))[:16], hmac(kc, b"RMCP2-DATA-MAC" + bytes((auth,))))


def _check_suite(enc: int, auth: int) -> None:
    if enc not in _ENC or auth not in _HASH:
        raise Rmcp2Error(ErrorCode.ALGORITHM, "content uses AES-CBC/CTR-128 with HMAC-SHA1/MD5 (B.17)")


def seal_packet(session_id: bytes, maid: bytes, kind: Kind, enc: int, auth: int, gen: int, kc: bytes,
                seq: int, iv: bytes, plain: bytes) -> bytes:
    """One content packet (B.17)."""
    _check_suite(enc, auth)
    if len(session_id) != 8 or len(maid) != 8 or len(iv) != 16:
        raise ValueError("session id and MAID are 8 bytes, IV 16")
    if not 1 <= gen <= 255 or not 1 <= seq <= SEQ_MAX or len(plain) > MAX_PLAIN:
        raise ValueError("Gen 1..255, Seq 1..0x3FFFFFFF, at most 1024 plaintext bytes")
    k_enc, k_mac = data_keys(kc, enc, auth)
    if enc == EnDecId.AES_CBC_128:
        p = 16 - len(plain) % 16
        c = aes.cbc_encrypt(k_enc, iv, bytes(plain) + bytes((p,)) * p)
    else:
        c = aes.ctr_crypt(k_enc, iv, bytes(plain))
    n = MIN_PACKET + len(c)
    body = struct.pack(">BBH8s8sBBBBI", VER_NT, TYPE_DATA, n, session_id, maid, kind, enc, auth, gen, seq) + iv + c
    return body + hmac(k_mac, body, _HASH[AuthId(auth)])[:TAG_LEN]


@dataclass
class Encoder:
    """The SMA's content encoder. `set_key` installs the Kc of a generation (the packets
    after it use it); stream and object packets count Seq in two channels (B.17)."""

    session_id: bytes
    maid: bytes
    enc: int
    auth: int
    rand: Callable[[int], bytes]
    gen: int = 0
    _kc: bytes = field(default=b"", repr=False)
    seq_stream: int = 0
    seq_object: int = 0

    def __post_init__(self) -> None:
        _check_suite(self.enc, self.auth)

    def set_key(self, gen: int, kc: bytes) -> None:
        if not 1 <= gen <= 255 or len(kc) != 16:
            raise ValueError("Gen 1..255, Kc 16 bytes")
        self.gen, self._kc = gen, bytes(kc)

    def _packet(self, kind: Kind, seq: int, plain: bytes) -> bytes:
        if not self._kc:
            raise Rmcp2Error(ErrorCode.KEY, "no content key yet")
        return seal_packet(self.session_id, self.maid, kind, self.enc, self.auth, self.gen, self._kc, seq,
                           self.rand(16), plain)

    def _next(self, attr: str) -> int:
        seq = getattr(self, attr) + 1
        if seq > SEQ_MAX:
            raise Rmcp2Error(ErrorCode.REPLAY, "Seq exhausted: the session must end (B.17)")
        setattr(self, attr, seq)
        return seq

    def stream(self, payload: bytes) -> bytes:
        """One stream packet (one UDP datagram)."""
        if len(payload) > MAX_PLAIN:
            raise ValueError(f"a stream packet carries at most {MAX_PLAIN} bytes")
        return self._packet(Kind.STREAM, self._next("seq_stream"), payload)

    def object(self, data: bytes, chunk: int = MAX_PLAIN) -> Iterator[bytes]:
        """The packets of one object: OBJ_BEGIN (size), OBJ_DATA chunks, OBJ_END (SHA-256).
        A generator: a key installed between two packets applies from the next one."""
        if len(data) > MAX_OBJECT or not 1 <= chunk <= MAX_PLAIN:
            raise ValueError("object at most 0x3FFFFFFF bytes, chunks 1..1024")
        yield self._packet(Kind.OBJ_BEGIN, self._next("seq_object"), len(data).to_bytes(4, "big"))
        for off in range(0, len(data), chunk):
            yield self._packet(Kind.OBJ_DATA, self._next("seq_object"), data[off:off + chunk])
        yield self._packet(Kind.OBJ_END, self._next("seq_object"), hashlib.sha256(data).digest())


class _Slot:
    __slots__ = ("gen", "key", "k_enc", "k_mac", "window", "obj_high")

    def __init__(self, gen: int, key: bytes, enc: int, auth: int) -> None:
        self.gen, self.key = gen, bytes(key)
        self.k_enc, self.k_mac = data_keys(key, enc, auth)
        self.window = ReplayWindow()
        self.obj_high = 0

    def __repr__(self) -> str:
        return f"<Kc gen {self.gen}>"


class KcRing:
    """Current and next Kc (B.17); the same rules as the firmware's KcRing.install."""

    def __init__(self, enc: int, auth: int) -> None:
        _check_suite(enc, auth)
        self.enc, self.auth = enc, auth
        self.cur: _Slot | None = None
        self.nxt: _Slot | None = None

    def install(self, gen: int, key: bytes) -> bool:
        if not 1 <= gen <= 255 or len(key) != 16:
            raise Rmcp2Error(ErrorCode.KEY, "Kc is 16 bytes with a Gen 1..255")
        new = lambda: _Slot(gen, key, self.enc, self.auth)  # noqa: E731
        if self.cur is None:
            self.cur = new()
            return True
        d = (gen - self.cur.gen) % 255
        if d == 0:
            if self.cur.key != bytes(key):
                self.cur, self.nxt = new(), None
            return True
        if d == 1:
            if self.nxt is None or self.nxt.key != bytes(key):
                self.nxt = new()
            return True
        if d >= 128:
            return False
        # 2..127 ahead: the next key, replacing any next. An urgent rotation (B.16) skips the Gen
        # it replaces, so the current key stays until the first authentic packet under this one.
        self.nxt = new()
        return True

    def gens(self) -> tuple[int, int]:
        return (self.cur.gen if self.cur else 0, self.nxt.gen if self.nxt else 0)

    def find(self, gen: int) -> _Slot | None:
        for s in (self.cur, self.nxt):
            if s is not None and s.gen == gen:
                return s
        return None


@dataclass(frozen=True)
class Event:
    """What a Decoder hands the application: STREAM payloads, OBJ_DATA chunks (unconfirmed
    until OBJ_END), OBJ_BEGIN (data = the 4-byte size) and OBJ_END (data = the verified
    SHA-256)."""

    kind: Kind
    data: bytes


@dataclass
class Decoder:
    """Checks and decrypts content packets of one session (B.17). receive() returns the
    Event or raises Rmcp2Error; errors are counted per code."""

    session_id: bytes
    ring: KcRing
    max_object: int = MAX_OBJECT
    errors: dict[ErrorCode, int] = field(default_factory=dict)
    packets: int = 0
    _obj: object = field(default=None, repr=False)
    _left: int = 0
    _oseq: int = 0

    def receive(self, data: bytes) -> Event:
        try:
            return self._receive(bytes(data))
        except Rmcp2Error as e:
            self.errors[e.code] = self.errors.get(e.code, 0) + 1
            raise

    def _receive(self, data: bytes) -> Event:
        n = len(data)
        check_relayable(data, self.session_id)
        if not any(data[12:20]):
            raise Rmcp2Error(ErrorCode.MAID)
        kind, enc, auth, gen, seq = struct.unpack_from(">BBBBI", data, 20)
        if not 1 <= kind <= 4:
            raise Rmcp2Error(ErrorCode.VALUE, "packet kind")
        if enc not in (1, 2) or auth not in (1, 2):
            raise Rmcp2Error(ErrorCode.ALGORITHM)
        clen = n - MIN_PACKET
        if enc == EnDecId.AES_CBC_128 and (clen == 0 or clen % 16):
            raise Rmcp2Error(ErrorCode.PADDING, "CBC ciphertext is whole blocks")
        if enc != self.ring.enc or auth != self.ring.auth:
            raise Rmcp2Error(ErrorCode.ALGORITHM, "not the agreed CON_EN_DEC_ID / AUTH_ID")
        slot = self.ring.find(gen)
        if slot is None:
            raise Rmcp2Error(ErrorCode.KEY, f"no content key of Gen {gen}")
        if kind == Kind.STREAM:
            slot.window.check(seq)
        elif not 1 <= seq <= SEQ_MAX or seq <= slot.obj_high:
            raise Rmcp2Error(ErrorCode.REPLAY, "object packet repeated or out of order")
        end = n - TAG_LEN
        if not ct_equal(hmac(slot.k_mac, data[:end], _HASH[AuthId(auth)])[:TAG_LEN], data[end:]):
            raise Rmcp2Error(ErrorCode.MAC)
        iv, c = data[28:44], data[44:end]
        if enc == EnDecId.AES_CBC_128:
            p = aes.cbc_decrypt(slot.k_enc, iv, c)
            pad = p[-1]
            if not 1 <= pad <= 16 or p[-pad:] != bytes((pad,)) * pad:
                raise Rmcp2Error(ErrorCode.PADDING)
            p = p[:-pad]
        else:
            p = aes.ctr_crypt(slot.k_enc, iv, c)
        if kind == Kind.STREAM:
            slot.window.commit(seq)
        else:
            slot.obj_high = seq
        if slot is self.ring.nxt:  # the first authentic packet under the next Gen switches
            self.ring.cur, self.ring.nxt = slot, None
        self.packets += 1
        return Event(Kind(kind), p) if kind == Kind.STREAM else self._object(Kind(kind), seq, p)

    def _object(self, kind: Kind, seq: int, p: bytes) -> Event:
        if kind == Kind.OBJ_BEGIN:
            self._obj = None
            if len(p) != 4:
                raise Rmcp2Error(ErrorCode.OBJECT, "OBJ_BEGIN carries the 4-byte size")
            size = int.from_bytes(p, "big")
            if size > self.max_object:
                raise Rmcp2Error(ErrorCode.OBJECT, "object larger than this receiver takes")
            self._obj, self._left, self._oseq = hashlib.sha256(), size, seq
            return Event(kind, p)
        h = self._obj
        if h is None or seq != self._oseq + 1:
            self._obj = None
            raise Rmcp2Error(ErrorCode.OBJECT, "no object open or a gap in its Seq")
        self._oseq = seq
        if kind == Kind.OBJ_DATA:
            if not p or len(p) > self._left:
                self._obj = None
                raise Rmcp2Error(ErrorCode.OBJECT, "chunk empty or beyond the announced size")
            self._left -= len(p)
            h.update(p)  # type: ignore[attr-defined]
            return Event(kind, p)
        self._obj = None
        d = h.digest()  # type: ignore[attr-defined]
        if len(p) != DIGEST_LEN or self._left:
            raise Rmcp2Error(ErrorCode.OBJECT, "object shorter than announced")
        if not ct_equal(d, p):
            raise Rmcp2Error(ErrorCode.DIGEST)
        return Event(kind, p)


def frame_length(head: bytes) -> int:
    """Reliable delivery frames packets by their header Length (B.17): the total length
    from the first 4 bytes, checked against 60..1100 before the rest is read."""
    n = int.from_bytes(head[2:4], "big")
    if not MIN_PACKET <= n <= MAX_PACKET:
        raise Rmcp2Error(ErrorCode.LENGTH, f"frame length {n} outside {MIN_PACKET}..{MAX_PACKET}")
    return n


class FrameReader:
    """Split a TCP byte stream into packets by their header Length (B.17), sans-IO: `feed(data)`
    returns the whole frames so far. A Length outside 60..1100 raises Rmcp2Error LENGTH (the
    stream cannot be resynchronised: the caller closes it); at most one partial frame is held."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out, used, buf = [], 0, self._buf
        while len(buf) - used >= 4:
            n = frame_length(buf[used:used + 4])
            if len(buf) - used < n:
                break
            out.append(bytes(buf[used:used + n]))
            used += n
        del buf[:used]
        return out


def check_relayable(data: bytes, session_id: bytes) -> None:
    """The clear part of a packet, the first checks of B.17 in their order: size, Length,
    Ver, type, NT, session. All a DMA can check without Kc; receivers go on from here."""
    n = len(data)
    if n < MIN_PACKET:
        raise Rmcp2Error(ErrorCode.TRUNCATED)
    if n > MAX_PACKET:
        raise Rmcp2Error(ErrorCode.OVERSIZE)
    if int.from_bytes(data[2:4], "big") != n:
        raise Rmcp2Error(ErrorCode.LENGTH)
    if data[0] >> 4 != 4:
        raise Rmcp2Error(ErrorCode.VERSION)
    if data[1] != TYPE_DATA:
        raise Rmcp2Error(ErrorCode.UNKNOWN_MESSAGE)
    if data[0] != VER_NT:
        raise Rmcp2Error(ErrorCode.NODE_TYPE, "content comes from the SMA")
    if data[4:12] != session_id:
        raise Rmcp2Error(ErrorCode.VALUE, "another session")
