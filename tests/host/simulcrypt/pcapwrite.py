"""Writes a libpcap file (Ethernet / IPv4 / TCP or UDP, correct lengths, sequence numbers
and checksums) from application bytes recorded in a test, so tshark can dissect the
exact traffic without capture privileges."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

MSS = 1400


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _ip(src: str, dst: str) -> tuple[bytes, bytes]:
    return bytes(map(int, src.split("."))), bytes(map(int, dst.split(".")))


@dataclass
class Flow:
    client: tuple[str, int]
    server: tuple[str, int]
    seq: dict[str, int] = field(default_factory=lambda: {"c": 1000, "s": 5000})


class PcapWriter:
    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.t = 1_700_000_000.0
        self.ip_id = 1

    def _frame(self, src: tuple[str, int], dst: tuple[str, int], proto: int, l4: bytes) -> None:
        s, d = _ip(src[0], dst[0])
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), self.ip_id, 0x4000, 64, proto, 0, s, d)
        hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
        self.ip_id = (self.ip_id + 1) & 0xFFFF
        eth = b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01" + b"\x08\x00"
        self.t += 0.0001
        self.frames.append((self.t, eth + hdr + l4))

    def _tcp(self, src, dst, seq, ack, flags, payload=b"") -> None:
        s, d = _ip(src[0], dst[0])
        h = struct.pack("!HHIIBBHHH", src[1], dst[1], seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags, 65535, 0, 0)
        pseudo = s + d + struct.pack("!BBH", 0, 6, len(h) + len(payload))
        c = _csum(pseudo + h + payload)
        self._frame(src, dst, 6, h[:16] + struct.pack("!H", c) + h[18:] + payload)

    def open(self, flow: Flow) -> None:
        c, s, q = flow.client, flow.server, flow.seq
        self._tcp(c, s, q["c"] - 1, 0, 0x02)
        self._tcp(s, c, q["s"] - 1, q["c"], 0x12)
        self._tcp(c, s, q["c"], q["s"], 0x10)

    def data(self, flow: Flow, from_client: bool, payload: bytes) -> list[bytes]:
        """Writes payload as MSS-sized segments; returns the segments in order."""
        a, b = ("c", "s") if from_client else ("s", "c")
        src, dst = (flow.client, flow.server) if from_client else (flow.server, flow.client)
        segs = [payload[i:i + MSS] for i in range(0, len(payload), MSS)]
        for seg in segs:
            self._tcp(src, dst, flow.seq[a], flow.seq[b], 0x18, seg)
            flow.seq[a] += len(seg)
        return segs

    def close(self, flow: Flow) -> None:
        c, s, q = flow.client, flow.server, flow.seq
        self._tcp(c, s, q["c"], q["s"], 0x11)
        self._tcp(s, c, q["s"], q["c"] + 1, 0x11)
        self._tcp(c, s, q["c"] + 1, q["s"] + 1, 0x10)

    def udp(self, src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> None:
        s, d = _ip(src[0], dst[0])
        h = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0)
        c = _csum(s + d + struct.pack("!BBH", 0, 17, 8 + len(payload)) + h + payload) or 0xFFFF
        self._frame(src, dst, 17, h[:6] + struct.pack("!H", c) + payload)

    def write(self, path) -> None:
        with open(path, "wb") as f:
            f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
            for t, frame in self.frames:
                sec = int(t)
                f.write(struct.pack("<IIII", sec, int((t - sec) * 1e6), len(frame), len(frame)) + frame)
