"""Hostile peers against the DMA's tree-join listener over loopback (docs/security.md,
"secure RMCP-2 tree join"): garbage frames, forged probes, pass 1 floods from peers without
the auth information (each costs the DMA a DH), replays of a recorded join, pass 3 guesses
and silent links, all at once while honest RMAs join. Bounded in count and time."""
from __future__ import annotations

import asyncio
import gc
import os
import statistics
import time
import tracemalloc

import pytest

from tessera.rmcp2 import annexe as E
from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2 import tree as T
from tessera.rmcp2.server import read_message

N, M = C.NodeType, C.MsgType
SID = 0x0A77AC4ED0A77AC4
DMA = C.make_maid("127.0.0.1", 26032, 0x0D01)
SUITE = P.Suite(C.EnDecId.AES_CTR_128, C.AuthId.HMAC_SHA1)
HONEST = 8
GARBAGE, PROBES, PASS1, PASS3, REPLAYS, SILENT = 40, 40, 24, 24, 8, 10


def maid(i: int) -> bytes:
    return C.make_maid("127.0.0.2", 40000 + i, i)


def w(i: int) -> bytes:
    return i.to_bytes(2, "big") * 8


async def _exchange(port: int, msgs: list[bytes], expect: int = 1) -> list[bytes]:
    """Send `msgs` on one link and collect up to `expect` answers (or none if it closes)."""
    r, wr = await asyncio.open_connection("127.0.0.1", port)
    got = []
    try:
        for m in msgs:
            wr.write(m)
            await wr.drain()
            if len(got) < expect:
                a = await read_message(r, 10.0, 65535)
                if a is None:
                    break
                got.append(a)
    finally:
        wr.close()
    return got


async def _garbage(port: int) -> None:
    """A RELREQ header with random bytes behind it: no answer comes, the peer closes."""
    n = 20 + os.urandom(1)[0]
    await _exchange(port, [bytes((0x43, 0x09)) + n.to_bytes(2, "big") + os.urandom(n - 4)], expect=0)


async def _probe(port: int, i: int) -> None:
    victim = maid(1 + i % HONEST)
    pa = C.ProbeAuth(P.hashed_maid(SID, victim), os.urandom(8), os.urandom(8))  # proof guessed
    await _exchange(port, [C.Message(M.PPROBREQ, N.RMA, SID, victim, (pa,)).encode()])


def _pass1_forged(i: int) -> list[bytes]:
    """A peer that knows a member's MAID but not its HASHED_KTLS: pass 1, then (every other
    one) a made-up Vc. Made before the attack starts, so that the attackers' own DH work does
    not load the event loop that is being measured."""
    victim = maid(1 + i % HONEST)
    cli = E.Client(SID, P.hashed_maid(SID, victim), os.urandom(16), 2, os.urandom(16), E.DH())
    p1 = C.Message(M.RELREQ, N.RMA, SID, victim, (C.Auth(ma_auth=C.MaAuth(1, cli.pass1())),)).encode()
    p3 = C.Message(M.RELREQ, N.RMA, SID, victim, (C.Auth(ma_auth=C.MaAuth(3, os.urandom(16))),)).encode()
    return [p1, p3] if i % 2 else [p1]


async def _pass3_guess(port: int, i: int) -> None:
    victim = maid(1 + i % HONEST)
    await _exchange(port, [C.Message(M.RELREQ, N.RMA, SID, victim, (C.Auth(ma_auth=C.MaAuth(3, os.urandom(16))),)).encode()])


async def _silent(port: int, hold: float) -> None:
    r, wr = await asyncio.open_connection("127.0.0.1", port)
    wr.write(b"\x43\x09\x01")  # a third of a header, then nothing
    try:
        await asyncio.wait_for(r.read(), hold)
    except (asyncio.TimeoutError, ConnectionError):
        pass
    wr.close()


async def _honest(port: int, i: int, record: list | None = None) -> float:
    cli = T.JoinClient(SID, maid(i), N.RMA, SUITE, os.urandom, hashed_ktls=w(i))
    t0 = time.perf_counter()
    r, wr = await asyncio.open_connection("127.0.0.1", port)
    out = [cli.start()]
    while True:
        for m in out:
            wr.write(m)
            if record is not None:
                record.append(m)
        await wr.drain()
        if cli.state in ("joined", "refused"):
            break
        data = await read_message(r, 20.0, 65535)
        assert data is not None, f"honest RMA {i}: link closed in state {cli.state}"
        out = cli.receive(data)
    wr.close()
    assert cli.state == "joined", (i, cli.fail)
    return time.perf_counter() - t0


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


@pytest.mark.slow
def test_join_listener_under_attack():
    acl = {P.hashed_maid(SID, maid(i)): w(i) for i in range(1, 2 * HONEST + 1)}
    eng = T.JoinEngine(SID, DMA, acl_lookup=acl.get, kg_source=lambda: (2, b"k" * 16), suite=SUITE,
                       rand=os.urandom, max_pending=64)
    forged = [_pass1_forged(i) for i in range(PASS1)]
    tracemalloc.start()

    async def main():
        srv = T.JoinServer(eng, max_conns=450, idle=15.0)
        await srv.start()
        try:
            recorded: list[bytes] = []
            calm = [await _honest(srv.port, i, recorded if i == 1 else None) for i in range(1, HONEST + 1)]
            gc.collect()
            mem0 = tracemalloc.get_traced_memory()[0]
            eng.remove(maid(1))  # the recorded member leaves: its recorded join is replayed below

            async def honest_during():
                out = []
                for i in range(HONEST + 1, 2 * HONEST + 1):
                    out.append(await _honest(srv.port, i))
                return out

            attacks = [_garbage(srv.port) for _ in range(GARBAGE)]
            attacks += [_probe(srv.port, i) for i in range(PROBES)]
            attacks += [_exchange(srv.port, m, expect=2) for m in forged]
            attacks += [_pass3_guess(srv.port, i) for i in range(PASS3)]
            attacks += [_exchange(srv.port, recorded, expect=3) for _ in range(REPLAYS)]
            attacks += [_silent(srv.port, 3.0) for _ in range(SILENT)]
            t0 = time.perf_counter()
            res = await asyncio.wait_for(asyncio.gather(honest_during(), *attacks, return_exceptions=True), 120)
            took = time.perf_counter() - t0
            during = res[0]
            assert not isinstance(during, BaseException), during
            crashes = [r for r in res[1:] if isinstance(r, BaseException) and not isinstance(r, (ConnectionError, OSError))]
            for i in range(HONEST + 1, 2 * HONEST + 1):  # leave: the run's state must go
                eng.remove(maid(i))
            await asyncio.sleep(0.2)
            eng.tick(asyncio.get_running_loop().time() + T.T_ANNEXE + 1)
            gc.collect()
            mem1 = tracemalloc.get_traced_memory()[0]
            srv.max_conns = 5  # the connection bound: 10 silent peers, 5 are closed at once
            await asyncio.gather(*[_silent(srv.port, 0.5) for _ in range(10)])
            return calm, during, crashes, took, mem0, mem1, srv
        finally:
            await srv.close()

    calm, during, crashes, took, mem0, mem1, srv = asyncio.run(main())
    tracemalloc.stop()
    print(f"\njoin under attack: calm p50/p99 {_pct(calm, .5):.0f}/{_pct(calm, .99):.0f} ms; during "
          f"p50/p99 {_pct(during, .5):.0f}/{_pct(during, .99):.0f} ms; attack took {took:.1f} s; "
          f"refused {dict(eng.errors)}; conns over bound {srv.refused_conns}; "
          f"traced heap {mem0 / 1e6:.2f} -> {mem1 / 1e6:.2f} MB")
    assert not crashes, crashes[:3]
    assert len(during) == HONEST  # every honest RMA joined during the attack
    members = eng.members()
    assert set(members) == {maid(i) for i in range(2, HONEST + 1)}  # no attacker, no replayed member
    assert eng.pending == 0 and srv.conns == 0 and srv.refused_conns == 5
    # every forged probe refused (plus the replayed recorded probe); every pass-3 guess and
    # every replayed run refused (a run replaced by a newer pass 1 for the same MAID ends NO_PENDING)
    assert eng.errors["PROBE"] >= PROBES + REPLAYS - 1
    assert eng.errors["VERIFY"] + eng.errors["NO_PENDING"] >= PASS3 + REPLAYS
    assert eng.errors["PUBLIC"] >= 1  # a wrong W decrypts g^A outside the subgroup half the time
    assert mem1 - mem0 < 2_000_000, (mem0, mem1)
    assert statistics.median(during) < 10.0
