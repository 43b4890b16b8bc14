"""Issue 11 #3: the collector pages through a log of any size.

Before the fix LogCollector asked the whole window in one GetEventList; a list above the
64 KiB value limit was an unframeable response, the run failed, and the window never
advanced, so `tessera asm collect` failed for good once ~16,380 events had accumulated.
"""
from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from tessera.asm import codec
from tessera.asm.engine import InitiatorEngine, ResponseTooLarge
from tessera.asm.initiator import Initiator, LogCollector
from tessera.asm.store import SecurityLog, log_record_xml


def fill(slog: SecurityLog, stamps: list[int]) -> None:
    """Append events with the given time stamps in one transaction (the rows record() writes)."""
    with slog._lock:
        db = slog._db
        for ts in stamps:
            eid = db.execute("INSERT INTO events (ts, event_type, subtype, peer_thumbprint, xml) VALUES (?,?,?,?,?)",
                             (ts, "ASM", "LinkException", None, b"")).lastrowid
            xml = log_record_xml(event_uuid=str(uuid.uuid4()), seq=eid, ts=ts, device=slog.device, event_type="ASM",
                                 subtype="LinkException", params={}, exceptions={"Test": "filler"})
            db.execute("UPDATE events SET xml=? WHERE event_id=?", (xml, eid))
        db.commit()


def collect(pki, port, db, **kw):
    async def go():
        col = LogCollector(db, "resp", **kw)
        pages = []
        try:
            async with Initiator("127.0.0.1", port, creds=pki.creds("initiator"), timeout=10) as ini:
                res = await col.collect(ini, lambda s, n, w: pages.append(w))
            return res, col.records(), col.pages_split, pages, col.next_start()
        finally:
            col.close()
    return asyncio.run(asyncio.wait_for(go(), 240))


def test_framer_skips_an_oversized_response_and_stays_in_step():
    eng = InitiatorEngine(max_value=64)
    big = codec.GetEventListResponse(1, tuple(range(1, 200)), 0)
    wire = eng.send_request(codec.GetEventListRequest(1, 0, 10))
    assert wire
    raw = big.encode()
    for i in range(0, len(raw) - 7, 7):  # arrives in small pieces; nothing is buffered
        assert eng.receive_data(raw[i:i + 7]) is None
        assert eng._framer.pending <= 64 + codec.HEADER_LEN + len(raw)
    with pytest.raises(ResponseTooLarge):
        eng.receive_data(raw[i + 7:])
    assert len(eng._framer._buf) == 0
    eng.send_request(codec.GetTimeRequest(2))
    assert eng.receive_data(codec.GetTimeResponse(2, 5, 0).encode()).time == 5  # still in step


def test_small_pages_and_a_crowded_second(pki, start_responder, tmp_path):
    """A 1 KiB page holds 252 IDs: 1,500 events over 40 s take several pages, and one second
    holding 600 events (more than a page) is fetched whole with the larger limit."""
    r = start_responder()
    now = int(time.time())
    stamps = [now - 60 + (i % 40) for i in range(900)] + [now - 10] * 600
    r.call(fill, r.responder.log, stamps)
    res, recs, splits, pages, nxt = collect(pki, r.port, tmp_path / "ini.db", page_bytes=1024)
    expect = r.call(r.responder.log.window, 0, res.window[1])
    total = len(expect)
    assert total >= 1500
    assert res.listed == res.stored == total == len(recs)
    assert [e for e, _ in recs] == expect
    assert splits > 0 and len(pages) > 2
    assert any(lo == hi == now - 10 for lo, hi in pages)  # the crowded second, alone
    assert nxt == res.window[1] + 1
    # the next run starts where this one ended and finds only what is new
    r.call(r.responder.log.record, "ASM", "KeyTransfer")
    time.sleep(1.1)
    res2, recs2, *_ = collect(pki, r.port, tmp_path / "ini.db", page_bytes=1024)
    assert res2.window[0] == nxt and len(recs2) >= total + 1


@pytest.mark.slow
def test_log_beyond_64k_collected_completely(pki, start_responder, tmp_path):
    """16,600 events: their ID list needs 66,413 bytes, more than one 64 KiB response."""
    r = start_responder()
    now = int(time.time())
    n = 16_600
    r.call(fill, r.responder.log, [now - 5 - (i % 3) for i in range(n)])
    res, recs, splits, pages, nxt = collect(pki, r.port, tmp_path / "ini.db")
    expect = r.call(r.responder.log.window, 0, res.window[1])
    total = len(expect)
    assert 13 + 4 * total > codec.MAX_VALUE_LEN
    assert res.listed == res.stored == total == len(recs)
    assert [e for e, _ in recs] == expect
    assert splits > 0 and len(pages) >= 2
    assert nxt == res.window[1] + 1


def test_responder_answers_failed_when_a_window_cannot_be_listed(pki, start_responder, monkeypatch):
    """Defined by this project: more IDs than one KLV can carry (4,194,300) -> response 1,
    empty batch. The limit is lowered here to 10 to exercise it."""
    from tessera.asm import responder as resp_mod
    monkeypatch.setattr(resp_mod, "MAX_LIST_IDS", 10)
    r = start_responder()
    now = int(time.time())
    r.call(fill, r.responder.log, [now - 5] * 11)

    async def go():
        async with Initiator("127.0.0.1", r.port, creds=pki.creds("initiator")) as ini:
            return await ini.get_event_list(now - 5, now - 5), await ini.get_event_list(now - 6, now - 6)
    big, small = asyncio.run(asyncio.wait_for(go(), 20))
    assert big.response == 1 and big.event_ids == ()
    assert small.response == 0 and small.event_ids == ()
