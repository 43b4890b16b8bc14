"""A board takes a multicast-enabled group's streams by IP multicast across a link (issue 13,
profile B.17): in the namespace pair of test_data_multicast (a veth link, no loopback
shortcut), a board (the real micropython, .mpy as deployed) in the RMA namespace with
rmcp2.json "content" {"mcast": group} is admitted by a real SM and joins a real DMA
(dmatree.DmaService from a real DMA agent) in the DMA namespace, whose relay sends each stream
packet once to the group on the veth. The SMA's side (KcSchedule -> kc_from_sma, Encoder,
SmaSender) sends a stream and an object: the stream lands byte-exact in the board's
rx/stream.bin by multicast only (the board announced UDP port 0 in CONTENT_ADDR and the
relay's counters show no unicast datagram), the object byte-exact by TCP. When the DMA stops,
the board's control link ends and it leaves the group (ip maddr) while it goes on running.

The host side runs in this process with its main thread moved into the DMA namespace
(setns(2) through ctypes: Python 3.11 has no os.setns), and moved back after."""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import shutil
import sys

from tessera.rmcp2 import codec as C

from .test_data_multicast import DMA_IP, RMA_IP, _cannot, netns  # noqa: F401 (fixture)
from .test_fw_board_content import BOARD_MAID, HEAP, SID_B
from .test_fw_rma_board import BOARD, Lines, board_fs, counters, mpy_dir  # noqa: F401 (fixture)
from .test_net import SID, Session, pki, until  # noqa: F401 (fixture)

GROUP = "239.13.0.2"
MPORT = 26033  # B.10's content port: inside the test's own namespaces, so no clash with other tests
HB = 0.4
N_STREAM = 12
_CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def in_netns(name: str):
    """This thread (and the sockets and threads it makes meanwhile) in network namespace
    `name` (ip netns), then back in the one it was in."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = -1
    try:
        try:
            there = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
        except OSError as e:
            _cannot(f"cannot open namespace {name}: {e}")
        if libc.setns(there, _CLONE_NEWNET):
            _cannot(f"setns into {name}: {os.strerror(ctypes.get_errno())}")
        try:
            yield
        finally:
            if libc.setns(home, _CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), "setns back to the original network namespace")
    finally:
        os.close(home)
        if there >= 0:
            os.close(there)


def test_board_takes_streams_by_multicast_across_a_link(netns, pki, tmp_path, mpy_dir, capsys):
    from tessera.rmcp2 import dmatree as D
    from tessera.rmcp2.content import Encoder
    from tessera.rmcp2.contentkey import KcSchedule
    from tessera.rmcp2.relay import SmaSender

    dma_ns, rma_ns = netns
    pki_dir = pki[0]
    got: dict = {}

    async def main():
        async with veth_session(pki_dir, tmp_path, 1) as s:
            loop = asyncio.get_running_loop()
            agent = s.dmas()[0]
            core = D.from_agent(agent, os.urandom, loop.time(), t_hb=HB)
            svc = D.DmaService(core, "0.0.0.0", 0, tick=0.05,
                               relay_kw={"multicast": (GROUP, MPORT), "multicast_if": DMA_IP})
            await svc.start()
            relay = svc.relay
            fs = board_fs(tmp_path, pki_dir, s.server.tls_port, sm_host=DMA_IP, hb_s=HB,
                          dmas=[[DMA_IP, svc.port, agent.cfg.maid.hex()]],
                          content={"mcast": GROUP, "mcast_port": MPORT, "mcast_if": RMA_IP})
            con = await start_board_in(rma_ns, fs, mpy_dir, 1)
            sender = None
            closed = False
            try:
                await until(lambda: con.count("content on UDP") == 1 or con.proc.returncode is not None, timeout=30,
                            what=lambda: "\n".join(con.lines))
                ln = next(x for x in con.lines if "content on UDP" in x)
                assert re.search(rf"content on UDP 0 TCP \d+ multicast {re.escape(GROUP)}:{MPORT}", ln), ln
                # the DMA learnt the board's CONTENT_ADDR: its TCP port at its veth address, no UDP
                await until(lambda: any(x.maid == BOARD_MAID and x.tcp for x in relay.subscribers),
                            what=lambda: f"the board a subscriber: {relay.subscribers}\n" + "\n".join(con.lines))
                sub = next(x for x in relay.subscribers if x.maid == BOARD_MAID)
                assert sub.udp is None and sub.tcp[0] == RMA_IP, sub
                got["maddr"] = await _maddr(rma_ns)
                policy = agent.policy
                sma = KcSchedule(SID, C.make_maid("127.0.0.1", 40001, 1), os.urandom, 0.0,
                                 ks_suite=D.policy_of(policy)[1])
                enc = Encoder(SID_B, sma.sma_maid, policy.get(C.ConEnDecAlg).value, policy.get(C.AuthAlg).value,
                              os.urandom)
                enc.set_key(*sma.current())
                svc.server._send(core.kc_from_sma(sma.keydeliver(agent.cfg.maid, 1, agent.ks), loop.time()))
                await until(lambda: con.count("Kc gen 1 from the DMA") == 1, what=lambda: "\n".join(con.lines))
                sender = SmaSender([("127.0.0.1", relay.udp_port, relay.tcp_port)])
                rx = fs / "rx"
                sent = bytearray()
                for k in range(N_STREAM):
                    p = os.urandom(50 + 80 * k)
                    sender.stream(enc.stream(p))
                    sent.extend(p)
                    await asyncio.sleep(0.01)
                await until(lambda: (rx / "stream.bin").exists() and (rx / "stream.bin").stat().st_size >= len(sent),
                            timeout=10, what=lambda: f"{relay.stats}\n" + "\n".join(con.lines))
                assert (rx / "stream.bin").read_bytes() == bytes(sent)
                data = os.urandom(3 * 1024 + 77)
                await sender.object(enc.object(data))
                await until(lambda: con.count(f"object 1 {len(data)} B verified") == 1, timeout=10,
                            what=lambda: f"{relay.stats}\n" + "\n".join(con.lines))
                assert (rx / "obj-1.bin").read_bytes() == data
                await until(lambda: con.count("|") >= 1, what="a status line")
                got["stats"] = dict(relay.stats)
                got["errors"] = list(core.errors)
                # the DMA stops (LEAVREQ LEAVE_NORMAL): the board's control link ends and with it
                # the group membership, while the board goes on (re-joining, refused: no DMA)
                closed = True
                await svc.close()
                await until(lambda: con.count("the DMA left") == 1, what=lambda: "\n".join(con.lines))
                for _ in range(30):
                    got["maddr_after"] = await _maddr(rma_ns)
                    alive = con.proc.returncode is None  # the board still runs: its exit would leave too
                    if GROUP not in got["maddr_after"]:
                        break
                    await asyncio.sleep(0.1)
                assert alive, "\n".join(con.lines)
            finally:
                if sender is not None:
                    await sender.close()
                err = await con.stop()
                if not closed:
                    await svc.close()
            got["lines"], got["err"] = con.lines, err

    with in_netns(dma_ns):
        asyncio.run(asyncio.wait_for(main(), 60))
    lines = "\n".join(got["lines"])
    assert "Traceback" not in got["err"], got["err"]
    st = got["stats"]
    # every stream packet went once to the group and none by unicast to the board
    assert st.get("mcast_relayed") == N_STREAM and st.get("udp_relayed", 0) == 0, st
    assert GROUP in got["maddr"], got["maddr"]  # the board's socket joined the group on its veth
    assert GROUP not in got["maddr_after"], got["maddr_after"]  # and left it with the control link
    assert not got["errors"], got["errors"]
    c = counters(next(ln for ln in reversed(got["lines"]) if "|" in ln))
    assert c["c_mc_in"] == N_STREAM and c["c_objs"] == 1 and c["c_errors"] == 0 and c["c_udp"] == 0, lines
    with capsys.disabled():
        heaps = [int(m[1]) for x in got["lines"] if (m := re.search(r"\bheap=(\d+)", x))]
        print(f"\nboard with multicast reception at -X heapsize={HEAP // 1024}K: {N_STREAM} stream packets by "
              f"multicast ({st.get('mcast_relayed')} sent to {GROUP}, {st.get('udp_relayed', 0)} unicast), "
              f"heap in use at most {max(heaps)} B in its status lines")


def veth_session(pki_dir, tmp_path, n_dmas: int) -> Session:
    """test_net.Session with its SM listening on every address of the DMA namespace, so that
    the board reaches it from the RMA namespace over the veth."""
    s = Session(pki_dir, tmp_path, n_dmas=n_dmas)
    s.server.host = "0.0.0.0"
    return s


async def start_board_in(ns: str, fs, mpy_dir, links: int) -> Lines:
    """The board (test_fw_rma_board.BOARD at HEAP, .mpy from `mpy_dir`, files in `fs`) run in
    network namespace `ns`; `links`: SM links before it stops (0: for ever, as deployed)."""
    mp = shutil.which("micropython", path=str(os.path.dirname(sys.executable)))
    return Lines(await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, mp, "-X", f"heapsize={HEAP}", "-c", BOARD, str(links), cwd=fs,
        env=dict(os.environ, MICROPYPATH=str(mpy_dir)), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE))


async def _maddr(ns: str) -> str:
    """The multicast addresses joined in namespace `ns` (ip maddr)."""
    p = await asyncio.create_subprocess_exec("ip", "-n", ns, "maddr", "show", stdout=asyncio.subprocess.PIPE)
    out, _ = await p.communicate()
    return out.decode()
