"""The board RMA's TLS handshake and admission (KTLSREQ, SUBSREQ, policy agreement) on
board-speed virtual boards (issue 12): a virtual Pico W and a virtual ESP32, throttled to the
real boards' speed (docs/boards.md), are admitted by the real SM server over loopback and
enter the DMA's ACL. The handshake and admission times are the board's own (ticks_ms); the
SM's default timers (T_TLS, T_ADMIT, T_SECAGANS) are sized from them (profile B.10).

`make test` runs the ESP32 here; the Pico W's admission at board speed runs in make test
inside test_tree_board_speed.py (admitted, then joined). Both boards here with
TESSERA_RMA_SPEED_BOARDS=rp2040,esp32 (about 10 s each), which gave the figures in the docs."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import time

import pytest

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2 import sm as S
from tessera.rmcp2.server import Limits

from ..rmcp2.test_fw_rma import _der_files
from ..rmcp2.test_net import SID, Session, pki, until  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

# one admission on the board, as board.Runner does it, with the board's own timings
ADMIT = """
from tessera_fw.rmcp2 import board
r = board.Runner(board.load())
st = r.once()
print("RESULT", st, r.rma.result, r.rma.sec_return, r.link.handshake_ms if r.link else -1, r.link.admit_ms if r.link else -1)
if r.link:
    r.link.close()
"""


@pytest.mark.parametrize("board", os.environ.get("TESSERA_RMA_SPEED_BOARDS", "esp32").split(","))
def test_board_rma_admitted_at_board_speed_with_the_sm_defaults(board, pki, tmp_path, virtual_board, capsys):
    pki_dir = pki[0]
    name = {"rp2040": "rma2", "esp32": "rma3"}[board]
    _der_files(pki_dir, [name])
    t = virtual_board(f"rma-speed-{board}", board)  # deployed fast, then throttled
    maid = bytes([127, 0, 0, 1, 0xB2, len(board), 0, 2])
    timings = {}

    async def main():
        # the SM with its default timers (T_TLS 30 s, T_IDLE 60 s; T_ADMIT, T_SECAGANS of SmConfig)
        async with Session(pki_dir, tmp_path, n_dmas=1, limits=Limits(tick=0.05, max_conns=64)) as s:
            fs = t.vboard.fs
            for src, dst in ((f"{name}.der", "rma.der"), (f"{name}.key.der", "rma.key.der"), ("ca.der", "ca.der")):
                shutil.copy(pki_dir / src, fs / dst)
            (fs / "rmcp2.json").write_text(json.dumps({
                "sm_host": "127.0.0.1", "sm_port": s.server.tls_port, "session_id": SID.to_bytes(8, "big").hex(),
                "maid": maid.hex(), "timeout_s": 60}))
            t.vboard.set_speed("board")
            t0 = time.monotonic()
            out = await asyncio.to_thread(t.remote.exec, ADMIT)
            timings["wall"] = time.monotonic() - t0
            line = next((ln for ln in out.splitlines() if ln.startswith("RESULT")), out)
            st, result, ret, hs, adm = (int(v) for v in line.split()[1:])
            timings.update(handshake_ms=hs, admit_ms=adm)
            assert (st, result, ret) == (4, 0x01, 0x01), out  # READY, ACCEPTED, SEC_RETURN OK
            dma = s.dmas()[0]
            await until(lambda: P.hashed_maid(SID, maid) in {e[:16] for e in dma.acl},
                        what="the board RMA in the DMA's ACL")

    asyncio.run(asyncio.wait_for(main(), 150))
    st = t.vboard.state() or {}
    with capsys.disabled():
        print(f"\n{board} at board speed (slow-down {st.get('slowdown')}x): TLS handshake {timings['handshake_ms']} ms, "
              f"admission after it {timings['admit_ms']} ms (board ticks); wall {timings['wall']:.1f} s with mpremote")
    sm_cfg = S.SmConfig(SID, C.make_maid("127.0.0.1", 26030, 1))
    # the defaults leave at least a 3x margin over what the board needed (profile B.10)
    assert 3 * timings["handshake_ms"] <= 1000 * Limits().tls_timeout, timings
    assert 3 * timings["admit_ms"] <= 1000 * min(sm_cfg.admit_timeout, sm_cfg.secagans_timeout), timings
