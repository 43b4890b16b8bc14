"""Issue 10: error_information. The default is the 2-byte form (the parameter_type of the
faulty parameter, or no error_information when none is to blame), which head-end tools
that fix this parameter at 2 bytes accept; the ASCII text form stays available."""
from tessera.simulcrypt import engine as E
from tessera.simulcrypt.codec import Message, parse
from tessera.simulcrypt.tables import EE, EM, EP, ME, MM, MP, ErrorInfo, Interface

DRM = 0x00010001


def answers(conn, msg: Message, itf):
    conn.receive_data(msg.encode())
    out, msgs = conn.data_to_send(), []
    while out:
        n = 5 + int.from_bytes(out[3:5], "big")
        msgs.append(parse(itf, out[:n]))
        out = out[n:]
    return msgs


def ecmg_unknown_channel(error_info):
    conn = E.EcmgConnection(E.EcmgCore({DRM}, error_info=error_info))
    [ans] = answers(conn, Message.build(Interface.ECMG, EM.CHANNEL_TEST, 3, [(EP.ECM_CHANNEL_ID, 9)]), Interface.ECMG)
    return ans


def test_default_is_the_two_byte_parameter_id():
    ans = ecmg_unknown_channel(ErrorInfo.PARAM)
    assert ans.int(EP.ERROR_STATUS) == EE.UNKNOWN_ECM_CHANNEL_ID
    assert ans.all(EP.ERROR_INFORMATION) == [int(EP.ECM_CHANNEL_ID).to_bytes(2, "big")]
    assert E.EcmgConnection(E.EcmgCore({DRM})).error_info is ErrorInfo.PARAM


def test_every_error_information_we_send_by_default_is_two_bytes():
    """Codec-level faults name the parameter they found (length, unknown type, missing);
    message-level ones carry no error_information."""
    core = E.MuxCore()
    m = E.MuxConnection(core)
    setup = Message(Interface.EMMG, MM.CHANNEL_SETUP, [(MP.CLIENT_ID, b"\0\1\0\7"), (MP.DATA_CHANNEL_ID, b"\0\1\0"),
                                                       (MP.SECTION_TSPKT_FLAG, b"\2")], 3)
    [ans] = answers(m, setup, Interface.EMMG)
    assert ans.int(MP.ERROR_STATUS) == ME.INCONSISTENT_LENGTH
    assert ans.all(MP.ERROR_INFORMATION) == [int(MP.DATA_CHANNEL_ID).to_bytes(2, "big")]
    [ans] = answers(m, Message(Interface.EMMG, 0x0099, [], 3), Interface.EMMG)  # unknown message_type
    assert ans.int(MP.ERROR_STATUS) == ME.UNKNOWN_MESSAGE_TYPE and ans.all(MP.ERROR_INFORMATION) == []


def test_text_form_on_request():
    ans = ecmg_unknown_channel(ErrorInfo.TEXT)
    assert ans.get(EP.ERROR_INFORMATION) == b"ECM_channel_id 9 is not set up on this connection"


def test_the_default_answer_is_the_pinned_vector():
    import json
    from pathlib import Path

    vec = Path(__file__).resolve().parents[2] / "vectors" / "simulcrypt" / "ecmg.json"
    [case] = [c for c in json.loads(vec.read_text())["cases"] if c["name"] == "channel_error_param_info"]
    conn = E.EcmgConnection(E.EcmgCore({DRM}))
    conn.receive_data(Message.build(Interface.ECMG, EM.CHANNEL_TEST, 3, [(EP.ECM_CHANNEL_ID, 9)]).encode())
    assert conn.data_to_send().hex() == case["frame"]
