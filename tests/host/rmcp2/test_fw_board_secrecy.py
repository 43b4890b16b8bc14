"""Forward and backward secrecy of content at the boards (issue 13, GK_MECHA BACKWARD+FORWARD),
two virtual boards (the real unix-port micropython, .mpy, the ESP32 profile's 112 KB) admitted
by the real SM and joined to a real DMA service (dmatree.DmaService: tree, relay fed by the
boards' CONTENT_ADDR) built from a real DMA agent. The test plays the SMA: a
contentkey.KcSchedule delivers Kc under the live Ks (TreeCore.kc_from_sma, as the upstream link
does) and serves the DMA's KCREQs; content.Encoder + relay.SmaSender send the content.

FORWARD: the second board joins after content under Kc gen 1 went out; it gets no Kc older
than its join (with FORWARD the DMA re-wraps only what it received after the join), its join
makes the DMA ask for a fresh Kc (KCREQ), and the very datagrams sent before its join,
replayed to its content port, are refused (KEY) and never written. BACKWARD: the first board
leaves (SIGINT: LEAVREQ under K_MAS); the remaining board gets a fresh Kg and, through the
leave's KCREQ, a fresh Kc; content after the switch reaches it, and the board that left never
received that Kc."""
from __future__ import annotations

import asyncio
import os
import signal
import socket

from tessera.rmcp2 import codec as C

from .test_fw_board_content import HB, HEAP, last_counters, ports
from .test_fw_rma_board import Lines, board_fs, counters, mpy_dir, start_board  # noqa: F401 (fixture)
from .test_net import SID, Session, pki, until  # noqa: F401 (fixture)

M1 = bytes([127, 0, 0, 1, 0xB1, 1, 0, 1])
M2 = bytes([127, 0, 0, 1, 0xB1, 1, 0, 2])
ERR_KEY = 14  # B.12


def test_boards_forward_and_backward_secrecy_of_content(pki, tmp_path, mpy_dir, monkeypatch):
    from tessera.rmcp2 import dmatree as D
    from tessera.rmcp2.content import Encoder
    from tessera.rmcp2.contentkey import KcAnnounce, KcSchedule
    from tessera.rmcp2.relay import SmaSender

    pki_dir = pki[0]
    real_policy_of = D.policy_of
    # the session's SMA proposes PERIODIC; this DMA runs BACKWARD+FORWARD (what the SMA would
    # propose for a pay service): the key layer reads it from the policy
    monkeypatch.setattr(D, "policy_of", lambda p: (C.GkMecha.BACKWARD_FORWARD, real_policy_of(p)[1]))

    async def main():
        async with Session(pki_dir, tmp_path, n_dmas=1) as s:
            loop = asyncio.get_running_loop()
            agent = s.dmas()[0]
            dma = agent.cfg.maid
            core = D.from_agent(agent, os.urandom, loop.time(), t_hb=HB)
            assert core.group.mecha == C.GkMecha.BACKWARD_FORWARD
            svc = D.DmaService(core, port=0, tick=0.05)
            await svc.start()
            policy = agent.policy
            suite = real_policy_of(policy)[1]
            sma = KcSchedule(SID, C.make_maid("127.0.0.1", 40001, 1), os.urandom, 0.0, ks_suite=suite, urgent_gap=0.0)
            enc = Encoder(SID.to_bytes(8, "big"), sma.sma_maid, policy.get(C.ConEnDecAlg).value,
                          policy.get(C.AuthAlg).value, os.urandom)
            enc.set_key(*sma.current())
            snd = SmaSender([("127.0.0.1", svc.relay.udp_port, svc.relay.tcp_port)])
            cons: list[Lines] = []

            def deliver(gen: int) -> None:  # the SMA's KEYDELIVER(Kc) under Ks, as the upstream link feeds it
                svc.server._send(core.kc_from_sma(sma.keydeliver(dma, gen, agent.ks), loop.time()))

            def serve_kcreqs() -> int:  # the SMA's side of KCREQ: an urgent Kc, delivered at once
                gens = []
                for _why in core.take_kcreqs():
                    for e in sma.request_rotation(loop.time()):
                        if isinstance(e, KcAnnounce):
                            deliver(e.gen)
                            gens.append(e.gen)
                return gens[-1] if gens else 0

            async def board(name: str, maid: bytes) -> tuple[Lines, os.PathLike]:
                fs = board_fs(tmp_path, pki_dir, s.server.tls_port, name=name, maid=maid.hex(), hb_s=HB,
                              dmas=[["127.0.0.1", svc.port, dma.hex()]])
                con = Lines(await start_board(fs, mpy_dir, 1, HEAP))
                cons.append(con)
                await until(lambda: maid in [x.maid for x in core.subscribers()] or con.proc.returncode is not None,
                            timeout=40, what=lambda: "\n".join(con.lines))
                return con, fs

            async def stream(n: int, tag: bytes) -> tuple[bytes, list[bytes]]:
                plain, wire = b"", []
                for k in range(n):
                    p = tag + bytes([k]) + os.urandom(200)
                    pkt = enc.stream(p)
                    snd.stream(pkt)
                    plain += p
                    wire.append(pkt)
                    await asyncio.sleep(0.01)
                return plain, wire

            def rx(fs) -> bytes:
                f = fs / "rx" / "stream.bin"
                return f.read_bytes() if f.exists() else b""

            try:
                b1, fs1 = await board("rma1", M1)
                deliver(1)
                ga = serve_kcreqs()  # its join's KCREQ (FORWARD): an urgent Kc
                enc.set_key(ga, sma.key(ga))  # the switch (its lead is the SMA's business)
                await until(lambda: b1.count(f"Kc gen {ga} from the DMA") == 1, what=lambda: "\n".join(b1.lines))
                p1, wire1 = await stream(3, b"before ")
                await until(lambda: rx(fs1) == p1, timeout=10, what=lambda: "\n".join(b1.lines))

                # FORWARD: board 2 joins; the DMA holds Kc ga but gives it none from before its join
                b2, fs2 = await board("rma2", M2)
                gb = serve_kcreqs()  # its join's KCREQ: an urgent Kc to both boards
                assert gb == ga + 1, (ga, gb)
                await until(lambda: b2.count(f"Kc gen {gb} from the DMA") == 1 and b1.count(f"Kc gen {gb} from the DMA") == 1,
                            what=lambda: "\n".join(b1.lines + ["--"] + b2.lines))
                assert b2.count(f"Kc gen {ga} from the DMA") == 0 and b2.count("Kc gen 1 from the DMA") == 0, \
                    "\n".join(b2.lines)
                # what went out before its join, replayed straight to its content port: refused
                u2, _t2 = ports(b2, 1)
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    for pkt in wire1:
                        u.sendto(pkt, ("127.0.0.1", u2))
                enc.set_key(gb, sma.key(gb))
                p2, _ = await stream(3, b"after join ")
                await until(lambda: rx(fs2) == p2 and rx(fs1) == p1 + p2, timeout=10,
                            what=lambda: "\n".join(b1.lines + ["--"] + b2.lines))
                assert last_counters(b2)[f"cerr{ERR_KEY}"] == len(wire1), "\n".join(b2.lines)

                # BACKWARD: board 1 leaves; board 2 gets a fresh Kg, and the leave's KCREQ a fresh Kc
                kg = core.group.current()[0]
                b1.proc.send_signal(signal.SIGINT)
                await until(lambda: M1 not in core.members(), what=lambda: "\n".join(b1.lines))
                assert core.group.current()[0] != kg and core.left["leavreq"] == 1
                gc = serve_kcreqs()
                assert gc == gb + 1, (gb, gc)
                await until(lambda: b2.count(f"Kc gen {gc} from the DMA") == 1, what=lambda: "\n".join(b2.lines))
                enc.set_key(gc, sma.key(gc))
                p3, _ = await stream(3, b"after leave ")
                await until(lambda: rx(fs2) == p2 + p3, timeout=10, what=lambda: "\n".join(b2.lines))
                await until(lambda: b1.proc.returncode is not None, timeout=20, what="board 1 stopped")
                assert b1.count(f"Kc gen {gc} from the DMA") == 0 and rx(fs1) == p1 + p2, "\n".join(b1.lines)
                assert [x.maid for x in core.subscribers()] == [M2]
            finally:
                errs = [await c.stop() for c in cons]
                await snd.close()
                await svc.close()
            for e in errs:
                assert "Traceback" not in e, e
            c2 = counters(next(ln for ln in reversed(cons[1].lines) if "|" in ln))
            assert c2["kc_gen"] == gc and c2["c_errors"] == len(wire1), "\n".join(cons[1].lines)

    asyncio.run(asyncio.wait_for(main(), 90))
