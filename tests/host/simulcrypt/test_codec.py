"""TLV codec: vectors pin every message type of both interfaces; structural and
per-message rule violations give the right error_status; hypothesis round-trips and fuzzes."""
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.simulcrypt.codec import Framer, Message, ProtocolError, decode, parse
from tessera.simulcrypt.tables import EE, EM, EP, MESSAGES, ME, MM, MP, PARAMS, VERSIONS, Interface, bcast_error, error_name

VEC = Path(__file__).resolve().parents[2] / "vectors" / "simulcrypt"
FILES = {"ecmg.json": Interface.ECMG, "emmg.json": Interface.EMMG}


def vectors():
    for fname, itf in FILES.items():
        for case in json.loads((VEC / fname).read_text())["cases"]:
            yield pytest.param(itf, case, id=f"{fname[:4]}-{case['name']}")


@pytest.mark.parametrize("itf,case", list(vectors()))
def test_vector_decode_and_encode(itf, case):
    frame = bytes.fromhex(case["frame"])
    msg = parse(itf, frame)
    assert msg.version == case["version"]
    assert msg.type == int(case["message_type"], 16)
    assert [(f"{c:04x}", v.hex()) for c, v in msg.params] == [tuple(p) for p in case["params"]]
    assert msg.encode() == frame


def test_every_message_type_is_pinned():
    for fname, itf in FILES.items():
        types = {int(c["message_type"], 16) for c in json.loads((VEC / fname).read_text())["cases"]}
        assert types == set(MESSAGES[itf]), fname


def test_reference_example_bytes():
    m = Message.build(Interface.ECMG, EM.CHANNEL_SETUP, 2, [(EP.ECM_CHANNEL_ID, 1), (EP.SUPER_CAS_ID, 0x4AE60000)])
    assert m.encode() == bytes.fromhex("02 0001 000e 000e 0002 0001 0001 0004 4ae60000".replace(" ", ""))


def test_signed_delay():
    m = Message.build(Interface.ECMG, EM.CHANNEL_STATUS, 3, [(EP.DELAY_START, -200)])
    assert m.get(EP.DELAY_START) == (-200).to_bytes(2, "big", signed=True)
    assert m.int(EP.DELAY_START) == -200


def err(itf, frame):
    with pytest.raises(ProtocolError) as ei:
        parse(itf, frame)
    return ei.value.status


def frame(version, mtype, body):
    return bytes([version]) + mtype.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body


def tlv(code, value):
    return code.to_bytes(2, "big") + len(value).to_bytes(2, "big") + value


SETUP = tlv(0x000E, b"\0\1") + tlv(0x0001, b"\0\1\0\1")


def test_errors_ecmg():
    E = Interface.ECMG
    assert err(E, frame(1, 0x0001, SETUP)) == EE.UNSUPPORTED_PROTOCOL_VERSION
    assert err(E, frame(4, 0x0001, SETUP)) == EE.UNSUPPORTED_PROTOCOL_VERSION
    assert err(E, frame(3, 0x0077, SETUP)) == EE.UNKNOWN_MESSAGE_TYPE
    assert err(E, frame(3, 0x0011, SETUP)) == EE.UNKNOWN_MESSAGE_TYPE  # an EMMG type on the ECMG interface
    assert err(E, frame(3, 0x0001, SETUP + tlv(0x0555, b"x"))) == EE.UNKNOWN_PARAMETER_TYPE
    assert err(E, frame(3, 0x0001, tlv(0x000E, b"\1") + tlv(0x0001, b"\0\1\0\1"))) == EE.INCONSISTENT_LENGTH
    assert err(E, frame(3, 0x0001, SETUP + b"\x00\x0e\x00\x09\x00")) == EE.INCONSISTENT_LENGTH  # runs past end
    assert err(E, frame(3, 0x0001, SETUP + b"\x00")) == EE.INCONSISTENT_LENGTH  # truncated TLV header
    assert err(E, frame(3, 0x0001, tlv(0x000E, b"\0\1"))) == EE.MISSING_MANDATORY_PARAMETER
    assert err(E, frame(3, 0x0001, SETUP + tlv(0x000E, b"\0\2"))) == EE.INVALID_MESSAGE  # duplicated
    assert err(E, frame(3, 0x0001, SETUP + tlv(0x0012, b"\0\2"))) == EE.INVALID_MESSAGE  # not allowed here
    cw = tlv(0x000E, b"\0\1") + tlv(0x000F, b"\0\1") + tlv(0x0012, b"\0\1")
    assert err(E, frame(3, 0x0201, cw)) == EE.MISSING_MANDATORY_PARAMETER  # no CP_CW_combination
    assert err(E, frame(3, 0x0201, cw + tlv(0x0014, b"\0\1"))) == EE.INCONSISTENT_LENGTH  # CP without CW


def test_errors_emmg():
    M = Interface.EMMG
    setup = tlv(0x0001, b"\0\1\0\1") + tlv(0x0003, b"\0\1") + tlv(0x0002, b"\2")
    parse(M, frame(5, 0x0011, setup))
    parse(M, frame(2, 0x0011, setup))
    assert err(M, frame(1, 0x0011, setup)) == ME.UNSUPPORTED_PROTOCOL_VERSION  # no data_id in v1: refused
    assert err(M, frame(6, 0x0011, setup)) == ME.UNSUPPORTED_PROTOCOL_VERSION
    assert err(M, frame(3, 0x0001, setup)) == ME.UNKNOWN_MESSAGE_TYPE
    assert err(M, frame(3, 0x0011, setup + tlv(0x0019, b"\0\0"))) == ME.UNKNOWN_PARAMETER_TYPE
    assert err(M, frame(3, 0x0011, setup[:-1] + b"\2\2")) == ME.INCONSISTENT_LENGTH  # trailing byte
    assert err(M, frame(3, 0x0011, setup[:13])) == ME.INCONSISTENT_LENGTH  # cut inside a TLV
    assert err(M, frame(3, 0x0011, tlv(0x0001, b"\0\1\0\1") + tlv(0x0003, b"\0\1"))) == ME.MISSING_MANDATORY_PARAMETER
    assert err(M, frame(3, 0x0011, setup + tlv(0x0002, b"\2"))) == ME.INVALID_MESSAGE
    bad_len = tlv(0x0001, b"\0\1\0") + tlv(0x0003, b"\0\1") + tlv(0x0002, b"\2")
    assert err(M, frame(3, 0x0011, bad_len)) == ME.INCONSISTENT_LENGTH


def test_framer_split_and_too_long():
    m = Message.build(Interface.ECMG, EM.CHANNEL_TEST, 3, [(EP.ECM_CHANNEL_ID, 9)]).encode()
    f = Framer(Interface.ECMG, max_body=64)
    out = []
    for b in m * 2:  # byte by byte
        out += f.feed(bytes([b]))
    assert out == [m, m]
    big = frame(3, 0x0201, b"\0" * 100)
    out = f.feed(big[:50]) + f.feed(big[50:] + m)
    assert isinstance(out[0], ProtocolError) and out[0].status == EE.MESSAGE_TOO_LONG
    assert out[1:] == [m]
    f2 = Framer(Interface.EMMG, max_body=8)
    assert f2.feed(frame(3, 0x0211, b"\0" * 9))[0].status == ME.MESSAGE_TOO_LONG


def test_bcast_errors():
    assert bcast_error(0) == 0x8000 and bcast_error(5) == 0x8005
    assert error_name(Interface.ECMG, 0x8000) == "BCAST error 000"
    assert error_name(Interface.EMMG, ME.EXCEEDED_BANDWIDTH) == "exceeded_bandwidth"
    with pytest.raises(ValueError):
        bcast_error(0x8000)


# ---------------------------------------------------------------- property-based
def param_value(spec):
    if spec.length is None:
        return st.binary(min_size=max(spec.min_length, 0), max_size=40)
    return st.binary(min_size=spec.length, max_size=spec.length)


@st.composite
def valid_messages(draw):
    itf = draw(st.sampled_from(list(Interface)))
    spec = draw(st.sampled_from(list(MESSAGES[itf].values())))
    params = []
    for code, (lo, hi) in spec.rules.items():
        n = draw(st.integers(lo, min(hi if hi is not None else 3, 3)))
        params += [(code, draw(param_value(PARAMS[itf][code]))) for _ in range(n)]
    params = draw(st.permutations(params))
    version = draw(st.sampled_from(sorted(VERSIONS[itf])))
    return Message(itf, spec.code, list(params), version)


@settings(max_examples=300, deadline=None)
@given(valid_messages())
def test_roundtrip(msg):
    data = msg.encode()
    assert parse(msg.itf, data) == msg
    f = Framer(msg.itf)
    assert f.feed(data[:3]) == [] or len(data) <= 3
    assert f.feed(data[3:]) == [data]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(list(Interface)), st.binary(max_size=120))
def test_fuzz_never_crashes(itf, blob):
    """Arbitrary bytes either parse or raise ProtocolError with a defined status."""
    f = Framer(itf, max_body=64)
    for item in f.feed(blob):
        if isinstance(item, ProtocolError):
            assert item.status in (EE.MESSAGE_TOO_LONG, ME.MESSAGE_TOO_LONG)
            continue
        try:
            msg = parse(itf, item)
        except ProtocolError as exc:
            enum_ = EE if itf is Interface.ECMG else ME
            assert exc.status in set(enum_)
        else:
            assert msg.encode() == item


@settings(max_examples=300, deadline=None)
@given(valid_messages(), st.data())
def test_fuzz_mutations(msg, data):
    """Flipping one byte of a valid message never crashes the codec."""
    raw = bytearray(msg.encode())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    for item in Framer(msg.itf).feed(bytes(raw)):
        if isinstance(item, bytes):
            try:
                parse(msg.itf, item)
            except ProtocolError:
                pass


def test_decode_length_mismatch():
    with pytest.raises(ProtocolError):
        decode(Interface.ECMG, frame(3, 1, SETUP) + b"\0")
