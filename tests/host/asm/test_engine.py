"""Sans-IO engines: synchronous RRPs (clause 6.4 item 2) and Request_ID rules (clause 6.3)."""
from __future__ import annotations

import pytest

from tessera.asm import codec
from tessera.asm.codec import BadRequestResponse, GeneralResponse, GetTimeRequest, GetTimeResponse
from tessera.asm.engine import InitiatorEngine, ProtocolError, RequestReceived, ResponderEngine


def test_responder_holds_second_request_until_first_answered():
    eng = ResponderEngine()
    eng.receive_data(GetTimeRequest(1).encode() + codec.QuerySPBRequest(2).encode())
    ev = eng.next_event()
    assert isinstance(ev, RequestReceived) and ev.request == GetTimeRequest(1)
    assert eng.next_event() is None  # RRP 1 still open
    eng.send_response(GetTimeResponse(1, 5))
    ev2 = eng.next_event()
    assert ev2.request == codec.QuerySPBRequest(2)


def test_responder_rejects_mismatched_response():
    eng = ResponderEngine()
    eng.receive_data(GetTimeRequest(7).encode())
    eng.next_event()
    with pytest.raises(ProtocolError):
        eng.send_response(GetTimeResponse(8, 5))  # Request_ID not echoed
    with pytest.raises(ProtocolError):
        eng.send_response(codec.QuerySPBResponse(7))
    with pytest.raises(ProtocolError):  # busy BadRequest must not carry a copy (clause 7.1)
        eng.send_response(BadRequestResponse(b"x", GeneralResponse.BUSY))
    assert codec.decode(eng.send_response(BadRequestResponse(b"", GeneralResponse.BUSY))).response == 3
    with pytest.raises(ProtocolError):
        eng.send_response(GetTimeResponse(7, 5))  # nothing open any more


def test_request_ids_nonzero_unique_and_wrap():
    eng = InitiatorEngine(first_id=2**32 - 2)
    got = [eng.new_request_id() for _ in range(4)]
    assert got == [2**32 - 2, 2**32 - 1, 1, 2]
    assert 0 not in got and len(set(got)) == 4


def test_initiator_one_rrp_at_a_time_and_echo_check():
    eng = InitiatorEngine()
    raw = eng.send_request(GetTimeRequest(eng.new_request_id()))
    with pytest.raises(ProtocolError):
        eng.send_request(GetTimeRequest(eng.new_request_id()))
    resp = GetTimeResponse(1, 123).encode()
    assert eng.receive_data(resp[:10]) is None
    assert eng.receive_data(resp[10:]) == GetTimeResponse(1, 123)
    eng.send_request(GetTimeRequest(2))
    with pytest.raises(ProtocolError, match="echo"):
        eng.receive_data(GetTimeResponse(99, 1).encode())
    eng2 = InitiatorEngine()
    raw = eng2.send_request(GetTimeRequest(1))
    assert eng2.receive_data(BadRequestResponse(raw, 2).encode()).request_copy == raw
    eng3 = InitiatorEngine()
    eng3.send_request(GetTimeRequest(1))
    with pytest.raises(ProtocolError, match="copy"):
        eng3.receive_data(BadRequestResponse(b"other", 2).encode())
    eng4 = InitiatorEngine()
    with pytest.raises(ProtocolError, match="unsolicited"):
        eng4.receive_data(GetTimeResponse(1, 1).encode())
    eng5 = InitiatorEngine()
    eng5.send_request(GetTimeRequest(1))
    with pytest.raises(ProtocolError):
        eng5.receive_data(codec.QuerySPBResponse(1).encode())  # wrong response type
