"""Sans-IO state machines: happy paths and every malformed / out-of-state case answered
with the right error_status, the connection carrying on afterwards."""
import pytest

from tessera.simulcrypt import engine as E
from tessera.simulcrypt.codec import Message, parse
from tessera.simulcrypt.tables import EE, EM, EP, ME, MM, MP, Interface

DRM, SC = 0x00010001, 0x00020001
TEK = bytes(range(16))


def pump(a, b):
    """Moves bytes both ways until quiet; returns (events of a, events of b)."""
    ea, eb = [], []
    while True:
        x, y = a.data_to_send(), b.data_to_send()
        if not x and not y:
            return ea, eb
        if x:
            eb += b.receive_data(x)
        if y:
            ea += a.receive_data(y)


def of(events, cls):
    return [e for e in events if isinstance(e, cls)]


def replies(conn, raw: bytes, itf=Interface.ECMG):
    """Feeds raw bytes to conn and decodes what it answers."""
    evs = conn.receive_data(raw)
    out = conn.data_to_send()
    msgs = []
    while out:
        n = 5 + int.from_bytes(out[3:5], "big")
        msgs.append(parse(itf, out[:n]))
        out = out[n:]
    return evs, msgs


def ecmg_pair(core=None, cid=1, scid=DRM, version=3):
    core = core or E.EcmgCore({DRM, SC}, E.EcmgCaps(max_streams=3, min_cp_duration=5))
    g, s = E.EcmgConnection(core), E.ScsConnection(cid, scid, version)
    s.setup()
    es, eg = pump(s, g)
    assert of(es, E.ChannelOpen) and of(eg, E.ChannelOpen)
    return core, g, s


def open_stream(g, s, sid=1, ecm_id=100, ncp=10):
    s.stream_setup(sid, ecm_id, ncp)
    es, eg = pump(s, g)
    return es, eg


def test_ecmg_happy_path():
    core, g, s = ecmg_pair(version=2)
    assert g.version == 2 and s.caps.max_streams == 3 and s.caps.cw_per_msg == 2 and s.caps.delay_start == -200
    es, eg = open_stream(g, s)
    assert of(es, E.StreamOpen)[0].ident == 100
    s.cw_provision(1, 7, [(7, TEK), (8, TEK[::-1])], cp_duration=10, access_criteria=b"\x01\x00\x01\x02")
    es, eg = pump(s, g)
    (cw,) = of(eg, E.CwProvision)
    assert (cw.cp_number, cw.cws, cw.ecm_id, cw.access_criteria) == (7, [(7, TEK), (8, TEK[::-1])], 100, b"\x01\x00\x01\x02")
    g.ecm_response(1, 7, b"stkm")
    es, _ = pump(s, g)
    assert of(es, E.EcmResponse)[0].datagram == b"stkm"
    s.test()
    s.stream_test(1)
    es, _ = pump(s, g)
    assert [type(e) for e in es] == [E.Alive, E.Alive]
    g.send(EM.CHANNEL_TEST, [(EP.ECM_CHANNEL_ID, 1)])  # the generator may test the SCS too
    _, eg = pump(s, g)
    assert of(eg, E.Alive)
    s.stream_close(1)
    es, eg = pump(s, g)
    assert of(es, E.StreamClosed) and (DRM, 100) not in core.ecm_ids and core.streams_total == 0
    s.close()
    _, eg = pump(s, g)
    assert of(eg, E.ChannelClosed) and of(eg, E.CloseConnection) and 1 not in core.channels


def frame(version, mtype, params, itf=Interface.ECMG):
    return Message.build(itf, mtype, version, params).encode()


def test_ecmg_rejections_and_continuation():
    core, g, s = ecmg_pair()
    ch = (EP.ECM_CHANNEL_ID, 1)
    cases = [
        (frame(3, 0x0077, [ch]), EM.CHANNEL_ERROR, EE.UNKNOWN_MESSAGE_TYPE),
        (frame(2, EM.CHANNEL_TEST, [ch]), EM.CHANNEL_ERROR, EE.UNSUPPORTED_PROTOCOL_VERSION),  # channel is v3
        (b"\x07\x00\x02\x00\x06\x00\x0e\x00\x02\x00\x01", EM.CHANNEL_ERROR, EE.UNSUPPORTED_PROTOCOL_VERSION),
        (frame(3, EM.CHANNEL_TEST, [(EP.ECM_CHANNEL_ID, 9)]), EM.CHANNEL_ERROR, EE.UNKNOWN_ECM_CHANNEL_ID),
        (frame(3, EM.STREAM_TEST, [ch, (EP.ECM_STREAM_ID, 5)]), EM.STREAM_ERROR, EE.UNKNOWN_ECM_STREAM_ID),
        (frame(3, EM.CW_PROVISION, [ch, (EP.ECM_STREAM_ID, 5), (EP.CP_NUMBER, 1), (EP.CP_CW_COMBINATION, b"\0\1" + TEK)]),
         EM.STREAM_ERROR, EE.UNKNOWN_ECM_STREAM_ID),
        (frame(3, EM.STREAM_SETUP, [ch, (EP.ECM_STREAM_ID, 5), (EP.ECM_ID, 1)]), EM.STREAM_ERROR,
         EE.MISSING_MANDATORY_PARAMETER),
        (frame(3, EM.STREAM_SETUP, [ch, (EP.ECM_STREAM_ID, 5), (EP.ECM_ID, 1), (EP.NOMINAL_CP_DURATION, 2)]),
         EM.STREAM_ERROR, EE.INVALID_VALUE),  # below min_CP_duration 5
        (frame(3, EM.CHANNEL_SETUP, [ch, (EP.SUPER_CAS_ID, DRM)]), EM.CHANNEL_ERROR, EE.ECM_CHANNEL_ID_IN_USE),
        (frame(3, EM.ECM_RESPONSE, [ch, (EP.ECM_STREAM_ID, 5), (EP.CP_NUMBER, 1), (EP.ECM_DATAGRAM, b"x")]),
         EM.STREAM_ERROR, EE.UNKNOWN_ECM_STREAM_ID),
        (frame(3, EM.CHANNEL_TEST, [ch, ch]), EM.CHANNEL_ERROR, EE.INVALID_MESSAGE),
        (frame(3, EM.CHANNEL_TEST, [(EP.ECM_CHANNEL_ID, b"\0")]), EM.CHANNEL_ERROR, EE.INCONSISTENT_LENGTH),
        (b"\x03\x01\x01\xff\xff", EM.CHANNEL_ERROR, EE.MESSAGE_TOO_LONG),
    ]
    for raw, want_type, want_status in cases:
        if raw.endswith(b"\xff\xff"):
            raw += bytes(0xFFFF)  # body streamed and skipped
        _, msgs = replies(g, raw)
        assert [m.type for m in msgs] == [want_type], raw[:8].hex()
        assert msgs[0].int(EP.ERROR_STATUS) == want_status, (raw[:8].hex(), msgs[0].int(EP.ERROR_STATUS))
        # the connection goes on: a channel_test is still answered with channel_status
        _, ok = replies(g, frame(3, EM.CHANNEL_TEST, [ch]))
        assert [m.type for m in ok] == [EM.CHANNEL_STATUS]
    # an error message is never answered with an error
    _, none = replies(g, frame(3, EM.CHANNEL_ERROR, [ch, (EP.ERROR_STATUS, b"\0")]))
    assert none == []


def test_ecmg_stream_rules():
    core, g, s = ecmg_pair()
    es, _ = open_stream(g, s, 1, 100)
    assert of(es, E.StreamOpen)
    ch = (EP.ECM_CHANNEL_ID, 1)
    setup = lambda sid, ecm: frame(3, EM.STREAM_SETUP, [ch, (EP.ECM_STREAM_ID, sid), (EP.ECM_ID, ecm),
                                                        (EP.NOMINAL_CP_DURATION, 10)])
    assert replies(g, setup(1, 101))[1][0].int(EP.ERROR_STATUS) == EE.ECM_STREAM_ID_IN_USE
    assert replies(g, setup(2, 100))[1][0].int(EP.ERROR_STATUS) == EE.ECM_ID_IN_USE
    assert replies(g, setup(2, 101))[1][0].type == EM.STREAM_STATUS
    assert replies(g, setup(3, 102))[1][0].type == EM.STREAM_STATUS
    assert replies(g, setup(4, 103))[1][0].int(EP.ERROR_STATUS) == EE.TOO_MANY_STREAMS_ON_CHANNEL
    # ECM_id is unique per KMS: the Smartcard generator channel may reuse 100
    _, g2, s2 = ecmg_pair(core, cid=2, scid=SC)
    es, _ = open_stream(g2, s2, 1, 100)
    assert of(es, E.StreamOpen)
    core.max_streams_total = core.streams_total
    es, _ = open_stream(g2, s2, 2, 101)
    assert of(es, E.PeerError)[0].statuses == [EE.TOO_MANY_STREAMS_ON_ECMG]
    # not enough CWs: CW_per_msg is 2
    cw = frame(3, EM.CW_PROVISION, [ch, (EP.ECM_STREAM_ID, 1), (EP.CP_NUMBER, 1), (EP.CP_CW_COMBINATION, b"\0\1" + TEK)])
    assert replies(g, cw)[1][0].int(EP.ERROR_STATUS) == EE.NOT_ENOUGH_CWS
    cw = frame(3, EM.CW_PROVISION, [ch, (EP.ECM_STREAM_ID, 1), (EP.CP_NUMBER, 1), (EP.CP_CW_COMBINATION, b"\0\1" + TEK),
                                    (EP.CP_CW_COMBINATION, b"\0\2" + TEK[:5])])
    assert replies(g, cw)[1][0].int(EP.ERROR_STATUS) == EE.INVALID_VALUE


def test_ecmg_channel_setup_rules():
    core = E.EcmgCore({DRM}, max_channels=1)
    for scid, want in ((0x00030001, EE.INVALID_VALUE), (0x00010002, EE.UNKNOWN_SUPER_CAS_ID)):
        g = E.EcmgConnection(core)
        _, msgs = replies(g, frame(3, EM.CHANNEL_SETUP, [(EP.ECM_CHANNEL_ID, 4), (EP.SUPER_CAS_ID, scid)]))
        assert msgs[0].type == EM.CHANNEL_ERROR and msgs[0].int(EP.ERROR_STATUS) == want
        assert msgs[0].int(EP.ECM_CHANNEL_ID) == 4
    # out of state order: stream_setup before channel_setup
    g = E.EcmgConnection(core)
    _, msgs = replies(g, frame(3, EM.STREAM_SETUP, [(EP.ECM_CHANNEL_ID, 4), (EP.ECM_STREAM_ID, 1), (EP.ECM_ID, 1),
                                                    (EP.NOMINAL_CP_DURATION, 10)]))
    assert msgs[0].int(EP.ERROR_STATUS) == EE.UNKNOWN_ECM_CHANNEL_ID
    ecmg_pair(core, cid=4, scid=DRM)
    _, msgs = replies(E.EcmgConnection(core), frame(3, EM.CHANNEL_SETUP, [(EP.ECM_CHANNEL_ID, 5), (EP.SUPER_CAS_ID, DRM)]))
    assert msgs[0].int(EP.ERROR_STATUS) == EE.TOO_MANY_CHANNELS_ON_ECMG
    with pytest.raises(ValueError):
        E.EcmgCore({0x00050001})


def test_scs_requires_bcast_flag():
    s = E.ScsConnection(1, DRM)
    s.setup()
    s.data_to_send()
    caps = E.EcmgCaps(section_tspkt_flag=0x01)
    evs, msgs = replies(s, frame(3, EM.CHANNEL_STATUS, [(EP.ECM_CHANNEL_ID, 1)] + caps.params()))
    assert of(evs, E.ErrorSent) and msgs[0].int(EP.ERROR_STATUS) == EE.INVALID_VALUE
    assert s.state is E.State.SETUP_SENT
    # unexpected messages at the SCS
    evs, msgs = replies(s, frame(3, EM.CW_PROVISION, [(EP.ECM_CHANNEL_ID, 1), (EP.ECM_STREAM_ID, 1), (EP.CP_NUMBER, 1),
                                                      (EP.CP_CW_COMBINATION, b"\0\1" + TEK)]))
    assert msgs[0].int(EP.ERROR_STATUS) == EE.INVALID_MESSAGE
    with pytest.raises(ValueError):
        E.ScsConnection(1, 0x00070001)


# ---------------------------------------------------------------- EMMG <-> MUX
class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def mux_pair(core=None, client=0x00010007, cid=3):
    core = core or E.MuxCore(total_kbps=100, clock=Clock(), max_streams_per_channel=2)
    m, e = E.MuxConnection(core), E.EmmgConnection(client, cid)
    e.setup()
    ee, em = pump(e, m)
    assert of(ee, E.ChannelOpen) and of(em, E.ChannelOpen)
    return core, m, e


def mframe(mtype, params, version=3):
    return frame(version, mtype, params, Interface.EMMG)


def test_mux_happy_path_and_bandwidth():
    core, m, e = mux_pair()
    e.stream_setup(4, 0x201)
    ee, em = pump(e, m)
    assert of(ee, E.StreamOpen)
    e.bw_request(4, 400)  # more than the MUX has: gets what is free
    ee, _ = pump(e, m)
    assert of(ee, E.BandwidthAllocated)[0].kbps == 100 and core.allocated_kbps == 100
    e.bw_request(4, 8)  # 8 kbit/s = 1000 bytes/s, bucket depth 1 s
    ee, _ = pump(e, m)
    assert of(ee, E.BandwidthAllocated)[0].kbps == 8 and core.allocated_kbps == 8
    e.data_provision(4, [b"a" * 600])
    _, em = pump(e, m)
    assert of(em, E.DataReceived)[0].datagrams == [b"a" * 600]
    e.data_provision(4, [b"b" * 600])  # 400 bytes left in the bucket
    ee, em = pump(e, m)
    assert not of(em, E.DataReceived) and of(ee, E.PeerError)[0].statuses == [ME.EXCEEDED_BANDWIDTH]
    core.clock.t += 0.5  # +500 bytes
    e.data_provision(4, [b"c" * 600])
    ee, em = pump(e, m)
    assert of(em, E.DataReceived) and not of(ee, E.PeerError)
    e.test()
    e.send(MM.STREAM_TEST, e._p() + [(MP.DATA_STREAM_ID, 4)])
    ee, _ = pump(e, m)
    assert len(of(ee, E.Alive)) == 2
    e.stream_close(4)
    ee, _ = pump(e, m)
    assert of(ee, E.StreamClosed) and core.allocated_kbps == 0 and not core.data_ids
    e.close()
    _, em = pump(e, m)
    assert of(em, E.ChannelClosed) and not core.channels


def test_mux_rejections():
    core, m, e = mux_pair()
    K, D = (MP.CLIENT_ID, 0x00010007), (MP.DATA_CHANNEL_ID, 3)
    setup = lambda sid, did, dt=0: mframe(MM.STREAM_SETUP, [K, D, (MP.DATA_STREAM_ID, sid), (MP.DATA_ID, did),
                                                           (MP.DATA_TYPE, dt)])
    M = Interface.EMMG
    assert replies(m, setup(1, 10), M)[1][0].type == MM.STREAM_STATUS
    cases = [
        (setup(1, 11), ME.DATA_STREAM_ID_IN_USE),
        (setup(2, 10), ME.DATA_ID_IN_USE),
        (setup(2, 11, dt=1), ME.INVALID_VALUE),  # data_type must be LTKM 0x00
        (mframe(MM.CHANNEL_TEST, [(MP.CLIENT_ID, 0x00010008), D]), ME.UNKNOWN_CLIENT_ID),
        (mframe(MM.CHANNEL_TEST, [K, (MP.DATA_CHANNEL_ID, 9)]), ME.UNKNOWN_DATA_CHANNEL_ID),
        (mframe(MM.STREAM_TEST, [K, D, (MP.DATA_STREAM_ID, 9)]), ME.UNKNOWN_DATA_STREAM_ID),
        (mframe(MM.DATA_PROVISION, [K, D, (MP.DATA_STREAM_ID, 1), (MP.DATA_ID, 99), (MP.DATAGRAM, b"x")]), ME.UNKNOWN_DATA_ID),
        (mframe(MM.DATA_PROVISION, [K, (MP.DATA_ID, 99), (MP.DATAGRAM, b"x")]), ME.UNKNOWN_DATA_ID),
        (mframe(MM.DATA_PROVISION, [K, D, (MP.DATA_STREAM_ID, 1), (MP.DATA_ID, 10), (MP.DATAGRAM, b"x")]),
         ME.EXCEEDED_BANDWIDTH),  # no allocation yet
        (mframe(MM.CHANNEL_SETUP, [K, D, (MP.SECTION_TSPKT_FLAG, 2)]), ME.DATA_CHANNEL_ID_IN_USE),
        (mframe(MM.STREAM_BW_ALLOCATION, [K, D, (MP.DATA_STREAM_ID, 1)]), ME.INVALID_MESSAGE),
        (mframe(0x0099, [K, D]), ME.UNKNOWN_MESSAGE_TYPE),
        (mframe(MM.CHANNEL_TEST, [K, D], version=6), ME.UNSUPPORTED_PROTOCOL_VERSION),
        (mframe(MM.CHANNEL_TEST, [K]), ME.MISSING_MANDATORY_PARAMETER),
    ]
    for raw, want in cases:
        _, msgs = replies(m, raw, M)
        assert len(msgs) == 1 and msgs[0].int(MP.ERROR_STATUS) == want, (raw.hex(), msgs)
        assert replies(m, mframe(MM.CHANNEL_TEST, [K, D]), M)[1][0].type == MM.CHANNEL_STATUS
    assert replies(m, setup(2, 11), M)[1][0].type == MM.STREAM_STATUS
    assert replies(m, setup(3, 12), M)[1][0].int(MP.ERROR_STATUS) == ME.TOO_MANY_STREAMS_ON_CHANNEL


def test_mux_channel_setup_rules():
    core = E.MuxCore(clients={0x00010007}, max_channels=1)
    for client, flag, want in ((0x00020007, 2, ME.INVALID_VALUE),   # Smartcard: no LTKM broadcast
                               (0x00010008, 2, ME.UNKNOWN_CLIENT_ID),
                               (0x00010007, 1, ME.INVALID_VALUE)):  # section_TSpkt_flag must be 0x02
        _, msgs = replies(E.MuxConnection(core), mframe(MM.CHANNEL_SETUP, [(MP.CLIENT_ID, client), (MP.DATA_CHANNEL_ID, 1),
                                                                            (MP.SECTION_TSPKT_FLAG, flag)]), Interface.EMMG)
        assert msgs[0].int(MP.ERROR_STATUS) == want
    mux_pair(core, cid=1)
    _, msgs = replies(E.MuxConnection(core), mframe(MM.CHANNEL_SETUP, [(MP.CLIENT_ID, 0x00010007), (MP.DATA_CHANNEL_ID, 2),
                                                                        (MP.SECTION_TSPKT_FLAG, 2)]), Interface.EMMG)
    assert msgs[0].int(MP.ERROR_STATUS) == ME.TOO_MANY_CHANNELS_ON_MUX
    with pytest.raises(ValueError):
        E.EmmgConnection(0x00020001, 1)


def test_mux_udp_entry():
    core, m, e = mux_pair()
    e.stream_setup(4, 0x201)
    e.bw_request(4, 64)
    pump(e, m)
    conn, evs = core.receive_udp(e.data_provision_msg(4, [b"L" * 100]).encode())
    assert conn is m and evs[0].via == "udp" and evs[0].datagrams == [b"L" * 100]
    # only client_id and data_id (data_channel_id and data_stream_id are optional, 0-1):
    # routed by client_id + data_id to the stream that carries them (issue 10)
    no_sid = mframe(MM.DATA_PROVISION, [(MP.CLIENT_ID, 0x00010007), (MP.DATA_ID, 0x201), (MP.DATAGRAM, b"x")])
    conn, evs = core.receive_udp(no_sid)
    assert conn is m and of(evs, E.DataReceived)[0].datagrams == [b"x"] and evs[0].stream_id == 4
    # a data_id no stream carries reaches no channel: nobody to answer, so it is counted
    unknown = mframe(MM.DATA_PROVISION, [(MP.CLIENT_ID, 0x00010007), (MP.DATA_ID, 0x999), (MP.DATAGRAM, b"x")])
    assert core.receive_udp(unknown) == (None, [])
    assert core.receive_udp(b"\x03garbage") == (None, [])
    assert sum(core.udp_dropped.values()) == 2
    # exceeding over UDP is answered on the channel's TCP connection
    conn, evs = core.receive_udp(e.data_provision_msg(4, [b"L" * 60000]).encode())
    assert of(evs, E.ErrorSent)[0].status == ME.EXCEEDED_BANDWIDTH
    ee, _ = pump(e, m)
    assert of(ee, E.PeerError)[0].statuses == [ME.EXCEEDED_BANDWIDTH]


def mux_setup(core, client, cid):
    _, msgs = replies(E.MuxConnection(core), mframe(MM.CHANNEL_SETUP, [(MP.CLIENT_ID, client), (MP.DATA_CHANNEL_ID, cid),
                                                                        (MP.SECTION_TSPKT_FLAG, 2)]), Interface.EMMG)
    return msgs[0]


def test_mux_several_channels_per_client_by_default():
    """The default: one client_id may hold several channels (distinct data_channel_ids)."""
    core = E.MuxCore()
    for cid in (1, 2, 3):
        assert mux_setup(core, 0x00010007, cid).type == MM.CHANNEL_STATUS
    assert mux_setup(core, 0x00010007, 2).int(MP.ERROR_STATUS) == ME.DATA_CHANNEL_ID_IN_USE
    assert len(core.channels) == 3


def test_mux_client_id_in_use_with_a_limit():
    core = E.MuxCore(channels_per_client=1)
    _, m, e = mux_pair(core, client=0x00010007, cid=1)
    refused = mux_setup(core, 0x00010007, 2)
    assert refused.type == MM.CHANNEL_ERROR and refused.int(MP.ERROR_STATUS) == ME.CLIENT_ID_IN_USE == 0x0014
    assert refused.int(MP.CLIENT_ID) == 0x00010007 and refused.int(MP.DATA_CHANNEL_ID) == 2
    assert mux_setup(core, 0x00010008, 1).type == MM.CHANNEL_STATUS  # other clients are not affected
    assert mux_setup(core, 0x00010007, 1).int(MP.ERROR_STATUS) == ME.DATA_CHANNEL_ID_IN_USE  # checked first
    e.close()  # the client's channel closes: it may open one again
    pump(e, m)
    assert mux_setup(core, 0x00010007, 2).type == MM.CHANNEL_STATUS
    with pytest.raises(ValueError):
        E.MuxCore(channels_per_client=0)
