"""The RMCP-2 scenario of `tessera demo` (issue 12) runs and says what it showed: the boards
(the real micropython) admitted to the open group, the identifier holder to the closed one,
the other board refused 0x41, both DMAs of each session holding exactly the admitted boards."""
from __future__ import annotations

import time

import pytest

from tessera.demo import run_demo


@pytest.mark.slow
def test_demo_rmcp2_scenario(tessera_var, capsys):
    t0 = time.monotonic()
    assert run_demo(["rmcp2"]) == 0
    out = capsys.readouterr().out
    assert "[PASS] Secure RMCP-2" in out and "2 of 2 scenarios passed" in out, out
    assert "open group: 2 board RMA(s) admitted, both DMAs hold 2 ACL entries" in out, out
    assert "closed group: 1 board RMA(s) admitted, both DMAs hold 1 ACL entry" in out, out
    assert "rp2040 board without a service user identifier refused with 0x41" in out, out
    assert time.monotonic() - t0 < 120  # the issue asks < ~60 s; this margin is for a loaded machine
    boards = tessera_var / "boards"
    assert not list(boards.glob("*/rmcp2/rma.key.der"))  # no board keeps its key file after the demo
