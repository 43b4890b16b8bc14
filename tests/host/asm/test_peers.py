"""Responder and initiator end to end on loopback: every request, key store, log, alerts."""
from __future__ import annotations

import asyncio
import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from .asm_helpers import SyncTLSClient
from tessera.asm import codec
from tessera.asm.codec import GeneralResponse, LEKey, SPBStatus
from tessera.asm.initiator import Initiator, LinkFailure, LogCollector, RequestRefused
from tessera.asm.net import PeerRejected
from tessera.asm.store import NS_LOG, KeyStore
from tessera.asm.tls import TLSProfileError
from tessera.pki import certs

VEC = Path(__file__).resolve().parents[2] / "vectors" / "asm"


def keys(ids, expire=3600):
    return [LEKey(i, bytes([i % 256]) * 16, expire, 1000 + i) for i in ids]


class FakeClock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_every_request_end_to_end(pki, responder):
    thumb = certs.thumbprint(pki.chain.leaves["initiator"].cert)

    async def go():
        async with Initiator("127.0.0.1", responder.port, creds=pki.creds("initiator")) as ini:
            assert ini.peer_thumbprint == certs.thumbprint(pki.chain.leaves["responder"].cert)
            t = await ini.get_time()
            assert abs(t.time - time.time()) < 2 and t.response == 0 and t.request_id == 1
            assert (await ini.le_key_load(keys(range(1, 17)))).response == 0
            ov = await ini.le_key_load(keys([100]))
            assert (ov.overflow, ov.response) == (1, GeneralResponse.FAILED)  # clause 8.1
            assert (await ini.le_key_load(keys([5, 6]))).overflow == 0  # reload of held IDs fits
            assert (await ini.le_key_query_id(5)).present == 1
            assert (await ini.le_key_query_id(100)).present == 0
            assert (await ini.le_key_query_all()).key_ids == tuple(range(1, 17))
            p1, p2 = await ini.le_key_purge_id(5), await ini.le_key_purge_id(5)
            assert (p1.no_key_id, p1.response, p2.no_key_id, p2.response) == (0, 0, 1, 0)
            assert (await ini.le_key_purge_all()).response == 0
            assert (await ini.le_key_query_all()).key_ids == ()
            q = await ini.query_spb()
            assert (q.protocol_version, q.status) == (1, SPBStatus.NOT_PLAYING)
            lst = await ini.get_event_list(0, 2**32 - 1)
            assert len(lst.event_ids) >= 5
            rec = await ini.get_event_id(max(lst.event_ids))
            assert rec.response == 0
            root = ET.fromstring(rec.log_record)
            assert root.tag == f"{{{NS_LOG}}}LogRecord"
            missing = await ini.get_event_id(10**9)
            assert missing.response == GeneralResponse.FAILED and missing.log_record == b""

    run(go())
    time.sleep(0.2)
    rows = responder.responder.log.events()
    kinds = [r[3] for r in rows]
    assert "LinkException" not in kinds and kinds[-1] == "LinkClosed"  # an orderly close is no exception
    assert "LinkOpened" in kinds and kinds.count("KeyTransfer") >= 5
    assert all(r[4] == thumb for r in rows if r[3] in ("LinkOpened", "KeyTransfer"))
    xml = responder.responder.log.get(rows[-1][0]).decode()
    assert thumb in xml or rows[-1][4] is None
    for eid, *_ in rows:
        assert b"\x00\x11" not in responder.responder.log.get(eid)  # no key bytes in records


def test_key_store_capacity_expiry_persistence(tmp_path):
    clk = FakeClock()
    ks = KeyStore(16, clock=clk)
    with pytest.raises(ValueError):
        KeyStore(15)
    assert ks.load(keys(range(16), expire=10))
    assert not ks.load(keys([99]))
    clk.t += 10  # expire time honoured: validity of 10 s from load
    assert not ks.has(3) and len(ks) == 0 and ks.load(keys([99]))
    p = tmp_path / "keys.db"
    KeyStore(16, clock=clk, persist=p).load(keys([7]))
    again = KeyStore(16, clock=clk, persist=p)
    assert again.ids() == [7] and again.get(7).key == bytes([7]) * 16


def test_event_list_window_is_inclusive(pki, start_responder):
    clk = FakeClock(1_800_000_000 - 100)  # the startup event falls outside the windows
    r = start_responder(clock=clk)
    log = r.responder.log
    ids = {}
    for dt in (0, 10, 20):
        clk.t = 1_800_000_000 + dt
        ids[dt] = r.call(log.record, "ASM", "LinkException")
    base = 1_800_000_000

    async def go():
        async with Initiator("127.0.0.1", r.port, creds=pki.creds("initiator")) as ini:
            got = (await ini.get_event_list(base, base + 10)).event_ids
            assert set(got) == {ids[0], ids[10]}
            assert set((await ini.get_event_list(base + 10, base + 10)).event_ids) == {ids[10]}
            assert (await ini.get_event_list(base + 11, base + 19)).event_ids == ()
            assert (await ini.get_time()).time == base + 20  # responder's (fake) UTC clock

    run(go())


def test_query_spb_follows_alert(pki, responder):
    async def status():
        async with Initiator("127.0.0.1", responder.port, creds=pki.creds("initiator")) as ini:
            return (await ini.query_spb()).status

    assert run(status()) == SPBStatus.NOT_PLAYING
    responder.call(responder.responder.set_status, SPBStatus.PLAYING)
    assert run(status()) == SPBStatus.PLAYING
    responder.call(responder.responder.set_status, SPBStatus.SECURITY_ALERT, "tamper switch")
    assert run(status()) == SPBStatus.SECURITY_ALERT
    assert any(e[3] == "SPBSecurityAlert" for e in responder.responder.log.events())


MALFORMED = json.loads((VEC / "malformed.json").read_text())["cases"]


@pytest.mark.parametrize("case", MALFORMED, ids=lambda c: c["name"])
def test_malformed_over_the_wire(pki, responder, case):
    raw = bytes.fromhex(case["hex"])
    bystander = SyncTLSClient(responder.port, pki.creds("initiator"))
    cl = SyncTLSClient(responder.port, pki.creds("initiator"))
    cl.send(raw)
    got = cl.recv_klv()
    if case["expect"] == "fatal":
        assert got is None  # connection closed
    else:
        msg = codec.decode(got)
        if case["expect"] == "badrequest":
            assert isinstance(msg, codec.BadRequestResponse)
            assert msg.request_copy == raw and msg.response == GeneralResponse.INVALID
        else:
            assert msg.response == GeneralResponse.INVALID and msg.request_id == 5
        cl.send(codec.GetTimeRequest(6).encode())  # the connection carries on
        assert codec.decode(cl.recv_klv()).request_id == 6
    bystander.send(codec.GetTimeRequest(9).encode())  # other connections are unaffected
    assert codec.decode(bystander.recv_klv()).request_id == 9


def test_busy_answers_badrequest_with_empty_copy(pki, start_responder):
    r = start_responder(budget=0.4)

    async def hold():
        await r.responder.work_lock.acquire()

    r.lt.run(hold())
    try:
        cl = SyncTLSClient(r.port, pki.creds("initiator"))
        t = time.monotonic()
        cl.send(codec.GetTimeRequest(1).encode())
        msg = codec.decode(cl.recv_klv())
        took = time.monotonic() - t
        assert isinstance(msg, codec.BadRequestResponse)
        assert msg.response == GeneralResponse.BUSY and msg.request_copy == b""
        assert took < 0.4 + 0.2
    finally:
        r.call(r.responder.work_lock.release)
    cl.send(codec.GetTimeRequest(2).encode())
    assert codec.decode(cl.recv_klv()).request_id == 2


def test_initiator_restarts_session_after_silence(pki, start_responder):
    r = start_responder(budget=10.0, processing_delay=1.0)

    async def go():
        ini = Initiator("127.0.0.1", r.port, creds=pki.creds("initiator"), timeout=0.3)
        await ini.connect()
        with pytest.raises(LinkFailure):
            await ini.get_time()
        assert ini.link_restarts == 1 and ini._stream is None  # closed; the next request reconnects
        r.responder.cfg.processing_delay = 0.0
        await asyncio.sleep(1.0)  # let the old connection's work finish
        assert (await ini.get_time()).response == 0
        await ini.close()

    run(go())


def test_request_refused_surfaces_badrequest(pki, start_responder):
    r = start_responder(budget=0.3, processing_delay=1.0)

    async def go():
        async with Initiator("127.0.0.1", r.port, creds=pki.creds("initiator")) as ini:
            with pytest.raises(RequestRefused) as ei:
                await ini.get_time()
            assert ei.value.response.response == GeneralResponse.BUSY

    run(go())


def test_rogue_initiators_refused(pki, responder):
    async def attempt(name):
        async with Initiator("127.0.0.1", responder.port, creds=pki.creds(name), connect_timeout=3) as ini:
            return await ini.get_time()

    with pytest.raises((TLSProfileError, ConnectionError)):
        run(attempt("rogue"))  # unknown root: OpenSSL's chain check
    with pytest.raises((TLSProfileError, ConnectionError, LinkFailure)):
        run(attempt("badqualifier"))  # passes OpenSSL, fails the 430-2 profile
    time.sleep(0.2)
    refused = [e for e in responder.responder.log.events() if e[3] == "LinkException"]
    xml = b"".join(responder.responder.log.get(e[0]) for e in refused).decode()
    assert "dnQualifier" in xml  # the 430-2 violation is what was logged


def test_rogue_responder_refused(pki, start_responder, tmp_path):
    from tessera.asm.responder import Responder, ResponderConfig
    from tessera.asm.tls import Credentials

    bad = Credentials(pki.paths["badqualifier"], pki.paths["badqualifier.key"], pki.paths["root"])
    lt = start_responder().lt

    async def go():
        r = Responder(ResponderConfig(bad, tmp_path / "bad.db", port=0))
        port = await r.start()
        try:
            with pytest.raises(PeerRejected, match="dnQualifier"):
                await Initiator("127.0.0.1", port, creds=pki.creds("initiator")).connect()
        finally:
            await r.stop()

    lt.run(go())


def test_log_collector_no_gap_no_duplicate(pki, start_responder, tmp_path):
    clk = FakeClock()
    r = start_responder(clock=clk)
    db = tmp_path / "collected.db"
    all_ids = set()

    async def collect():
        col = LogCollector(db, "resp")
        try:
            async with Initiator("127.0.0.1", r.port, creds=pki.creds("initiator")) as ini:
                return await col.collect(ini)
        finally:
            col.close()

    windows = []
    for step in range(4):
        for _ in range(3):
            all_ids.add(r.call(r.responder.log.record, "ASM", "KeyTransfer"))
            clk.t += 1
        res = run(collect())
        windows.append(res.window)
        assert res.duplicates == 0
    for (a0, a1), (b0, b1) in zip(windows, windows[1:]):
        assert b0 == a1 + 1  # book-ended: no gap, no overlap
    clk.t += 5
    run(collect())
    col = LogCollector(db, "resp")
    got = [eid for eid, _ in col.records()]
    assert len(got) == len(set(got))
    every = {e[0] for e in r.responder.log.events() if e[1] < clk.t}
    assert all_ids <= set(got) and every <= set(got)
    # a window asked again (crash before the state was saved) stores no duplicate
    col._db.execute("UPDATE collector_state SET next_start = 0")
    col._db.commit()
    col.close()
    res = run(collect())
    assert res.stored == 0 and res.duplicates == res.listed > 0


def test_clock_offset(pki, start_responder):
    r = start_responder(clock=lambda: time.time() + 42)  # a running clock: a frozen one drifts
    # from the true offset by however long the set-up takes on a loaded machine

    async def go():
        async with Initiator("127.0.0.1", r.port, creds=pki.creds("initiator")) as ini:
            return await ini.clock_offset()

    off = run(go())
    assert abs(off.offset - 42) <= off.uncertainty + 0.1
