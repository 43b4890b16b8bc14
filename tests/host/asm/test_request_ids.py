"""Gap 4: a Request_ID repeated on one connection. Clause 6.3 makes uniqueness a *should*
for the SM, so the responder serves the request and records a security event."""
from __future__ import annotations

import time

from hypothesis import given, settings, strategies as st

from .asm_helpers import SyncTLSClient
from tessera.asm import codec
from tessera.asm.codec import GetTimeRequest, GetTimeResponse
from tessera.asm.engine import RequestReceived, ResponderEngine


@settings(deadline=None, max_examples=200)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=40))
def test_engine_flags_exactly_the_repeats(ids):
    eng = ResponderEngine()
    eng.receive_data(b"".join(GetTimeRequest(i).encode() for i in ids))
    seen: set[int] = set()
    n = 0
    for rid in ids:
        ev = eng.next_event()
        assert isinstance(ev, RequestReceived) and ev.request.request_id == rid
        if rid in seen:
            n += 1
            assert ev.repeat == n
        else:
            assert ev.repeat == 0
        seen.add(rid)
        eng.send_response(GetTimeResponse(rid, 1))  # every request is still answered
    assert eng.repeats == n


def test_engine_id_window_is_bounded():
    eng = ResponderEngine(id_window=4)
    for rid in (1, 2, 3, 4, 5, 1):  # 1 has left the window of the last 4 IDs
        eng.receive_data(GetTimeRequest(rid).encode())
        ev = eng.next_event()
        eng.send_response(GetTimeResponse(rid, 1))
    assert ev.repeat == 0 and len(eng._seen) == 4


def test_repeated_request_id_served_and_logged(pki, responder):
    cl = SyncTLSClient(responder.port, pki.creds("initiator"))
    for rid in (7, 7, 8, 7):
        cl.send(GetTimeRequest(rid).encode())
        msg = codec.decode(cl.recv_klv())
        assert isinstance(msg, GetTimeResponse) and msg.request_id == rid and msg.response == 0
    cl.close()
    time.sleep(0.3)
    log = responder.responder.log
    xml = [log.get(e[0]).decode() for e in log.events()]
    repeats = [x for x in xml if "<Name>RepeatedRequestID</Name>" in x]
    assert len(repeats) == 1 and "<Value>7 (GetTime)" in repeats[0]  # first repeat only: no flood
    closed = [x for x in xml if "LinkClosed" in x]
    assert "<Name>RepeatedRequestIDs</Name><Value>2</Value>" in closed[-1]
    # a fresh connection starts a fresh set of IDs: 7 is not a repeat there
    cl2 = SyncTLSClient(responder.port, pki.creds("initiator"))
    cl2.send(GetTimeRequest(7).encode())
    assert codec.decode(cl2.recv_klv()).response == 0
    cl2.close()
    time.sleep(0.3)
    assert sum("<Name>RepeatedRequestID</Name>" in log.get(e[0]).decode() for e in log.events()) == 1
