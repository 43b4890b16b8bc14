"""Bad input against the real servers over TCP: each malformed message is answered with
its error_status on the same connection, which stays usable; a neighbour channel on the
same generator is unaffected throughout."""
import asyncio

from .conftest import DRM, FAST, run

from tessera.simulcrypt.codec import Framer, Message, parse
from tessera.simulcrypt.ecmg import StkmGenerator
from tessera.simulcrypt.mux import Multiplexer
from tessera.simulcrypt.scs import GeneratorSpec, Scs
from tessera.simulcrypt.tables import EE, EM, EP, ME, MM, MP, Interface


async def exchange(reader, writer, framer, itf, raw, n=1):
    writer.write(raw)
    await writer.drain()
    out = []
    while len(out) < n:
        data = await asyncio.wait_for(reader.read(65536), 2)
        assert data, "connection closed"
        out += [parse(itf, f) for f in framer.feed(data)]
    return out


def m(itf, mtype, params, version=3):
    return Message.build(itf, mtype, version, params).encode()


def test_ecmg_bad_input_keeps_connection(keystore):
    E = Interface.ECMG

    async def main():
        gen = StkmGenerator(keystore, {DRM}, FAST)
        await gen.start()
        neighbour = Scs("n", [GeneratorSpec("127.0.0.1", gen.port, DRM, 2, 1, 0x102)], cp_duration=2)
        await neighbour.start()
        r, w = await asyncio.open_connection("127.0.0.1", gen.port)
        f = Framer(E)
        ch = (EP.ECM_CHANNEL_ID, 1)
        (st,) = await exchange(r, w, f, E, m(E, EM.CHANNEL_SETUP, [ch, (EP.SUPER_CAS_ID, DRM)]))
        assert st.type == EM.CHANNEL_STATUS and st.int(EP.SECTION_TSPKT_FLAG) == 2 and st.int(EP.CW_PER_MSG) == 2
        cases = [
            (b"\x03\x7f\x00\x00\x00", EE.UNKNOWN_MESSAGE_TYPE),
            (m(E, EM.CHANNEL_TEST, [ch], version=2), EE.UNSUPPORTED_PROTOCOL_VERSION),
            (b"\x03\x00\x02\x00\x05\x00\x0e\x00\x01\x01", EE.INCONSISTENT_LENGTH),
            (m(E, EM.STREAM_SETUP, [ch, (EP.ECM_STREAM_ID, 1), (EP.ECM_ID, 0x101)]), EE.MISSING_MANDATORY_PARAMETER),
            (m(E, EM.CHANNEL_TEST, [ch, ch]), EE.INVALID_MESSAGE),
            (m(E, EM.CHANNEL_SETUP, [(EP.ECM_CHANNEL_ID, 2), (EP.SUPER_CAS_ID, DRM)]), EE.ECM_CHANNEL_ID_IN_USE),
            (m(E, EM.STREAM_SETUP, [ch, (EP.ECM_STREAM_ID, 1), (EP.ECM_ID, 0x102), (EP.NOMINAL_CP_DURATION, 2)]),
             EE.ECM_ID_IN_USE),  # the neighbour's stkmstream
            (m(E, EM.STREAM_SETUP, [ch, (EP.ECM_STREAM_ID, 1), (EP.ECM_ID, 0x555), (EP.NOMINAL_CP_DURATION, 2)]),
             EE.UNKNOWN_ECM_ID),  # no keys for this stkmstream
            (m(E, EM.CW_PROVISION, [ch, (EP.ECM_STREAM_ID, 1), (EP.CP_NUMBER, 1),
                                    (EP.CP_CW_COMBINATION, b"\0\1" + bytes(16))]), EE.UNKNOWN_ECM_STREAM_ID),
        ]
        for raw, want in cases:
            (ans,) = await exchange(r, w, f, E, raw)
            assert ans.type in (EM.CHANNEL_ERROR, EM.STREAM_ERROR) and ans.int(EP.ERROR_STATUS) == want, (raw.hex(), ans)
            (ok,) = await exchange(r, w, f, E, m(E, EM.CHANNEL_TEST, [ch]))
            assert ok.type == EM.CHANNEL_STATUS
        # a proper stream, then a CW_provision without access criteria: the generator cannot build
        (ss,) = await exchange(r, w, f, E, m(E, EM.STREAM_SETUP, [ch, (EP.ECM_STREAM_ID, 1), (EP.ECM_ID, 0x101),
                                                                  (EP.NOMINAL_CP_DURATION, 2)]))
        assert ss.type == EM.STREAM_STATUS
        (ans,) = await exchange(r, w, f, E, m(E, EM.CW_PROVISION, [ch, (EP.ECM_STREAM_ID, 1), (EP.CP_NUMBER, 1),
                                                                   (EP.CP_CW_COMBINATION, b"\0\1" + bytes(16)),
                                                                   (EP.CP_CW_COMBINATION, b"\0\2" + bytes(16))]))
        assert ans.type == EM.STREAM_ERROR and ans.int(EP.ERROR_STATUS) == EE.INVALID_VALUE
        periods = await neighbour.run(2)
        w.close()
        await neighbour.close()
        await gen.close()
        return periods

    periods = run(main())
    assert all(not p.missing and p.stkms for p in periods)


def test_mux_bad_input_keeps_connection():
    M = Interface.EMMG

    async def main():
        mux = Multiplexer(total_kbps=8, max_streams_per_channel=1)
        await mux.start()
        r, w = await asyncio.open_connection("127.0.0.1", mux.port)
        f = Framer(M)
        K, D = (MP.CLIENT_ID, 0x00010001), (MP.DATA_CHANNEL_ID, 1)
        (st,) = await exchange(r, w, f, M, m(M, MM.CHANNEL_SETUP, [K, D, (MP.SECTION_TSPKT_FLAG, 2)], version=5))
        assert st.type == MM.CHANNEL_STATUS and st.version == 5
        ss = m(M, MM.STREAM_SETUP, [K, D, (MP.DATA_STREAM_ID, 1), (MP.DATA_ID, 1), (MP.DATA_TYPE, 0)], version=5)
        assert (await exchange(r, w, f, M, ss))[0].type == MM.STREAM_STATUS
        cases = [
            (m(M, MM.STREAM_SETUP, [K, D, (MP.DATA_STREAM_ID, 2), (MP.DATA_ID, 2), (MP.DATA_TYPE, 0)], version=5),
             ME.TOO_MANY_STREAMS_ON_CHANNEL),
            (m(M, MM.CHANNEL_TEST, [K, D], version=4), ME.UNSUPPORTED_PROTOCOL_VERSION),
            (b"\x05\x01\x99\x00\x00", ME.UNKNOWN_MESSAGE_TYPE),
            (m(M, MM.DATA_PROVISION, [K, D, (MP.DATA_STREAM_ID, 1), (MP.DATA_ID, 1), (MP.DATAGRAM, b"x")], version=5),
             ME.EXCEEDED_BANDWIDTH),  # no bandwidth requested yet
            (m(M, MM.STREAM_BW_REQUEST, [K, D, (MP.DATA_STREAM_ID, 9), (MP.BANDWIDTH, 8)], version=5),
             ME.UNKNOWN_DATA_STREAM_ID),
        ]
        for raw, want in cases:
            (ans,) = await exchange(r, w, f, M, raw)
            assert ans.int(MP.ERROR_STATUS) == want, (raw.hex(), ans)
            (ok,) = await exchange(r, w, f, M, m(M, MM.CHANNEL_TEST, [K, D], version=5))
            assert ok.type == MM.CHANNEL_STATUS
        w.close()
        await mux.close()

    run(main())
