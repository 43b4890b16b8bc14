"""The board tree client at board speed (issue 13: "at least one flow at board speed"): a
virtual Pico W (the slowest board, tessera.boards.throttle), deployed as a board is, is
admitted by the SM server, joins the test's DMA (tree.JoinEngine + GroupKeyManager behind
test_fw_board_tree.TreeDma) over loopback with the key pair made ahead, closes its SM link and
takes a Kc and a BACKWARD Kg re-key on the control link, then is expelled (LEAVREQ); times by
the board's own clock. About 20 s (the TLS handshake and two 2048-bit exponentiations at 70x)."""
from __future__ import annotations

import asyncio
import json
import os
import shutil

import pytest

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2 import tree as T

from ..rmcp2.test_fw_board_tree import DMA_MAID, TreeDma, host_member
from ..rmcp2.test_fw_rma import _der_files
from ..rmcp2.test_net import SID, Session, pki, until  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

# the board's side, as board.Runner.run does it once, with the board's own timings:
# admission, one join, the SM link closed, then the control link until the DMA expels it
BOARD_RUN = """
from tessera_fw.rmcp2 import board
from tessera_fw.rmcp2.board_tree import TREE_NAMES, Tree
r = board.Runner(board.load())
st = r.once()
t = Tree(r)
r.tree = t
t.w = r.rma.hashed_ktls()  # as Tree.run() does before its joins
ok = t.join(r.rma.enc, r.rma.mac)
how = -1
if ok:
    r.link.close()
    r.link = None
    how = t.control()
print("RESULT", st, ok, how, " ".join("%s=%d" % (n, v) for n, v in zip(TREE_NAMES, t.counts)))
"""


def test_pico_w_joins_and_takes_keys_at_board_speed(pki, tmp_path, virtual_board, capsys):
    pki_dir = pki[0]
    name = "rma3"  # a name in test_net.NAMES (the pki fixture)
    _der_files(pki_dir, [name])
    t = virtual_board("tree-speed-rp2040", "rp2040")  # deployed fast, then throttled
    maid = bytes([127, 0, 0, 1, 0xB4, 4, 0, 4])
    other, other_w = C.make_maid("127.0.0.2", 46004, 4), os.urandom(16)
    got = {}

    async def main():
        async with Session(pki_dir, tmp_path, n_dmas=1) as s:
            sm_acl = s.server.sm.acl  # the SM's own ACL: no HRSANS lag in this timing run
            dma = TreeDma(lambda h: {P.hashed_maid(SID, other): other_w}.get(bytes(h)) or sm_acl.get(bytes(h)),
                          s.dmas()[0]._suite, hb=30.0)
            await dma.start()
            fs = t.vboard.fs
            for src, dst in ((f"{name}.der", "rma.der"), (f"{name}.key.der", "rma.key.der"), ("ca.der", "ca.der")):
                shutil.copy(pki_dir / src, fs / dst)
            (fs / "rmcp2.json").write_text(json.dumps({
                "sm_host": "127.0.0.1", "sm_port": s.server.tls_port, "session_id": SID.to_bytes(8, "big").hex(),
                "maid": maid.hex(), "timeout_s": 60, "hb_s": 30, "dma": ["127.0.0.1", dma.port],
                "dma_maid": DMA_MAID.hex()}))
            t.vboard.set_speed("board")
            run = asyncio.create_task(asyncio.to_thread(t.remote.exec, BOARD_RUN))
            try:
                await until(lambda: maid in dma.writers or run.done(), timeout=120, what="the board joined")
                assert maid in dma.writers, run.result() if run.done() else "not joined"
                link = await host_member(dma.port, other, other_w, dma.suite)
                dma.send_kc(3, os.urandom(16))
                link.close()  # the other member leaves: a BACKWARD Kg to the board under its K_MAS
                await until(lambda: other in dma.left, what="the other member's leave")
                got["gen"] = dma.gk.current()[0]
                await asyncio.sleep(2)  # the board unseals both at its speed
                dma.expel(maid)
                got["out"] = await asyncio.wait_for(run, 60)
                got["leavans"] = list(dma.leavans)
            finally:
                await dma.close()

    asyncio.run(asyncio.wait_for(main(), 240))
    out = got["out"]
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT")), out)
    _, st, ok, how, *kv = line.split()
    c = {k: int(v) for k, v in (x.split("=") for x in kv)}
    join_ms = int(next(ln for ln in out.splitlines() if "joined DMA" in ln).split(" in ")[1].split()[0])
    sp = t.vboard.state() or {}
    with capsys.disabled():
        print(f"\nrp2040 tree client at board speed (slow-down {sp.get('slowdown')}x): join {join_ms} ms "
              f"(key pair made inside it; board ticks); Kc, BACKWARD Kg gen {got['gen']} and LEAVREQ on the control link")
    assert (st, ok, how) == ("4", "True", "1"), out  # READY, joined, EXPELLED
    assert (c["joined"], c["kc"], c["kg"], c["expelled"], c["dma_drops"]) == (1, 1, 1, 1, 0), out
    assert f"Kg gen {got['gen']} from the DMA" in out and got["leavans"] == [(maid, C.Result.ACCEPTED)], out
    assert join_ms < T.T_ANNEXE * 1000, out
