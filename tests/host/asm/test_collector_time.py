"""Gap 5: the collector stores each record's raw TimeStamp and the time corrected by the
clock offset measured at collection (clause 7.2 note: the SM removes the delta)."""
from __future__ import annotations

import asyncio
import sqlite3
import time

from tessera.asm.initiator import Initiator, LogCollector, record_timestamp

SKEW = 42.0


class FakeClock:
    """Frozen at `t` until `run_ahead(skew)`; from then on it runs with the real clock, `skew` ahead
    (a frozen clock made the measured offset shrink by however long the TLS handshake took under load)."""

    def __init__(self, t: float) -> None:
        self.t = t
        self.skew: float | None = None

    def run_ahead(self, skew: float) -> None:
        self.skew = skew

    def __call__(self) -> float:
        return self.t if self.skew is None else time.time() + self.skew


def test_collector_stores_raw_and_corrected_times(pki, start_responder, tmp_path):
    t0 = time.time()
    clk = FakeClock(t0 + SKEW - 5)  # the responder runs 42 s ahead; the event happened 5 s ago
    r = start_responder(clock=clk)
    eid = r.call(r.responder.log.record, "ASM", "KeyTransfer")
    event_true_time = t0 - 5
    clk.run_ahead(SKEW)  # the responder's "now" from here on
    db = tmp_path / "ini.db"
    # a database from before corrected times existed is upgraded in place
    old = sqlite3.connect(db)
    old.execute("CREATE TABLE collected (responder TEXT, event_id INTEGER, window_start INTEGER, "
                "window_stop INTEGER, collected_at INTEGER, xml BLOB, PRIMARY KEY (responder, event_id))")
    old.execute("INSERT INTO collected VALUES ('older', 1, 0, 0, 0, x'00')")
    old.commit()
    old.close()

    async def go():
        col = LogCollector(db, "resp")
        try:
            async with Initiator("127.0.0.1", r.port, creds=pki.creds("initiator")) as ini:
                res = await col.collect(ini)
            return res, col.timed_records()
        finally:
            col.close()

    res, recs = asyncio.run(asyncio.wait_for(go(), 20))
    off = res.clock_offset
    assert off is not None and abs(off.offset - SKEW) <= off.uncertainty + 0.1
    rec = next(x for x in recs if x.event_id == eid)
    assert rec.ts_raw == int(t0 + SKEW - 5) == record_timestamp(rec.xml)  # raw: the responder's clock
    assert rec.clock_offset == off.offset and rec.offset_uncertainty == off.uncertainty
    assert rec.ts_corrected == rec.ts_raw - off.offset  # corrected: raw minus the measured offset
    assert abs(rec.ts_corrected - event_true_time) <= off.uncertainty + 1.0  # back on our clock
    assert abs(rec.ts_raw - event_true_time - SKEW) < 1.5  # and the raw one is not
    assert all(x.ts_raw is not None for x in recs)
    older = LogCollector(db, "older")
    assert older.timed_records()[0].ts_raw is None  # upgraded row kept, no invented times
    older.close()


def test_record_timestamp_parsing():
    assert record_timestamp(b"not xml") is None
    assert record_timestamp(b"<a/>") is None
