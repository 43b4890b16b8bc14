"""LTKM generator and MUX over loopback: channel/stream setup, bandwidth allocation,
data_provision over TCP and UDP within the allocation, "exceeded bandwidth" when not,
routes by data_id, and an LTKM generator vanishing without harming another."""
import asyncio
import socket

import pytest
from .conftest import DRM, eventually, run

from tessera.simulcrypt import ltkm
from tessera.simulcrypt.emmg import EmmgError, LtkmGenerator, make_ltkms
from tessera.simulcrypt.mux import Multiplexer
from tessera.simulcrypt.tables import ME

CLIENT = 0x00010007


def test_ltkm_within_bandwidth_tcp_and_udp(keystore):
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(2)

    async def main():
        mux = Multiplexer(total_kbps=40, routes={0x21: sink.getsockname()})
        await mux.start()
        g = LtkmGenerator(CLIENT, 1, 1, 0x21)
        await g.connect("127.0.0.1", mux.port)
        assert await g.request_bandwidth(24) == 24  # 3000 bytes/s
        ltkms = make_ltkms(keystore, CLIENT, 0x21, 7, DRM, 0x101, count=30)
        t0 = asyncio.get_running_loop().time()
        await g.send(ltkms[:15])
        await g.open_udp("127.0.0.1", mux.udp_port)
        await g.send(ltkms[15:], via="udp")
        took = asyncio.get_running_loop().time() - t0
        await eventually(lambda: len(mux.received) == 30)
        assert await g.test()
        stats = mux.stream_stats()
        await g.close()
        await eventually(lambda: mux.core.allocated_kbps == 0 and not mux.core.channels)
        await mux.close()
        return mux, g, took, stats

    mux, g, took, stats = run(main())
    assert not g.errors
    assert {r.via for r in mux.received} == {"tcp", "udp"}
    size = sum(len(r.datagram) for r in mux.received)
    assert took >= size / 3000 - 1.0 - 0.05  # paced (1 s bucket depth allowed as burst)
    assert stats[0]["kbps"] == 24 and stats[0]["dropped"] == 0
    rec = ltkm.parse(mux.received[0].datagram, keystore.current("LTK", CLIENT, 7).material)
    assert rec.key == keystore.current("SEK", DRM, 0x101).material and rec.client_id == CLIENT
    assert sink.recv(2048) == mux.received[0].datagram  # forwarded to the data_id's address
    sink.close()


def test_exceeded_bandwidth_and_vanishing_peer(keystore):
    async def main():
        mux = Multiplexer(total_kbps=16)
        await mux.start()
        greedy = LtkmGenerator(CLIENT, 1, 1, 0x21)
        polite = LtkmGenerator(CLIENT, 2, 1, 0x22)
        await greedy.connect("127.0.0.1", mux.port)
        await polite.connect("127.0.0.1", mux.port)
        assert await greedy.request_bandwidth(8) == 8   # 1000 bytes/s, 1000-byte bucket
        assert await polite.request_bandwidth(64) == 8  # only what is left of 16
        blobs = [b"\x01" * 400] * 6
        await greedy.send(blobs, pace=False)           # 2400 bytes at once
        await eventually(lambda: greedy.errors)
        assert all(e.statuses == [ME.EXCEEDED_BANDWIDTH] for e in greedy.errors)
        got_greedy = len(mux.received)
        # greedy vanishes abruptly; its bandwidth returns to the pool, polite goes on
        greedy._writer.transport.abort()
        await eventually(lambda: mux.core.allocated_kbps == 8)
        await polite.send([b"\x02" * 300] * 3)
        await eventually(lambda: len(mux.received) == got_greedy + 3)
        assert await polite.test()
        assert await polite.request_bandwidth(16) == 16
        await polite.close(), await greedy.close()
        await mux.close()
        return got_greedy, polite

    got_greedy, polite = run(main())
    assert got_greedy == 2  # 800 bytes fit the 1000-byte bucket, the rest was refused
    assert not polite.errors


def test_smartcard_and_refusals(keystore):
    with pytest.raises(ValueError):
        LtkmGenerator(0x00020007)  # no LTKM stream for the Smartcard profile

    async def main():
        mux = Multiplexer(clients={0x00010009})
        await mux.start()
        g = LtkmGenerator(CLIENT)
        with pytest.raises(EmmgError, match="unknown_client_id"):
            await g.connect("127.0.0.1", mux.port)
        await g.close()
        a, b = LtkmGenerator(0x00010009, 1, 1, 5), LtkmGenerator(0x00010009, 2, 1, 5)
        await a.connect("127.0.0.1", mux.port)
        with pytest.raises(EmmgError, match="data_id_in_use"):
            await b.connect("127.0.0.1", mux.port)
        await a.close(), await b.close()
        await mux.close()

    run(main())
