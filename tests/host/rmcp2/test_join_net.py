"""Tree join over loopback TCP (port 0): the DMA's JoinEngine behind its asyncio adapter
(tree.JoinServer) and the board's join client (firmware/tessera_fw/rmcp2/join.py) in the real
MicroPython interpreter, plus host-side RMAs and a child DMA on the same listener."""
from __future__ import annotations

import asyncio
import os
import shutil
import textwrap
from pathlib import Path

import pytest

from tessera.paths import firmware_dir
from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2 import tree as T

N = C.NodeType
SID = 0x5E55105E55105E55
DMA = C.make_maid("127.0.0.1", 26032, 0x0D01)
HEAP = 112 * 1024  # the ESP32 heap of the firmware test harness (tests/mpy_plugin.py)

MP_SCRIPT = textwrap.dedent('''
    import gc, sys, os, socket, time
    gc.collect()
    h0 = gc.mem_alloc()
    from tessera_fw.rmcp2 import join as J
    from tessera_fw.rmcp2.join_net import run
    gc.collect()
    h1 = gc.mem_alloc()
    port, sid, maid, w, enc, auth = int(sys.argv[1]), bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3]), \\
        bytes.fromhex(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    j = J.Join(sid, maid, w, enc, auth, os.urandom)
    t0 = time.ticks_ms()
    j.precompute()
    t1 = time.ticks_ms()
    s = socket.socket()
    s.settimeout(20)  # T_ANNEXE on the board's side (B.10)
    s.connect(socket.getaddrinfo("127.0.0.1", port)[0][-1])
    t2 = time.ticks_ms()
    run(j, s)
    t3 = time.ticks_ms()
    s.close()
    gc.collect()
    print(J.STATE_NAMES[j.state], j.fail, (j.kmas or b"").hex() or "-", j.kg_gen, (j.kg or b"").hex() or "-",
          time.ticks_diff(t1, t0), time.ticks_diff(t3, t2), h1 - h0, gc.mem_alloc() - h1)
''')


def _mp() -> str:
    mp = shutil.which("micropython", path=str(Path(os.sys.executable).parent))
    assert mp, "the venv's micropython interpreter"
    return mp


async def _board(port: int, maid: bytes, w: bytes, enc: int, auth: int) -> list[str]:
    env = dict(os.environ, MICROPYPATH=str(firmware_dir()))
    p = await asyncio.create_subprocess_exec(
        _mp(), "-X", f"heapsize={HEAP}", "-c", MP_SCRIPT, str(port), f"{SID:016x}", maid.hex(), w.hex(),
        str(enc), str(auth), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), 60)
    assert p.returncode == 0, err.decode()
    return out.decode().split()


async def _host_rma(port: int, cli: T.JoinClient) -> T.JoinClient:
    from tessera.rmcp2.server import read_message

    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(cli.start())
    while cli.state not in ("joined", "refused"):
        data = await read_message(r, 20.0, T.MAX_MESSAGE)
        assert data is not None, f"link closed in state {cli.state}"
        for out in cli.receive(data):
            w.write(out)
        await w.drain()
    w.close()
    return cli


@pytest.mark.parametrize("enc,auth", [(2, 1), (1, 2)])
def test_board_rma_joins_the_host_dma_over_tcp_in_micropython(enc, auth):
    board_maid, stranger_maid = C.make_maid("127.0.0.1", 45001, 1), C.make_maid("127.0.0.1", 45002, 2)
    w_board = os.urandom(16)  # its HASHED_KTLS (from the SM admission in a full session)
    acl = {P.hashed_maid(SID, board_maid): w_board,
           **{P.hashed_maid(SID, C.make_maid("127.0.0.2", 46000 + i, i)): bytes((i,)) * 16 for i in range(1, 4)}}
    suite = P.Suite(C.EnDecId(enc), C.AuthId(auth))
    ks = P.ProtKey(P.KeyRef.KS, os.urandom(16), 1)
    eng = T.JoinEngine(SID, DMA, acl_lookup=acl.get, kg_source=lambda: (4, b"g" * 16), suite=suite, rand=os.urandom,
                       ks_lookup=lambda g: ks if g == 1 else None, ks_current=lambda: ks)

    async def main():
        srv = T.JoinServer(eng)
        await srv.start()
        try:
            board, stranger, *hosts = await asyncio.gather(
                _board(srv.port, board_maid, w_board, enc, auth),
                _board(srv.port, stranger_maid, os.urandom(16), enc, auth),  # not in the ACL
                *[_host_rma(srv.port, T.JoinClient(SID, C.make_maid("127.0.0.2", 46000 + i, i), N.RMA, suite,
                                                   os.urandom, hashed_ktls=bytes((i,)) * 16)) for i in range(1, 4)],
                _host_rma(srv.port, T.JoinClient(SID, C.make_maid("127.0.0.3", 26032, 9), N.DMA, suite, os.urandom,
                                                 ks=ks)))
        finally:
            await srv.close()
        return board, stranger, hosts

    board, stranger, hosts = asyncio.run(main())
    state, fail, kmas, kg_gen, kg, pre_ms, join_ms, heap_imp, heap_join = board
    print(f"board join over TCP (enc {enc}): key pair {pre_ms} ms ahead, join {join_ms} ms; heap: imports "
          f"{heap_imp} B, join done {heap_join} B more")
    assert (state, fail, kg_gen, kg) == ("joined", "0", "4", (b"g" * 16).hex())
    assert eng.members()[board_maid].kmas.hex() == kmas
    assert stranger[:3] == ["refused", "2", "-"]  # NOT_IN_ACL at the probe
    assert all(h.state == "joined" for h in hosts)
    assert len(eng.members()) == 4 and len(eng.children()) == 1 and eng.pending == 0
    assert eng.errors["NOT_IN_ACL"] == 1 and sum(eng.errors.values()) == 1
