"""Annex E / tree-join time on the firmware (issue 13 benchmarks: "Annex E authentication time
on the firmware, on board-speed virtual ESP32 and Pico W"), printed as one Markdown section.

For each board: a board-speed virtual board (throttled to the board's DH time) runs the
firmware join client (tessera_fw.rmcp2.join) against the host DMA's JoinServer over loopback
TCP, three times with the DH key pair made ahead (Join.precompute) and three times without,
and, in the same session, three plain DH agreements (tessera_fw.crypto.dh: the key pair and
the shared secret) as the reference. All times by the board's own clock (ticks_ms); medians.
The host side's cost per join (JoinEngine, pass 1 + pass 3) is measured in-process.
Uses a private TESSERA_VAR (temporary directory); progress on stderr.
"""
from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time

RUNS = 3
SID = 0x0B0A4D5EED0B0A4D

BOARD_SCRIPT = """
import os, socket, time
from tessera_fw.rmcp2 import join as J
from tessera_fw.rmcp2.join_net import run
from tessera_fw.crypto import dh
for _ in range(%(dh_runs)d):
    t0 = time.ticks_ms()
    a = dh.DH()
    z = a.shared(a.public)
    print('dh', time.ticks_diff(time.ticks_ms(), t0))
for pre in (1, 0):
    for _ in range(%(runs)d):
        j = J.Join(bytes.fromhex('%(sid)s'), bytes.fromhex('%(maid)s'), bytes.fromhex('%(w)s'), 2, 1, os.urandom)
        t0 = time.ticks_ms()
        if pre:
            j.precompute()
        t1 = time.ticks_ms()
        s = socket.socket()
        s.settimeout(20)
        s.connect(socket.getaddrinfo('127.0.0.1', %(port)d)[0][-1])
        run(j, s)
        t2 = time.ticks_ms()
        s.close()
        assert J.STATE_NAMES[j.state] == 'joined'
        print('join', pre, time.ticks_diff(t1, t0), time.ticks_diff(t2, t1))
"""


def _engine(maid: bytes, w: bytes):
    from tessera.rmcp2 import codec as C
    from tessera.rmcp2 import protect as P
    from tessera.rmcp2 import tree as T

    return T.JoinEngine(SID, C.make_maid("127.0.0.1", 26032, 0x0D01), acl_lookup={P.hashed_maid(SID, maid): w}.get,
                        kg_source=lambda: (1, b"g" * 16), suite=P.Suite(C.EnDecId.AES_CTR_128, C.AuthId.HMAC_SHA1),
                        rand=os.urandom)


def board_figures(board: str, runs: int = RUNS, dh_reference: bool = True) -> dict:
    """Medians (ms) for one board; (test_tree_board_speed.py joins a board-speed Pico W in make test)."""
    from tessera.boards import ops, profile
    from tessera.boards.virtual import VirtualBoard
    from tessera.rmcp2 import codec as C
    from tessera.rmcp2 import tree as T

    maid, w = C.make_maid("127.0.0.1", 45200, 1), os.urandom(16)
    eng = _engine(maid, w)
    vb = VirtualBoard(f"bench-join-{board}", board)
    try:
        t = ops.Target(profile.load(board), vb.start(fresh=True), virtual=True, vboard=vb)
        print(f"{board}: deploying", file=sys.stderr, flush=True)
        ops.deploy(t)

        async def main():
            srv = T.JoinServer(eng)
            await srv.start()
            try:
                vb.set_speed("board")
                st = vb.state()
                print(f"{board}: board speed, slow-down {st['slowdown']}x; joining", file=sys.stderr, flush=True)
                out = await asyncio.to_thread(t.remote.exec, BOARD_SCRIPT % {
                    "runs": runs, "dh_runs": runs if dh_reference else 0, "sid": f"{SID:016x}", "maid": maid.hex(), "w": w.hex(), "port": srv.port})
                return st, out
            finally:
                await srv.close()

        st, out = asyncio.run(main())
    finally:
        vb.stop()
    rows = [ln.split() for ln in out.splitlines() if ln.strip()]
    dh = [int(r[1]) for r in rows if r[0] == "dh"]
    pre = [int(r[2]) for r in rows if r[0] == "join" and r[1] == "1"]
    with_pre = [int(r[3]) for r in rows if r[0] == "join" and r[1] == "1"]
    without = [int(r[3]) for r in rows if r[0] == "join" and r[1] == "0"]
    assert len(pre) == len(without) == runs and len(dh) == (runs if dh_reference else 0), out
    return {"slowdown": st["slowdown"], "dh": statistics.median(dh) if dh else None, "pre": statistics.median(pre),
            "with_pre": statistics.median(with_pre), "without": statistics.median(without),
            "members": len(eng.members()), "errors": sum(eng.errors.values())}


def host_cost(n: int = 40) -> float:
    """Median ms of the DMA engine's work for one join (pass 1 + pass 3), in-process."""
    from tessera.rmcp2 import codec as C
    from tessera.rmcp2 import tree as T

    maid = C.make_maid("127.0.0.1", 45201, 2)
    w = os.urandom(16)
    eng = _engine(maid, w)
    times = []
    for i in range(n):
        cli = T.JoinClient(SID, maid, C.NodeType.RMA, eng.suite, os.urandom, hashed_ktls=w)
        relreq1 = cli.receive(eng.receive(i, cli.start(), 0.0)[0])[0]
        t0 = time.perf_counter()
        p2 = eng.receive(i, relreq1, 0.0)[0]
        t1 = time.perf_counter()
        p3 = cli.receive(p2)[0]
        t2 = time.perf_counter()
        eng.receive(i, p3, 0.0)
        t3 = time.perf_counter()
        times.append((t1 - t0 + t3 - t2) * 1000)
    return statistics.median(times)


def main() -> None:
    os.environ.setdefault("TESSERA_VAR", tempfile.mkdtemp(prefix="tessera-bench-join-"))
    boards = {"rp2040": "Pico W (RP2040)", "esp32": "ESP32"}
    figs = {b: board_figures(b) for b in boards}
    host = host_cost()
    print("## Secure RMCP-2 tree join (Annex E) on the firmware\n")
    print("Board-speed virtual boards (throttled to the board's DH time, docs/boards.md), the firmware "
          "join client against the host DMA's JoinServer over loopback TCP; board clock, median of "
          f"{RUNS}. \"One DH\" is a plain key pair + shared secret (`tessera_fw.crypto.dh`) on the same "
          "board in the same session: the join's reference cost (profile B.11, B.15).\n")
    print("| board | slow-down | one DH (2 exp.) | key pair ahead (`precompute`) | join with the pair ahead "
          "| join computing the pair | join with pair / one DH | join without / one DH |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for b, name in boards.items():
        f = figs[b]
        print(f"| {name} | {f['slowdown']}x | {f['dh']:.0f} ms | {f['pre']:.0f} ms | {f['with_pre']:.0f} ms "
              f"| {f['without']:.0f} ms | {f['with_pre'] / f['dh']:.2f} | {f['without'] / f['dh']:.2f} |")
    print(f"\nThe DMA's own work per join on this host (JoinEngine pass 1 + pass 3, median of 40): "
          f"{host:.1f} ms. T_ANNEXE is 20 s (B.10).")


if __name__ == "__main__":
    main()
