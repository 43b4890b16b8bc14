"""KLV codec: vectors byte for byte, malformed input, and property-based fuzzing."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.asm import codec
from tessera.asm.codec import CodecError, LEKey
from tessera.asm.engine import InvalidParameter, MalformedRequest, ResponderEngine

VEC = Path(__file__).resolve().parents[2] / "vectors" / "asm"
MESSAGES = json.loads((VEC / "messages.json").read_text())["cases"]
MALFORMED = json.loads((VEC / "malformed.json").read_text())["cases"]
CLASSES = {c.__name__: c for c in codec.MESSAGES}


def build(case) -> codec.Message:
    cls = CLASSES[case["message"]]
    f = dict(case["fields"])
    if "keys" in f:
        f["keys"] = tuple(LEKey(k["key_id"], bytes.fromhex(k["key"]), k["expire"], k["attribute"]) for k in f["keys"])
    for name in ("event_ids", "key_ids"):
        if name in f:
            f[name] = tuple(f[name])
    for name in ("log_record", "request_copy"):
        if name in f:
            f[name] = bytes.fromhex(f[name])
    return cls(**f)


def test_reference_examples_present():
    refs = [c for c in MESSAGES if c["source"] == "reference"]
    assert [c["hex"] for c in refs] == [
        "060e2b34020501010207010210000000830000040000000" "1",
        "060e2b34020501010207010320000000" "8300002c" "00000003" "00000001" "00000020" "00000fa1"
        "00112233445566778899aabbccddeeff" "00000e10" "00000000075bcd15",
    ]


@pytest.mark.parametrize("case", MESSAGES, ids=lambda c: c["name"])
def test_vector_encode_decode(case):
    msg = build(case)
    raw = bytes.fromhex(case["hex"])
    assert msg.encode() == raw
    assert codec.decode(raw) == msg


def test_every_message_type_has_a_vector():
    assert {c["message"] for c in MESSAGES} == set(CLASSES)


def test_ber_length_example_clause_6_2():
    assert codec.encode_length(12) == bytes.fromhex("8300000c")
    with pytest.raises(ValueError):
        codec.encode_length(1 << 24)


def test_ul_table_annex_a():
    assert codec.GetTimeRequest.KEY.hex() == "060e2b34020501010207010210000000"
    assert codec.BadRequestResponse.KEY[11:13] == b"\x01\x01"
    assert codec.LEKeyPurgeAllResponse.KEY[11:13] == b"\x03\x29"
    assert len(codec.BY_KEY) == 19
    for req, resp in codec.RESPONSE_FOR.items():
        assert resp.KEY[12] == req.KEY[12] + 1 and not resp.IS_REQUEST


def test_key_material_not_in_repr():
    k = LEKey(1, bytes(range(16)), 10, 20)
    assert "000102" not in repr(k) and "key=" not in repr(k).replace("key_id", "")
    with pytest.raises(ValueError):
        LEKey(1, bytes(15), 1, 1)


@pytest.mark.parametrize("case", MALFORMED, ids=lambda c: c["name"])
def test_malformed_vectors(case):
    raw = bytes.fromhex(case["hex"])
    eng = ResponderEngine()
    if case["expect"] == "fatal":
        with pytest.raises(CodecError) as ei:
            eng.receive_data(raw)
        assert ei.value.fatal and ei.value.kind == case["kind"]
        return
    eng.receive_data(raw)
    ev = eng.next_event()
    if case["expect"] == "badrequest":
        assert isinstance(ev, MalformedRequest) and ev.error.kind == case["kind"]
        assert ev.raw == raw  # the complete copy goes back (clause 7.1)
        out = eng.send_response(codec.BadRequestResponse(ev.raw, codec.GeneralResponse.INVALID))
        assert codec.decode(out).request_copy == raw
    else:
        assert isinstance(ev, InvalidParameter) and ev.error.kind == case["kind"]
        assert ev.response.response == codec.GeneralResponse.INVALID
        assert ev.response.request_id == 5


def test_decode_length_beyond_message():
    raw = codec.GetTimeRequest(1).encode()
    with pytest.raises(CodecError, match="length-mismatch"):
        codec.decode(raw[:-1])
    with pytest.raises(CodecError, match="length-mismatch"):
        codec.decode(raw + b"\0")
    with pytest.raises(CodecError, match="truncated"):
        codec.decode(raw[:10])


def test_framer_byte_by_byte_and_coalesced():
    msgs = [build(c).encode() for c in MESSAGES if CLASSES[c["message"]].IS_REQUEST]
    stream = b"".join(msgs)
    f = codec.Framer()
    got = []
    for b in stream:
        got += f.feed(bytes([b]))
    assert [x.raw for x in got] == msgs and f.pending == 0
    assert [x.raw for x in codec.Framer().feed(stream)] == msgs


def test_framer_sane_maximum_is_configurable():
    raw = codec.LEKeyLoadRequest(1, tuple(LEKey(i, bytes(16), 1, 1) for i in range(4))).encode()
    with pytest.raises(CodecError, match="too-long"):
        codec.Framer(max_value=64).feed(raw)
    assert len(codec.Framer(max_value=len(raw)).feed(raw)) == 1


# --------------------------------------------------------------------------- hypothesis
u32 = st.integers(0, 2**32 - 1)
rid = st.integers(1, 2**32 - 1)
lekeys = st.lists(st.builds(LEKey, u32, st.binary(min_size=16, max_size=16), u32, st.integers(0, 2**64 - 1)),
                  max_size=20, unique_by=lambda k: k.key_id).map(tuple)
ids = st.lists(u32, max_size=40, unique=True).map(tuple)
resp = st.integers(0, 255)
messages = st.one_of(
    st.builds(codec.GetTimeRequest, rid),
    st.builds(codec.GetTimeResponse, rid, st.integers(0, 2**64 - 1), resp),
    st.builds(codec.GetEventListRequest, rid, u32, u32),
    st.builds(codec.GetEventListResponse, rid, ids, resp),
    st.builds(codec.GetEventIDRequest, rid, u32),
    st.builds(codec.GetEventIDResponse, rid, st.binary(max_size=600), resp),
    st.builds(codec.QuerySPBResponse, rid, st.integers(0, 255), st.integers(0, 255), resp),
    st.builds(codec.LEKeyLoadRequest, rid, lekeys),
    st.builds(codec.LEKeyLoadResponse, rid, st.integers(0, 255), resp),
    st.builds(codec.LEKeyQueryAllResponse, rid, ids, resp),
    st.builds(codec.LEKeyPurgeIDRequest, rid, u32),
    st.builds(codec.BadRequestResponse, st.binary(max_size=300), resp),
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(messages)
def test_roundtrip(msg):
    raw = msg.encode()
    assert int.from_bytes(raw[17:20], "big") == len(raw) - 20 and raw[16] == 0x83
    assert codec.decode(raw) == msg


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_only_raise_codec_error(data):
    eng = ResponderEngine(max_value=4096)
    try:
        eng.receive_data(data)
    except CodecError as err:
        assert err.fatal
        return
    while (ev := eng.next_event()) is not None:
        assert isinstance(ev, (MalformedRequest, InvalidParameter)) or ev.request.IS_REQUEST
        eng.state = eng.state.IDLE  # drop the response; only decoding is exercised


@FUZZ
@given(messages, st.data())
def test_mutated_messages_never_crash(msg, data):
    raw = bytearray(msg.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    blob = bytes(raw[:cut]) if data.draw(st.booleans()) else bytes(raw)
    try:
        out = codec.decode(blob)
    except CodecError:
        return
    assert out.encode() == blob  # anything accepted re-encodes to the same bytes


@FUZZ
@given(st.integers(0, 2**32 - 1), st.integers(0, 200), st.binary(max_size=64))
def test_batch_count_length_mismatch(count, item_len, tail):
    value = struct.pack(">III", 9, count, item_len) + tail
    raw = codec.klv(codec.LEKeyQueryAllResponse.KEY, value + b"\0")
    try:
        m = codec.decode(raw)
    except CodecError as err:
        assert err.kind in ("batch-item-length", "truncated-batch", "long-value", "duplicate-id", "short-value")
        return
    assert item_len == 4 and count * 4 == len(tail) and len(m.key_ids) == count


# --------------------------------------------------------------------------- engine + handler
requests = st.one_of(
    st.builds(codec.GetTimeRequest, rid),
    st.builds(codec.GetEventListRequest, rid, u32, u32),
    st.builds(codec.GetEventIDRequest, rid, u32),
    st.builds(codec.QuerySPBRequest, rid),
    st.builds(codec.LEKeyLoadRequest, rid, lekeys),
    st.builds(codec.LEKeyQueryIDRequest, rid, u32),
    st.builds(codec.LEKeyQueryAllRequest, rid),
    st.builds(codec.LEKeyPurgeIDRequest, rid, u32),
    st.builds(codec.LEKeyPurgeAllRequest, rid),
).map(lambda m: m.encode())
wire_items = st.one_of(requests, st.sampled_from([bytes.fromhex(c["hex"]) for c in MALFORMED if c["expect"] != "fatal"]))


@pytest.fixture(scope="module")
def handler(tmp_path_factory, pki):
    from tessera.asm.responder import Responder, ResponderConfig

    r = Responder(ResponderConfig(pki.creds("responder"), tmp_path_factory.mktemp("h") / "h.db", port=0))
    yield r
    r.log.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(wire_items, min_size=1, max_size=8), st.integers(1, 64))
def test_pipelined_stream_gets_one_matching_response_each(handler, items, chunk):
    """Any mix of valid and malformed requests, split anywhere: exactly one response per
    request, in order, echoing the Request_ID or carrying the complete copy."""
    eng = ResponderEngine()
    stream = b"".join(items)
    for i in range(0, len(stream), chunk):
        eng.receive_data(stream[i:i + chunk])
    answered = 0
    while (ev := eng.next_event()) is not None:
        raw = items[answered]
        if isinstance(ev, MalformedRequest):
            resp = codec.BadRequestResponse(ev.raw, codec.GeneralResponse.INVALID)
        elif isinstance(ev, InvalidParameter):
            resp = ev.response
        else:
            resp = handler.handle(ev.request, "t")
        out = codec.decode(eng.send_response(resp))
        if isinstance(out, codec.BadRequestResponse):
            assert out.request_copy == raw
        else:
            assert out.request_id == int.from_bytes(raw[20:24], "big")
            assert codec.BY_KEY[raw[:16]] in codec.RESPONSE_FOR and type(out) is codec.RESPONSE_FOR[codec.BY_KEY[raw[:16]]]
        answered += 1
    assert answered == len(items)


@given(st.lists(st.binary(max_size=120), min_size=1, max_size=8), st.integers(0, 100),
       st.lists(st.integers(1, 50), min_size=1, max_size=30))
@settings(max_examples=150, deadline=None)
def test_skipping_framer_reports_oversized_frames_in_order_under_any_chunking(values, limit, cuts):
    """Initiator mode: values above the limit come out as OversizedFrame (never buffered),
    the others as frames, in stream order, whatever the TCP/TLS chunking."""
    key = codec.ul(2, 0x13)
    stream = b"".join(codec.klv(key, v) for v in values)
    f = codec.Framer(max_value=limit, skip_oversized=True)
    got, i, k = [], 0, 0
    while i < len(stream):
        n = cuts[k % len(cuts)]
        got += f.feed(stream[i:i + n])
        assert len(f._buf) <= codec.HEADER_LEN + limit + n  # an oversized value is never held
        i, k = i + n, k + 1
    expect = [codec.OversizedFrame(key, len(v)) if len(v) > limit else codec.Frame(key, v) for v in values]
    assert got == expect and f.pending == 0
