"""B.8 max_rmas: the SM counts RMAs only, not the SMA and DMAs, when it decides that a
session is full (sm.py skips the count while fewer members than max_rmas exist)."""
from __future__ import annotations

from tessera.rmcp2 import codec as C

from .test_fw_rma import R, drive, fw_rma, policy_session


def test_session_full_counts_rmas_only():
    sm = policy_session()  # an SMA and a DMA are members already
    sm.cfg.max_rmas = 3
    for i in (1, 2, 3):  # members reach 5 > max_rmas: the SMA and DMA must not be counted
        rma = fw_rma(i)
        drive(sm, rma, f"b{i}")
        assert R.STATE_NAMES[rma.state] == "ready", i
    late = fw_rma(4)
    drive(sm, late, "b4")
    assert R.STATE_NAMES[late.state] == "refused" and late.result == int(C.Result.SESSION_FULL)
    assert sum(m.nt == C.NodeType.RMA for m in sm.members.values()) == 3
