"""Hostile input at the board RMA's content ports (docs/security.md, "RMCP-2 board content
reception"): the board (real unix-port micropython, .mpy, the ESP32 profile's 112 KB) admitted
by the real SM and joined to a real DmaTreeServer takes, straight at its announced ports, a UDP
flood of junk and of well-formed packets under guessed keys interleaved with a genuine stream,
then hostile TCP peers (an oversized Length, a frame cut short then silence, a non-content
frame, a burst of connections each replacing the last), an object whose link ends half-way
and one with a forged digest (neither may become a file); then a genuine object. The control
link must stay up, every bad packet be counted by its number, the genuine content arrive
byte-exact. Loopback only, bounded in count and time."""
from __future__ import annotations

import asyncio
import os
import random
import socket

import pytest

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import content as D

from ..rmcp2.test_fw_board_content import BOARD_MAID, HB, HEAP, SID_B, last_counters, ports
from ..rmcp2.test_fw_rma_board import Lines, board_fs, mpy_dir, start_board  # noqa: F401 (fixture)
from ..rmcp2.test_net import SID, Session, pki, until  # noqa: F401 (fixture)

JUNK, FORGED, GOOD = 400, 200, 40
ERR = {"TRUNCATED": 1, "LENGTH": 2, "OVERSIZE": 3, "MAC": 16, "DIGEST": 41}


@pytest.mark.slow
def test_board_content_ports_under_attack(pki, tmp_path, mpy_dir, capsys):
    from tessera.rmcp2 import dmatree as Dt
    from tessera.rmcp2.contentkey import KcSchedule

    pki_dir = pki[0]
    rnd = random.Random(13)

    async def main():
        async with Session(pki_dir, tmp_path, n_dmas=1) as s:
            loop = asyncio.get_running_loop()
            agent = s.dmas()[0]
            core = Dt.from_agent(agent, os.urandom, loop.time(), t_hb=HB)
            srv = Dt.DmaTreeServer(core, port=0, tick=0.05)
            await srv.start()
            fs = board_fs(tmp_path, pki_dir, s.server.tls_port, hb_s=HB,
                          dmas=[["127.0.0.1", srv.port, agent.cfg.maid.hex()]])
            con = Lines(await start_board(fs, mpy_dir, 1, HEAP))
            policy = agent.policy
            sma = KcSchedule(SID, C.make_maid("127.0.0.1", 40001, 1), os.urandom, 0.0, ks_suite=Dt.policy_of(policy)[1])
            cen, cau = policy.get(C.ConEnDecAlg).value, policy.get(C.AuthAlg).value
            enc = D.Encoder(SID_B, sma.sma_maid, cen, cau, os.urandom)
            enc.set_key(*sma.current())
            rx = fs / "rx"
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                await until(lambda: con.count("content on UDP") == 1 or con.proc.returncode is not None, timeout=30,
                            what=lambda: "\n".join(con.lines))
                await until(lambda: BOARD_MAID in core.members(), what="the board a member")
                srv._send(core.kc_from_sma(sma.keydeliver(agent.cfg.maid, 1, agent.ks), loop.time()))
                await until(lambda: con.count("Kc gen 1 from the DMA") == 1, what=lambda: "\n".join(con.lines))
                u, t = ports(con, 1)
                heap0 = last_counters(con)["heap"]

                # 1. UDP: junk (0-1199 bytes) and forged packets (right session and header, a
                # guessed key) with a genuine stream packet every 15 hostile ones
                hostile = [rnd.randbytes(rnd.randrange(0, 1200)) for _ in range(JUNK)]
                hostile += [D.seal_packet(SID_B, sma.sma_maid, D.Kind.STREAM, cen, cau, 1, rnd.randbytes(16),
                                          rnd.randrange(1, 1 << 30), rnd.randbytes(16), rnd.randbytes(rnd.randrange(0, 1024)))
                            for _ in range(FORGED)]
                rnd.shuffle(hostile)
                good = bytearray()
                g = 0
                for k, h in enumerate(hostile):
                    udp.sendto(h, ("127.0.0.1", u))
                    if k % 15 == 14 and g < GOOD:
                        p = rnd.randbytes(rnd.randrange(1, 1025))
                        udp.sendto(enc.stream(p), ("127.0.0.1", u))
                        good += p
                        g += 1
                        await asyncio.sleep(0.005)  # bounded rate: the kernel's buffer is not the test
                while g < GOOD:
                    p = rnd.randbytes(64)
                    udp.sendto(enc.stream(p), ("127.0.0.1", u))
                    good += p
                    g += 1
                await until(lambda: (rx / "stream.bin").exists() and (rx / "stream.bin").stat().st_size >= len(good),
                            timeout=15, what=lambda: "\n".join(con.lines[-3:]))
                assert (rx / "stream.bin").read_bytes() == bytes(good)

                # 2. TCP peers at the content port (asyncio: the DMA's loop runs meanwhile; the
                # board listens with a backlog of 1, so a burst waits in the kernel)
                async def tcp(data: bytes):
                    try:
                        _r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", t), 5)
                    except (OSError, asyncio.TimeoutError):
                        return None
                    w.write(data)
                    return w
                conns = [await tcp(bytes([0x42, 0xC0, 0xFF, 0xFF]) + rnd.randbytes(60))]  # Length 65535
                await asyncio.sleep(0.2)
                conns.append(await tcp(enc.stream(b"x" * 200)[:100]))  # cut short, then silence
                await asyncio.sleep(0.6)  # the board's frame deadline: half a T_HB
                conns.append(await tcp(bytes([0x43, 0xAD, 0x00, 0x40]) + rnd.randbytes(60)))  # not a content packet
                await asyncio.sleep(0.2)
                # a burst of 20: each accepted one replaces the one before (one content link at most)
                conns += await asyncio.gather(*(tcp(b"") for _ in range(20)))
                await asyncio.sleep(0.3)
                for w in conns:
                    if w is not None:
                        w.close()

                # 3. objects that must not become files: one whose link ends after BEGIN and one
                # DATA (object 1), one with a forged OBJ_END digest from a key holder (object 2)
                cut = list(enc.object(os.urandom(2000)))
                w = await tcp(b"".join(cut[:2]))
                await asyncio.sleep(0.3)
                w.close()
                bad = list(enc.object(os.urandom(1500)))
                bad[-1] = D.seal_packet(SID_B, sma.sma_maid, D.Kind.OBJ_END, cen, cau, 1, sma.current()[1],
                                        enc.seq_object, os.urandom(16), os.urandom(32))
                w = await tcp(b"".join(bad))
                await asyncio.sleep(0.5)  # no log line for a refused packet: its count shows in the next one
                w.close()
                assert not list(rx.glob("obj-*")), list(rx.iterdir())  # both .part files deleted

                # 4. a genuine object over TCP afterwards
                data = os.urandom(3000)
                w = await tcp(b"".join(enc.object(data)))
                await until(lambda: con.count("object 3 3000 B verified") == 1, timeout=10,
                            what=lambda: "\n".join(con.lines[-3:]))
                w.close()
                assert (rx / "obj-3.bin").read_bytes() == data
                assert sorted(p.name for p in rx.iterdir()) == ["obj-3.bin", "stream.bin"]
                await asyncio.sleep(HB)  # the control link lived on its HBs through all of it (> 3 T_HB)
                assert BOARD_MAID in core.members()
                c = last_counters(con)
            finally:
                udp.close()
                err = await con.stop()
                await srv.close()
            assert "Traceback" not in err, err
            assert con.count("DMA link lost") == 0 and c["dma_drops"] == 0 and c["joined"] == 1, "\n".join(con.lines)
            # every genuine packet accepted, nothing else: 40 stream packets, BEGIN + DATA of the
            # cut object, BEGIN + 2 DATA of the forged one, and of the last object BEGIN + 3 DATA
            # (its line is logged while its END is handled, counted just after)
            assert c["c_pkts"] == GOOD + 2 + 3 + 4 and c["c_objs"] == 1, c
            errs = {k: v for k, v in c.items() if k.startswith("cerr")}
            # each hostile datagram and the 3 bad TCP frames counted once (the kernel may drop a
            # datagram under load, so not exactly); the forged ones all die at the MAC
            assert JUNK // 2 <= sum(errs.values()) == c["c_errors"] <= JUNK + FORGED + 4, errs
            assert errs.get(f"cerr{ERR['DIGEST']}") == 1, errs
            assert FORGED // 2 <= errs.get(f"cerr{ERR['MAC']}", 0) <= FORGED, errs
            # the TCP peers: Length 65535 (LENGTH), cut short (TRUNCATED), a control message (6)
            assert errs.get("cerr2", 0) >= 1 and errs.get("cerr1", 0) >= 1 and errs.get("cerr6", 0) == 1, errs
            heap1 = c["heap"]
            with capsys.disabled():
                print(f"\nboard content ports under attack: {JUNK} junk + {FORGED} forged datagrams + "
                      f"{len(conns)} hostile TCP peers ({sum(w is None for w in conns)} not connected); errors by number {errs}; "
                      f"{GOOD}/{GOOD} stream packets and the object byte-exact, the cut and forged objects left no file; "
                      f"control link kept; "
                      f"heap {heap0} -> {heap1} B")

    asyncio.run(asyncio.wait_for(main(), 60))
