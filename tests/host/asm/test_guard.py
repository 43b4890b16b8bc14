"""Sans-IO limits of the ASM responder (guard.py): failure aggregation and connection caps."""
from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.asm.guard import OTHER, ConnectionLimiter, FailureAggregator


@given(st.lists(st.tuples(st.integers(0, 80), st.sampled_from(["TLS", "Timeout", "ConnectionLimit"]),
                          st.floats(0, 5)), max_size=400))
@settings(max_examples=60, deadline=None)
def test_counts_of_full_and_summary_records_add_up(events):
    agg = FailureAggregator(interval=1.0, max_sources=8)
    full = 0
    summaries = []
    now = 0.0
    for src, kind, dt in events:
        now += dt
        if agg.due(now):
            summaries += agg.flush()
        full += agg.note(f"10.0.0.{src}", kind, now)
    summaries += agg.flush()
    assert full + sum(s.count for s in summaries) == len(events) == agg.total
    assert agg.pending == 0
    assert len({s.source for s in summaries}) <= len(summaries)


def test_records_per_interval_are_bounded_whatever_the_rate():
    agg = FailureAggregator(interval=10.0, max_sources=4)
    full = sum(agg.note(f"10.0.{i % 300}.1", random.choice(["TLS", "Timeout"]), 0.0) for i in range(20_000))
    out = agg.flush()
    assert full <= 2 * (4 + 1) and len(out) <= 4 + 1
    assert full + sum(s.count for s in out) == 20_000
    assert any(s.source == OTHER for s in out)


def test_limiter_caps_per_source_and_evicts_unauthenticated_from_the_busiest_source():
    lim: ConnectionLimiter[int] = ConnectionLimiter(max_total=4, max_per_source=2)
    assert lim.admit(1, "a", 0.0) == (True, None)
    assert lim.admit(2, "a", 1.0) == (True, None)
    assert lim.admit(3, "a", 2.0) == (False, None)  # source cap
    assert lim.admit(4, "b", 3.0) == (True, None)
    lim.authenticated(1)
    assert lim.admit(5, "c", 4.0) == (True, None)
    assert lim.admit(6, "d", 5.0) == (True, 2)  # total cap; one pending per source: the oldest goes
    assert lim.admit(7, "d", 6.0) == (True, 4)
    assert lim.admit(8, "e", 7.0) == (True, 6)  # d holds two handshakes: its oldest goes, not c's older one
    for k in (5, 7, 8):
        lim.authenticated(k)
    assert lim.admit(9, "f", 8.0) == (False, None)  # all authenticated: refused, none evicted
    lim.release(1)
    assert lim.admit(9, "f", 9.0) == (True, None) and len(lim) == 4


def test_limiter_evicts_from_the_source_that_failed_most():
    lim: ConnectionLimiter[int] = ConnectionLimiter(max_total=3, max_per_source=3)
    agg = FailureAggregator()
    lim.admit(1, "good", 0.0)
    lim.admit(2, "bad", 1.0)
    lim.admit(3, "other", 2.0)
    agg.note("bad", "TLS", 0.5)
    assert agg.failures("bad") == 1 and agg.failures("good") == 0
    assert lim.admit(4, "new", 3.0, agg.failures) == (True, 2)  # not the older handshake of "good"
