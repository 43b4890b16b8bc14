"""Smoke test of bench/bench_rmcp2.py with a few agents: the bench's accounting (every
admission it counts reached READY and is an ACL row in the SM's store, every bare handshake
echoed, every DMA reported each new Ks generation) holds. Speed is not asserted."""
from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench" / "bench_rmcp2.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_rmcp2", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_rmcp2"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_bench_accounting_with_a_few_agents(bench, tmp_path):
    pki = tmp_path / "pki"
    bench.make_pki(pki, bench.NAMES)
    adm = asyncio.run(bench.admissions(pki, tmp_path, n=4, rounds=2, conc=2, hb_every=0.2))
    assert (adm.ready, adm.not_ready, adm.sm_errors, adm.sm_counted) == (8, 0, 0, 0)
    assert adm.held_open == 8 and adm.hbs > 0  # admitted RMAs stay on TLS; their HBs raise no SM error
    assert adm.acl_rows == adm.rma_members == 8  # the SM's store agrees with what the agents saw
    assert (adm.bare_ok, adm.bare_failed) == (8, 0)
    assert len(adm.bare_rates) == len(adm.adm_rates) == len(adm.ratios) == 2 and len(adm.adm_ms) == 8
    assert all(x > 0 for x in adm.ratios + adm.bare_cpu + adm.adm_cpu)
    assert adm.commits > 0  # parsed from `tessera sm serve`'s clean-exit line

    fan = asyncio.run(bench.fanout(pki, tmp_path, n_dmas=3, rekeys=2, truncations=1, hash_steps=1))
    assert (fan.missing, fan.child_errors) == (0, 0)
    sizes = {case: [len(ev) for ev in evs] for case, evs in fan.cases.items()}
    # a truncated DMA leaves: the next events count the two that remain
    assert sizes == {"fresh Ks (rekey)": [3, 3], "truncation of one DMA": [2], "hash step (tick)": [2]}
    assert all(0 < x < 30 for evs in fan.cases.values() for ev in evs for x in ev)
    text = bench.report(adm, fan, quick=True)
    assert "ratio admissions / bare handshakes" in text and "hash step (tick)" in text
