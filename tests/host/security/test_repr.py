"""Objects that carry key material never show it in repr/str (they end up in logs and
tracebacks)."""
from __future__ import annotations

from tessera.asm import codec as asm_codec
from tessera.asm.engine import MalformedRequest, RequestReceived, ResponderEngine
from tessera.simulcrypt import codec as sc_codec
from tessera.simulcrypt.engine import CwProvision
from tessera.simulcrypt.tables import EP, Interface

KEY = bytes(range(0xA0, 0xB0))  # recognisable 16 bytes


def _leaks(obj: object, secret: bytes = KEY) -> bool:
    text = repr(obj) + str(obj)
    return secret.hex() in text.lower() or repr(secret)[2:-1] in text or secret.hex(" ") in text.lower()


def test_asm_key_load_request_events_hide_keys():
    req = asm_codec.LEKeyLoadRequest(request_id=7, keys=[asm_codec.LEKey(1, KEY, 60, 5)])
    raw = req.encode()
    eng = ResponderEngine()
    eng.receive_data(raw)
    ev = eng.next_event()
    assert isinstance(ev, RequestReceived)
    assert not _leaks(ev) and not _leaks(req)
    frame = asm_codec.Framer().feed(raw)[0]
    assert not _leaks(frame)
    bad = MalformedRequest(raw, asm_codec.CodecError("x", "y"))
    assert not _leaks(bad)
    assert not _leaks(asm_codec.BadRequestResponse(raw, asm_codec.GeneralResponse.INVALID))


def test_simulcrypt_cw_provision_hides_cws():
    ev = CwProvision(1, 2, 3, 4, [(4, KEY), (5, KEY)], None, None, None)
    assert not _leaks(ev)
    msg = sc_codec.Message.build(Interface.ECMG, 0x0201, 3, [(EP.ECM_CHANNEL_ID, 1), (EP.ECM_STREAM_ID, 2),
                                                             (EP.CP_NUMBER, 4),
                                                             (EP.CP_CW_COMBINATION, (4).to_bytes(2, "big") + KEY)])
    assert not _leaks(msg)
    assert "CP_CW_combination" in repr(msg) or "0x0014" in repr(msg) or "20" in repr(msg)
