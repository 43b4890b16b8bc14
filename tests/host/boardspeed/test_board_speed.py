"""Board-speed virtual boards (issue 9 #1): the firmware's own DH, timed by the board's
own clock, takes as long on a board-speed virtual rp2040 as the profile says the real
Pico W needs (within +-30%), and a fast board stays fast."""
from __future__ import annotations

import json

import pytest

from tessera import cli
from tessera.boards import ops, profile

pytestmark = pytest.mark.slow

# One DH agreement as the device runs it (tessera_fw.crypto.dh): DH() computes pow(2, x, p),
# shared() pow(y, x, p). Timed with the board's ticks_ms, printed as one line.
DH_TIMING = """
import time
from tessera_fw.crypto import dh
for _ in range(%d):
    t0 = time.ticks_ms()
    a = dh.DH()
    t1 = time.ticks_ms()
    z = a.shared(a.public)
    t2 = time.ticks_ms()
    print(time.ticks_diff(t1, t0), time.ticks_diff(t2, t1))
"""


def _dh_ms(t: ops.Target, runs: int = 1) -> list[tuple[int, int]]:
    """(pow(2, x, p) ms, pow(y, x, p) ms) of `runs` DH agreements, by the board's clock."""
    out = t.remote.exec(DH_TIMING % runs).split()
    return [(int(out[i]), int(out[i + 1])) for i in range(0, len(out), 2)]


def test_board_speed_rp2040_takes_the_profiles_dh_time(virtual_board, capsys):
    prof = profile.load("rp2040")
    t = virtual_board("rp2040", "rp2040")  # the instance `--virtual rp2040` reaches; deployed fast
    vb = t.vboard
    fast = sum(_dh_ms(t)[0])
    # switch the running board with the CLI, as a user would
    assert cli.main(["board", "virtual", "start", "rp2040", "--speed", "board"]) == 0
    st = vb.state()
    assert st["speed"] == "board" and st["slowdown"] > 1 and st["board_pow_s"] == [prof.speed.pow_g_s, prof.speed.pow_y_s]
    # Three agreements: on a shared 2-core machine the CPU time of one pow() varies by
    # +-20% with the other core's load (docs/boards.md), so the test holds the median
    # agreement to the profile's +-30%, and each exponentiation to +-60%.
    runs = _dh_ms(t, 3)
    with capsys.disabled():  # the figures, for `pytest -s` (docs/boards.md quotes them)
        print(f"rp2040 board speed: slow-down {st['slowdown']}x (host pow {st['host_pow_ms']} ms), "
              f"DH {runs} ms against the profile's {prof.speed.pow_g_s:.3f} + {prof.speed.pow_y_s:.3f} s; fast {fast} ms")
    want_ms = 1000 * prof.speed.dh_s
    median_ms = sorted(g + y for g, y in runs)[1]  # the median of three
    assert 0.7 * want_ms <= median_ms <= 1.3 * want_ms, (runs, prof.speed, st)
    for g, y in runs:
        assert 0.4 * prof.speed.pow_g_s * 1000 <= g <= 1.6 * prof.speed.pow_g_s * 1000, runs
        assert 0.4 * prof.speed.pow_y_s * 1000 <= y <= 1.6 * prof.speed.pow_y_s * 1000, runs
    assert vb.state()["throttle_stops"] > 0
    assert fast * 10 < median_ms, (fast, runs)
    capsys.readouterr()
    assert cli.main(["board", "status", "--virtual", "rp2040", "--json"]) == 0
    status = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status["speed"] == "board" and status["slowdown"] == st["slowdown"]
    assert cli.main(["board", "virtual", "list"]) == 0
    assert "board speed" in capsys.readouterr().out
    # and back: fast mode is this machine's speed again
    vb.set_speed("fast")
    again = sum(_dh_ms(t)[0])
    assert again * 10 < median_ms, (again, runs)
