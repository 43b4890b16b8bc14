"""The RMCP-2 scenarios of `tessera demo` run and say what they showed. Admission (issue 12):
the boards (the real micropython) admitted to the open group, the identifier holder to the
closed one, the other board refused 0x41, both DMAs of each session holding exactly the
admitted boards. The whole tree (issue 13): a file and a stream byte-exact at three boards
through two DMAs (one a `tessera dma` process), a leave re-keys Kg and brings a fresh Kc, the
DMA process killed and its board re-grafted with content resuming."""
from __future__ import annotations

import time

import pytest

from tessera.demo import run_demo


@pytest.mark.slow
def test_demo_rmcp2_scenario(tessera_var, capsys):
    t0 = time.monotonic()
    assert run_demo(["rmcp2"]) == 0
    out = capsys.readouterr().out
    assert "[PASS] Secure RMCP-2: SM" in out and "[PASS] Secure RMCP-2 whole tree" in out, out
    assert "3 of 3 scenarios passed" in out, out
    assert "open group: 2 board RMA(s) admitted, both DMAs hold 2 ACL entries" in out, out
    assert "closed group: 1 board RMA(s) admitted, both DMAs hold 1 ACL entry" in out, out
    assert "rp2040 board without a service user identifier refused with 0x41" in out, out
    assert "20 stream packets arrived byte-exact at all 3 boards through two DMAs" in out, out
    assert "left: Kg re-keyed (gen 1 -> 2), Kc gen 2 in use; the next file reached the 2 remaining boards" in out, out
    assert "re-grafted to dma1 and the next file and stream arrived byte-exact at both remaining boards" in out, out
    assert time.monotonic() - t0 < 240  # the issue asks < ~60 s; this margin is for a loaded machine
    boards = tessera_var / "boards"
    assert not list(boards.glob("*/fs/rmcp2/rma.key.der"))  # no board keeps its key file after the demo
    assert not list(boards.glob("*/fs/rmcp2.json")) and not list(boards.glob("*/fs/rx"))  # nor the tree's files
