"""Issue 10, SimulCrypt: an LTKM generator never exceeds the negotiated rate (zero means
nothing is sent), counts the MUX's errors only after they have arrived, tells late
stream_errors from the answer to its stream_close_request, and never answers what the MUX
had in flight after channel_close; protocol_version 1 is refused at channel_setup with
0x0002 on both sides; a UDP data_provision naming only client_id and data_id is routed."""
import asyncio
import logging
import socket
import threading

import pytest
from .conftest import DRM, eventually, run

from tessera.cli import main as cli_main
from tessera.simulcrypt import engine as E
from tessera.simulcrypt.codec import Framer, Message, parse
from tessera.simulcrypt.emmg import EmmgError, LtkmGenerator, make_ltkms
from tessera.simulcrypt.engine import EmmgConnection, MuxConnection
from tessera.simulcrypt.mux import Multiplexer
from tessera.simulcrypt.tables import ME, MM, MP, Interface

CLIENT = 0x00010007


def on_link(total_kbps, request_kbps, body):
    """A MUX with total_kbps and one LTKM generator on it that asked for request_kbps; runs
    body(g, granted), closes both, returns (mux, g, body's result)."""
    async def main():
        mux = Multiplexer(total_kbps=total_kbps)
        await mux.start()
        g = LtkmGenerator(CLIENT, 1, 1, 0x21)
        await g.connect("127.0.0.1", mux.port)
        out = await body(g, await g.request_bandwidth(request_kbps))
        await g.close()
        await eventually(lambda: not mux.core.channels)
        await mux.close()
        return mux, g, out

    return run(main())


def test_zero_kbps_sends_nothing(keystore):
    async def body(g, granted):
        assert granted == 0
        with pytest.raises(EmmgError, match="no bandwidth"):
            await g.send(make_ltkms(keystore, CLIENT, 0x21, 1, DRM, 0x101, count=5))
        return await g.sync()

    mux, g, errors = on_link(0, 16, body)
    assert mux.received_count == 0 and g.sent_bytes == 0 and errors == 0


def test_allocation_without_bandwidth_sends_nothing(monkeypatch):
    """A stream_BW_allocation with no bandwidth parameter grants nothing to send."""
    def bw_without_value(self, msg, s):
        self.send(MM.STREAM_BW_ALLOCATION, self._p() + [(MP.DATA_STREAM_ID, s.stream_id)])
        return [E.BandwidthAllocated(self.channel_id or 0, s.stream_id, None)]

    monkeypatch.setattr(MuxConnection, "_bw", bw_without_value)

    async def body(g, granted):
        assert granted == 0 and g.kbps is None
        with pytest.raises(EmmgError, match="no bandwidth"):
            await g.send([b"\x01" * 50] * 3)
        return await g.sync()

    mux, _, errors = on_link(100, 16, body)
    assert mux.received_count == 0 and errors == 0


def test_mux_request_without_value_does_not_grant_the_pool():
    core = E.MuxCore(total_kbps=1000)
    m, e = MuxConnection(core), EmmgConnection(CLIENT, 1)
    e.setup()
    e.receive_data(m.receive_data(e.data_to_send()) and m.data_to_send())
    e.stream_setup(1, 0x21)
    e.bw_request(1, None)
    evs = e.receive_data(m.receive_data(e.data_to_send()) and m.data_to_send())
    [alloc] = [x for x in evs if isinstance(x, E.BandwidthAllocated)]
    assert alloc.kbps == 0 and core.allocated_kbps == 0  # before: the whole 1000 kbit/s pool
    e.bw_request(1, 40)
    e.bw_request(1, None)  # asks what it has: 40, unchanged
    evs = e.receive_data(m.receive_data(e.data_to_send()) and m.data_to_send())
    assert [x.kbps for x in evs if isinstance(x, E.BandwidthAllocated)] == [40, 40]
    assert core.allocated_kbps == 40


def burst_then(after):
    """6 x 400 bytes at once on an 8 kbit/s stream (1000-byte bucket): 4 exceeded bandwidth."""
    async def body(g, granted):
        assert granted == 8
        await g.send([b"\x01" * 400] * 6, pace=False)
        return await after(g)

    _, g, out = on_link(8, 8, body)
    return g, out


def test_errors_counted_after_the_replies():
    async def count(g):
        return await g.sync()  # no polling: the barrier guarantees the answers are in

    g, errors = burst_then(count)
    assert errors == 4 and all(e.statuses == [ME.EXCEEDED_BANDWIDTH] for e in g.errors)


def test_late_stream_errors_are_not_the_close_answer(caplog):
    async def nothing(g):
        return None

    with caplog.at_level(logging.WARNING, logger="tessera.simulcrypt"):
        g, _ = burst_then(nothing)  # close() straight after the burst
    assert "no stream_close_response" not in caplog.text
    assert g.error_count == 4 and g.conn.error_count == 0  # we answered nothing with an error
    assert g.stream_id not in g.conn.streams  # the stream_close_response was taken as such


def test_nothing_answered_after_channel_close():
    e = EmmgConnection(CLIENT, 1)
    e.state = E.State.OPEN
    e.streams[1] = E.DataStream(1, 0x21, open=True)
    e.stream_close(1)
    e.close()
    e.data_to_send()
    late = Message.build(Interface.EMMG, MM.STREAM_CLOSE_RESPONSE, 3,
                         [(MP.CLIENT_ID, CLIENT), (MP.DATA_CHANNEL_ID, 1), (MP.DATA_STREAM_ID, 1)]).encode()
    assert e.receive_data(late) == [] and e.data_to_send() == b""  # before: unknown_data_channel_id


def test_cli_zero_kbps_exits_2_and_sends_nothing(tmp_path, capsys, caplog):
    db = str(tmp_path / "k.sqlite")
    assert cli_main(["simulcrypt", "--db", db, "keys", "add", "--kind", "SEK", "--owner", hex(DRM),
                     "--scope", "0x101"]) == 0
    loop = asyncio.new_event_loop()
    mux = Multiplexer(total_kbps=0)
    port = loop.run_until_complete(mux.start())
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        rc = cli_main(["simulcrypt", "--db", db, "ltkm-generator", "--mux", f"127.0.0.1:{port}",
                       "--client-id", hex(CLIENT), "--key-owner", hex(DRM), "--key-scope", "0x101",
                       "--kbps", "0", "--count", "5"])
    finally:
        asyncio.run_coroutine_threadsafe(mux.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        loop.close()
    out = capsys.readouterr().out
    assert rc == 2 and "no bandwidth" in caplog.text and "sent 5 LTKMs" not in out
    assert mux.received_count == 0 and not mux.core.channels


# ---- protocol_version 1
def test_v1_channel_setup_refused_with_0x0002(keystore):
    async def main():
        mux = Multiplexer()
        await mux.start()
        r, w = await asyncio.open_connection("127.0.0.1", mux.port)
        setup = Message.build(Interface.EMMG, MM.CHANNEL_SETUP, 1, [(MP.CLIENT_ID, CLIENT), (MP.DATA_CHANNEL_ID, 1),
                                                                    (MP.SECTION_TSPKT_FLAG, 2)])
        w.write(setup.encode())
        f = Framer(Interface.EMMG)
        frames = []
        while not frames:
            frames = f.feed(await asyncio.wait_for(r.read(4096), 5))
        channels = dict(mux.core.channels)
        w.close()
        await mux.close()
        return parse(Interface.EMMG, frames[0]), channels

    answer, channels = run(main())
    assert answer.type == MM.CHANNEL_ERROR and answer.ints(MP.ERROR_STATUS) == [ME.UNSUPPORTED_PROTOCOL_VERSION]
    assert not channels


def test_v1_refused_by_the_ltkm_generator_too():
    with pytest.raises(ValueError, match="protocol_version 1"):
        LtkmGenerator(CLIENT, version=1)


# ---- UDP data_provision with only client_id and data_id
def test_udp_by_client_id_and_data_id(keystore):
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(5)

    async def main():
        mux = Multiplexer(total_kbps=64, routes={0x21: sink.getsockname()})
        await mux.start()
        g = LtkmGenerator(CLIENT, 1, 1, 0x21)
        await g.connect("127.0.0.1", mux.port)
        await g.request_bandwidth(64)
        await g.open_udp("127.0.0.1", mux.udp_port)
        short = Message.build(Interface.EMMG, MM.DATA_PROVISION, 3, [(MP.CLIENT_ID, CLIENT), (MP.DATA_ID, 0x21),
                                                                     (MP.DATAGRAM, b"LTKM-1")])
        g._udp.sendto(short.encode())
        await eventually(lambda: mux.received_count == 1)
        await g.close()
        await mux.close()
        return mux

    mux = run(main())
    assert mux.received[0].datagram == b"LTKM-1" and mux.received[0].via == "udp"
    assert sink.recv(100) == b"LTKM-1"
    sink.close()
