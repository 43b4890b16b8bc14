"""Annex E on board-speed virtual boards (issue 13: "Annex E authentication time on the
firmware"; profile B.10 T_ANNEXE): the board's join client, throttled to the board's speed,
joins the host DMA's JoinServer over loopback TCP with the DH key pair made ahead
(`Join.precompute()`, one exponentiation left on the join's path) and without (two), beside one
plain DH agreement on the same board (in the bench only). Times by the board's own clock; the join must finish
well inside T_ANNEXE. The measuring code is bench/bench_rmcp2_join.py's (one run per case
here, three there).

`make test` runs the Pico W (the slowest board, which sizes T_ANNEXE); the ESP32 too with
TESSERA_JOIN_SPEED_BOARDS=rp2040,esp32 (each board costs about 20 s)."""
from __future__ import annotations

import importlib.util
import os

import pytest

from tessera.paths import repo_root
from tessera.rmcp2 import tree as T

pytestmark = pytest.mark.slow
BOARDS = os.environ.get("TESSERA_JOIN_SPEED_BOARDS", "rp2040").split(",")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_rmcp2_join", repo_root() / "bench" / "bench_rmcp2_join.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("board", BOARDS)
def test_annex_e_join_time_on_a_board_speed_board(board, tessera_var, capsys):
    f = _bench().board_figures(board, runs=1, dh_reference=False)
    with capsys.disabled():
        print(f"\nAnnex E on a board-speed {board} (slow-down {f['slowdown']}x): key pair ahead"
              f" {f['pre']} ms, join then {f['with_pre']} ms; join computing the pair too {f['without']} ms; "
              f"T_ANNEXE {T.T_ANNEXE:.0f} s")
    assert f["members"] == 1 and f["errors"] == 0  # both runs joined (the second replaced the first K_MAS)
    assert f["slowdown"] > 1 and f["pre"] > 500  # throttled: one 2048-bit exponentiation takes seconds
    assert f["with_pre"] < f["without"]  # precompute moved one exponentiation off the join's path
    assert f["without"] < T.T_ANNEXE * 1000 / 2  # margin for Wi-Fi, a loaded DMA and a slower board
