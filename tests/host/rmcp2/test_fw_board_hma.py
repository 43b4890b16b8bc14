"""HMA leave with a candidate taking over, and a board re-authenticating to it, end to end
over real IP multicast (issue 13; profile B.15, B.17, B.18).

In the namespace pair of test_data_multicast (a veth link, no loopback shortcut): a real SM,
two dmatree.DmaService built from real DMA agents in the DMA namespace, both in one
multicast-enabled area (the content group and the HMA port on the veth), one elected HMA; a
board (the real micropython, .mpy as deployed, 112 KB heap) in the RMA namespace whose
rmcp2.json "dmas" is [the HMA, the other DMA] and "content" {"mcast": group}. The SMA's side
(KcSchedule -> kc_from_sma to both DMAs, Encoder, SmaSender to both relays, as the SMA sends to
every linked DMA) sends a stream:

1. the board joins the HMA; each stream packet reaches it byte-exact by multicast only, sent
   to the group by the HMA's relay alone (the other relay took every packet and sent none);
2. the HMA stops cleanly: HLEAVE, the candidate becomes HMA at once (by HLEAVE, not by
   silence), the board gets LEAVREQ LEAVE_NORMAL, re-authenticates to the candidate with a
   fresh Annex E (its join and re-graft counters, the new DMA's members, no new admission at
   the SM) and the stream goes on byte-exact by multicast from the new HMA; a tampered packet
   among it is counted and dropped;
3. the new HMA is killed (its sockets aborted, no HLEAVE, no LEAVREQ): with no candidate left
   the board detects the lost DMA, leaves the group and keeps trying the candidates of its
   list at its backoff (bounded), while packets sent to the group, forged or not, write no
   plaintext.

The host side runs in this process with its main thread moved into the DMA namespace
(test_fw_board_mcast.in_netns)."""
from __future__ import annotations

import asyncio
import os
import socket

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import dmatree as D
from tessera.rmcp2.content import Encoder
from tessera.rmcp2.contentkey import KcSchedule
from tessera.rmcp2.relay import SmaSender

from .test_data_multicast import DMA_IP, RMA_IP, netns  # noqa: F401 (fixture)
from .test_fw_board_content import BOARD_MAID, ERR_MAC, SID_B, send_stream
from .test_fw_board_mcast import _maddr, in_netns, start_board_in, veth_session
from .test_fw_rma_board import board_fs, counters, mpy_dir  # noqa: F401 (fixture)
from .test_net import SID, pki, until  # noqa: F401 (fixture)

GROUP = "239.13.0.3"
MPORT, HPORT = 26033, 26034  # B.10's content and HMA ports: inside the test's own namespaces
HB = 0.4
T_HANN = 0.3
N1, N2 = 10, 8
WATCH = 3.0  # seconds the board is watched retrying after the last DMA is gone


def test_board_regrafts_to_the_candidate_hma_across_a_link(netns, pki, tmp_path, mpy_dir, capsys):
    dma_ns, rma_ns = netns
    pki_dir = pki[0]
    got: dict = {}

    async def main():
        async with veth_session(pki_dir, tmp_path, 2) as s:
            loop = asyncio.get_running_loop()
            agents = s.dmas()
            svcs = [D.DmaService(D.from_agent(a, os.urandom, loop.time(), t_hb=HB), "0.0.0.0", 0, tick=0.05,
                                 mcast=(GROUP, MPORT), mcast_if=DMA_IP, hma_kw={"t_hann": T_HANN, "port": HPORT})
                    for a in agents]
            started: list = []
            senders: list = []
            con = None
            try:
                for svc in svcs:
                    await svc.start()
                    started.append(svc)
                await until(lambda: sum(x.is_hma for x in svcs) == 1
                            and all(x.is_hma or x.hma.engine.state == "follower" for x in svcs),
                            what=lambda: f"one HMA: {[x.hma.engine.state for x in svcs]}")
                i_a = next(i for i, x in enumerate(svcs) if x.is_hma)
                i_b = 1 - i_a
                a, b = svcs[i_a], svcs[i_b]
                await until(lambda: a.hma.engine.candidates == [agents[i_b].cfg.maid],
                            what=lambda: f"the other DMA the HMA's candidate: {a.hma.engine.candidates}")
                fs = board_fs(tmp_path, pki_dir, s.server.tls_port, sm_host=DMA_IP, hb_s=HB,
                              dmas=[[DMA_IP, svcs[i].port, agents[i].cfg.maid.hex()] for i in (i_a, i_b)],
                              content={"mcast": GROUP, "mcast_port": MPORT, "mcast_if": RMA_IP})
                con = await start_board_in(rma_ns, fs, mpy_dir, 0)  # runs for ever, as deployed
                text = lambda: "\n".join(con.lines)  # noqa: E731

                def at(word: str) -> dict[str, int]:
                    """The board's counters on its first console line with `word` (a line
                    carries them as they were when it was logged)."""
                    return counters(next(x for x in con.lines if word in x))

                # 1. the board joins the HMA, takes the stream by multicast from it alone
                await until(lambda: con.count("content on UDP") == 1 or con.proc.returncode is not None, timeout=30,
                            what=text)
                assert con.count(f"joined DMA {DMA_IP}:{a.port}") == 1, text()
                await until(lambda: any(x.maid == BOARD_MAID for x in a.relay.subscribers), what=text)
                assert BOARD_MAID in a.core.members() and BOARD_MAID not in b.core.members()
                assert GROUP in await _maddr(rma_ns)
                policy = agents[0].policy
                sma = KcSchedule(SID, C.make_maid("127.0.0.1", 40001, 1), os.urandom, 0.0,
                                 ks_suite=D.policy_of(policy)[1])
                alg, auth = policy.get(C.ConEnDecAlg).value, policy.get(C.AuthAlg).value
                enc = Encoder(SID_B, sma.sma_maid, alg, auth, os.urandom)
                enc.set_key(*sma.current())
                for svc, ag in zip(svcs, agents):  # every DMA of the area holds the Kc (B.16)
                    svc.server._send(svc.core.kc_from_sma(sma.keydeliver(ag.cfg.maid, 1, ag.ks), loop.time()))
                await until(lambda: con.count("Kc gen 1 from the DMA") == 1, what=text)
                to_both = SmaSender([("127.0.0.1", x.relay.udp_port, x.relay.tcp_port) for x in (a, b)])
                senders.append(to_both)
                stream_bin = fs / "rx" / "stream.bin"
                sent = bytearray()

                async def stream(snd: SmaSender, n: int, tamper: bool = False) -> None:
                    await send_stream(snd, enc, n, sent, tamper)
                    await until(lambda: stream_bin.exists() and stream_bin.stat().st_size >= len(sent), timeout=10,
                                what=lambda: f"{a.relay.stats} {b.relay.stats}\n{text()}")
                    assert stream_bin.read_bytes() == bytes(sent)

                await stream(to_both, N1)
                await until(lambda: b.relay.stats.get("udp_in", 0) >= N1, what=lambda: f"{b.relay.stats}")
                got["st1"] = dict(a.relay.stats), dict(b.relay.stats)

                # 2. the HMA stops cleanly: HLEAVE, then LEAVREQ LEAVE_NORMAL to its members.
                # The candidate must hold the board in its ACL (HRSANS) for the board's re-join
                await until(lambda: agents[i_b].acl, what="the board in the candidate's ACL")
                t0 = loop.time()
                await a.close()
                started.remove(a)
                await until(lambda: b.is_hma, timeout=3 * T_HANN, what="the candidate taking over on HLEAVE")
                got["took"] = loop.time() - t0  # a.close() included: HLEAVE, then the members' links flushed
                assert b.hma.engine.hleaves == 1 and b.hma.engine.takeovers == 1, b.hma.engine.errors  # by HLEAVE
                await until(lambda: con.count("the DMA left (LEAVREQ 0x20)") == 1, what=text)
                got["c1"] = at("the DMA left")  # as phase 1 ended
                await until(lambda: con.count("content on UDP") == 2 or con.proc.returncode is not None, timeout=20,
                            what=text)
                assert con.count(f"joined DMA {DMA_IP}:{b.port}") == 1, text()
                await until(lambda: BOARD_MAID in b.core.members()
                            and any(x.maid == BOARD_MAID and x.udp is None for x in b.relay.subscribers), what=text)
                assert GROUP in await _maddr(rma_ns)
                to_b = SmaSender([("127.0.0.1", b.relay.udp_port, b.relay.tcp_port)])
                senders.append(to_b)
                await stream(to_b, N2, tamper=True)
                got["st2"] = dict(b.relay.stats)
                got["errors"] = dict(b.core.errors), dict(b.hma.engine.errors)

                # 3. the new HMA is killed: sockets aborted, no HLEAVE, no LEAVREQ; no candidate left
                b.hma.abort()
                await b.close(leave=False)
                started.remove(b)
                await until(lambda: con.count("DMA link lost") == 1, what=text)
                got["c2"] = at("DMA link lost")  # as phase 2 ended
                t0 = loop.time()
                for _ in range(50):  # the content sockets close with the control link: the group left
                    got["maddr_after"] = await _maddr(rma_ns)
                    if GROUP not in got["maddr_after"]:
                        break
                    await asyncio.sleep(0.1)
                size = stream_bin.stat().st_size
                forged = Encoder(SID_B, sma.sma_maid, alg, auth, os.urandom)
                forged.set_key(sma.current()[0], os.urandom(16))
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as m:
                    m.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(DMA_IP))
                    for k in range(6):  # forged (another key) and genuine ones, straight to the group
                        m.sendto((forged if k % 2 else enc).stream(os.urandom(100)), (GROUP, MPORT))
                        await asyncio.sleep(0.05)
                await asyncio.sleep(max(0.0, WATCH - (loop.time() - t0)))
                got["alive"] = con.proc.returncode is None
                got["size_after"], got["size_before"], got["sent"] = stream_bin.stat().st_size, size, len(sent)
                got["c3"] = counters(next(x for x in reversed(con.lines) if "|" in x))
            finally:
                for x in senders:
                    await x.close()
                got["err"] = await con.stop() if con is not None else ""
                for svc in started:
                    await svc.close(leave=False)
            got["lines"], got["ports"] = list(con.lines), (a.port, b.port)

    with in_netns(dma_ns):
        asyncio.run(asyncio.wait_for(main(), 60))
    lines = "\n".join(got["lines"])
    assert "Traceback" not in got["err"], got["err"]
    # 1. every packet went to both relays; only the HMA's sent it, once, to the group; none unicast
    st_a, st_b = got["st1"]
    assert st_a.get("mcast_relayed") == N1 and st_a.get("udp_relayed", 0) == 0, st_a
    assert st_b.get("mcast_relayed", 0) == 0 and st_b.get("udp_relayed", 0) == 0 and st_b["udp_in"] >= N1, st_b
    c1 = got["c1"]
    assert (c1["joined"], c1["regrafts"], c1["dma_i"], c1["c_mc_in"], c1["c_udp"], c1["c_errors"]) == \
        (1, 0, 0, N1, 0, 0), lines
    # 2. a fresh join to the candidate, the stream on
    st2 = got["st2"]
    assert st2.get("mcast_relayed") == N2 + 1 and st2.get("udp_relayed", 0) == 0, st2  # N2 and the tampered one
    c2 = got["c2"]
    # (c2 is the "DMA link lost" line: its own drop is counted there, the only one)
    assert (c2["joined"], c2["regrafts"], c2["dma_left"], c2["dma_drops"], c2["expelled"]) == (2, 1, 1, 1, 0), lines
    assert c2["dma_i"] == 1 and c2["links"] == 1, lines  # the second of "dmas", no new admission at the SM
    assert c2["c_mc_in"] == N1 + N2 + 1 and c2[f"cerr{ERR_MAC}"] == 1 and c2["c_errors"] == 1, lines
    assert c2["c_udp"] == 0, lines
    assert not any(got["errors"]), got["errors"]
    # 3. the lost DMA seen, the group left, the candidates tried at the backoff, nothing written
    a_port, b_port = got["ports"]
    c3 = got["c3"]
    assert got["alive"], lines
    assert GROUP not in got["maddr_after"], got["maddr_after"]
    assert got["size_after"] == got["size_before"] == got["sent"]
    # no join since: only failed joins, and after _JOIN_TRIES of them in a row (the short-lived
    # links count too) a new admission at the SM, which is still up (board_tree.run)
    assert (c3["dma_drops"], c3["joined"]) == (1, 2) and "c_mc_in" not in c3, lines
    after = got["lines"][next(i for i, x in enumerate(got["lines"]) if "DMA link lost" in x) + 1:]
    assert all("no join with DMA" in x or "join refused" in x or "rmcp2: ready" in x for x in after), lines
    tried = [ln for ln in got["lines"] if "no join with DMA" in ln]
    assert any(f":{a_port} " in ln for ln in tried) and any(f":{b_port} " in ln for ln in tried), lines
    # bounded: backoff_s [0.2, 1], doubling, jittered to no less than half: at most
    # 3 + (WATCH - 0.7) / 0.5 (< 8) tries in WATCH seconds, where a tight loop would make hundreds
    assert 2 <= len(tried) <= 10, lines
    with capsys.disabled():
        print(f"\nHMA leave with a board: the candidate HMA {got['took'] * 1000:.0f} ms after the HMA's clean "
              f"stop began (HLEAVE first); {N1} + {N2} stream packets by multicast across the take-over; "
              f"{len(tried)} joins tried in {WATCH:.0f} s with no DMA left")

