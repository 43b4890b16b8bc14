"""Hostile input at the RMCP-2 content relay and content receivers (docs/security.md, RMCP-2
content plane): a UDP flood of junk and of well-formed packets with forged tags while a
genuine stream flows through the relay to an RMA, and hostile TCP peers on the relay's
upstream port (oversized Length, truncated frames, silent connections, more than the cap)
while a genuine object is delivered. Loopback only, bounded in count and time."""
from __future__ import annotations

import asyncio
import gc
import os
import random
import statistics
import struct
import time
import socket

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import content as D
from tessera.rmcp2 import relay as R

SID = bytes.fromhex("0123456789abcdef")
MAID = C.make_maid("127.0.0.1", 26032, 0x05A1)
GOOD, JUNK, FORGED = 200, 3000, 2000


class Rma(asyncio.DatagramProtocol):
    """A host RMA: decodes what the relay sends, records the latency of the genuine ones."""

    def __init__(self, dec: D.Decoder) -> None:
        self.dec, self.lat, self.rejected = dec, [], 0

    def datagram_received(self, data, addr):
        try:
            ev = self.dec.receive(data)
        except C.Rmcp2Error:
            self.rejected += 1
            return
        (sent,) = struct.unpack_from(">d", ev.data)
        self.lat.append(time.perf_counter() - sent)


def _forged(rnd: random.Random) -> bytes:
    # a well-formed packet from an outsider: right session and header, a key it guessed
    pkt = D.seal_packet(SID, MAID, D.Kind.STREAM, 2, 1, 1, rnd.randbytes(16), rnd.randrange(1, 1 << 30),
                        rnd.randbytes(16), rnd.randbytes(rnd.randrange(0, 1024)))
    return pkt


def test_udp_flood_while_a_stream_flows():
    kc = os.urandom(16)
    rnd = random.Random(5)

    async def main():
        relay = R.Relay(SID)
        await relay.start()
        loop = asyncio.get_running_loop()
        ring = D.KcRing(2, 1)
        ring.install(1, kc)
        rtr, rma = await loop.create_datagram_endpoint(lambda: Rma(D.Decoder(SID, ring)), local_addr=("127.0.0.1", 0))
        rtr.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        relay.set_subscribers([R.Subscriber(b"\x01" * 8, udp=rtr.get_extra_info("sockname")[:2])])
        enc = D.Encoder(SID, MAID, 2, 1, os.urandom)
        enc.set_key(1, kc)
        sma, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=("127.0.0.1", relay.udp_port))
        hostile = [rnd.randbytes(rnd.randrange(0, 1500)) for _ in range(JUNK)] + [_forged(rnd) for _ in range(FORGED)]
        rnd.shuffle(hostile)
        gc.collect()
        mem0 = rss()
        per_good = len(hostile) // GOOD
        t0 = time.perf_counter()
        for i in range(GOOD):
            for h in hostile[i * per_good:(i + 1) * per_good]:
                sma.sendto(h)
            sma.sendto(enc.stream(struct.pack(">d", time.perf_counter()) + os.urandom(200)))
            await asyncio.sleep(0.002)
        await until(lambda: len(rma.lat) == GOOD, 30)
        took = time.perf_counter() - t0
        await asyncio.sleep(0.3)
        gc.collect()
        mem1 = rss()
        sma.close()
        rtr.close()
        await relay.close()
        return relay, rma, took, mem0, mem1

    relay, rma, took, mem0, mem1 = asyncio.run(asyncio.wait_for(main(), 90))
    lat = sorted(rma.lat)
    p99 = lat[int(0.99 * (len(lat) - 1))]
    dropped_at_relay = sum(v for k, v in relay.stats.items() if k.startswith("rejected_"))
    print(f"\nUDP flood: {JUNK} junk + {FORGED} forged + {GOOD} genuine in {took:.2f} s; genuine received "
          f"{len(lat)}/{GOOD}, p50 {statistics.median(lat) * 1000:.2f} ms p99 {p99 * 1000:.2f} ms; "
          f"dropped at the relay {dropped_at_relay}, rejected at the RMA {rma.rejected} "
          f"({dict(rma.dec.errors)}); RSS {mem0 // 1024} -> {mem1 // 1024} KiB")
    assert len(lat) == GOOD  # every genuine packet decrypted, none lost to the flood
    assert rma.dec.errors.get(C.ErrorCode.MAC, 0) >= FORGED * 0.9  # forged ones reached it and failed
    assert set(rma.dec.errors) <= {C.ErrorCode.MAC, C.ErrorCode.KEY, C.ErrorCode.REPLAY, C.ErrorCode.PADDING}
    assert dropped_at_relay >= JUNK * 0.9  # junk stops at the relay
    assert p99 < 5.0  # generous: a loaded 2-core machine
    assert mem1 - mem0 < 2 * 1024 * 1024  # nothing accumulates per hostile packet


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def until(cond, timeout):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.02)


def test_tcp_upstream_hostile_peers_while_an_object_is_delivered():
    kc = os.urandom(16)

    async def main():
        relay = R.Relay(SID, max_upstream=4, idle=0.5)
        await relay.start()
        got: list[bytes] = []

        async def rma_conn(reader, writer):
            try:
                while True:
                    head = await reader.readexactly(4)
                    got.append(head + await reader.readexactly(D.frame_length(head) - 4))
            except asyncio.IncompleteReadError:
                pass

        server = await asyncio.start_server(rma_conn, "127.0.0.1", 0)
        relay.set_subscribers([R.Subscriber(b"\x02" * 8, tcp=server.sockets[0].getsockname()[:2])])
        port = relay.tcp_port

        async def send(data, wait=0.0):
            _r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(data)
            await w.drain()
            await asyncio.sleep(wait)
            w.close()

        # attackers first (they hold slots), then the genuine SMA within the cap
        attacks = [send(b"\x42\xc0\xff\xff" + bytes(60)),  # Length 65535: refused before reading it
                   send(b"\x42\xc0\x04\x00" + bytes(100), 2.0),  # truncated, then silent past the idle deadline
                   send(b"\x42\xc1\x00\x40" + bytes(60))]  # not a content packet
        await asyncio.gather(*attacks)
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]  # every slot
        await asyncio.sleep(0.1)
        extra = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]  # over the cap: closed
        for r, _w in extra:
            assert await asyncio.wait_for(r.read(), 5) == b""
        for r, _w in silent:  # the silent ones are cut at the idle deadline, freeing the slots
            assert await asyncio.wait_for(r.read(), 10) == b""
        enc = D.Encoder(SID, MAID, 1, 1, os.urandom)
        enc.set_key(1, kc)
        obj = list(enc.object(os.urandom(50_000)))
        await send(b"".join(obj))
        await until(lambda: len(got) == len(obj), 30)
        await relay.close()
        server.close()
        return relay, got, obj

    relay, got, obj = asyncio.run(asyncio.wait_for(main(), 60))
    assert got == obj
    ring = D.KcRing(1, 1)
    ring.install(1, kc)
    dec = D.Decoder(SID, ring)
    assert [dec.receive(p).kind for p in got][-1] == D.Kind.OBJ_END
    s = relay.stats
    print(f"\nTCP upstream: {dict(s)}")
    assert s["rejected_LENGTH"] >= 1 and s["rejected_UNKNOWN_MESSAGE"] >= 1
    assert s["tcp_upstream_broken"] >= 5  # the truncated one and the 4 silent, cut at the idle deadline
    assert s["tcp_upstream_refused"] >= 5
