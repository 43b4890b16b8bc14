"""HMA election and take-over over real IP multicast (profile B.17, B.18): three DMAs
(dmatree.DmaService: tree + relay + HMA engine, sharing one Ks) in one network namespace, a
receiver joined to the content group in another, linked by a veth pair the test makes itself
(as test_data_multicast.py). Exactly one DMA multicasts each stream packet; a clean stop of the
HMA (HLEAVE) hands over to its first candidate at once; a killed HMA (socket closed, no HLEAVE)
is replaced after 3 missed HANNOUNCEs. CI (root) must run it; elsewhere the namespaces may be
missing and a loopback variant (group on lo) runs instead, saying so."""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket

import pytest

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import content as CT
from tessera.rmcp2 import dmatree as D
from tessera.rmcp2 import protect as P

from .test_data_multicast import DMA_IP, RMA_IP, netns  # noqa: F401  (the fixture)
from .test_dmatree import SID, SIDB, SMA, SUITE

GROUP, PORT, HPORT = "239.13.0.7", 26033, 26034
T_HANN = 0.3
KS = P.ProtKey(P.KeyRef.KS, os.urandom(16), 1)
MAIDS = [C.make_maid("10.213.0.1", 26032, 0x0D01 + i) for i in range(3)]  # ascending: 0 is elected
CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def inside(ns: str | None):
    """Run this thread in network namespace `ns` (None: stay); sockets made meanwhile keep it."""
    if ns is None:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET):
            raise OSError(ctypes.get_errno(), "setns")
        yield
    finally:
        os.close(fd)
        libc.setns(back, CLONE_NEWNET)
        os.close(back)


def receiver(rma_ip: str, port: int = PORT) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((GROUP, port))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(GROUP) + socket.inet_aton(rma_ip))
    s.setblocking(False)
    return s


async def until(cond, timeout: float, what: str) -> float:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while not cond():
        if loop.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return loop.time() - t0


async def scenario(rx: socket.socket, dma_ip: str, port: int = PORT, hport: int = HPORT) -> None:
    loop = asyncio.get_running_loop()
    got: dict[bytes, int] = {}

    def readable() -> None:
        for _ in range(256):
            try:
                data = rx.recv(2048)
            except BlockingIOError:
                return
            got[data] = got.get(data, 0) + 1

    loop.add_reader(rx.fileno(), readable)
    svcs = []
    for m in MAIDS:
        core = D.TreeCore(SID, m, acl_lookup={}.get, mecha=C.GkMecha.BACKWARD, suite=SUITE, rand=os.urandom,
                          now=loop.time(), ks_lookup=lambda g: KS if g == 1 else None, ks_current=lambda: KS)
        svcs.append(D.DmaService(core, port=0, tick=0.05, mcast=(GROUP, port), mcast_if=dma_ip,
                                 hma_kw={"t_hann": T_HANN, "port": hport}))
    enc = CT.Encoder(SIDB, SMA, 2, 1, os.urandom)
    enc.set_key(1, os.urandom(16))
    feed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def stream(live, hma, n: int = 20) -> None:
        """n packets, each to every live DMA's relay (as the SMA does); each arrives once, from the HMA."""
        before = {id(s): s.relay.stats["mcast_relayed"] for s in live}
        sent = []
        for i in range(n):
            pkt = enc.stream(bytes([i]) * 200)
            sent.append(pkt)
            for s in live:
                feed.sendto(pkt, ("127.0.0.1", s.relay.udp_port))
            await asyncio.sleep(0.005)
        await until(lambda: all(p in got for p in sent), 5, "every packet at the receiver")
        await asyncio.sleep(0.2)  # room for a duplicate to show up
        assert [got[p] for p in sent] == [1] * n
        for s in live:
            assert s.relay.stats["mcast_relayed"] - before[id(s)] == (n if s is hma else 0)
            assert s.relay.stats["udp_in"] >= n

    closed: list = []
    try:
        for s in svcs:
            await s.start()
        a, b, c = svcs
        await until(lambda: a.is_hma and all(s.hma.engine.state == "follower" for s in (b, c)), 5, "an HMA")
        for _ in range(10):  # stays exactly one
            assert [s.is_hma for s in svcs] == [True, False, False]
            await asyncio.sleep(T_HANN / 2)
        assert b.hma.engine.candidates == MAIDS[1:]
        await stream(svcs, a)

        closed = [a]
        await a.close()  # clean stop: HLEAVE, then the members' LEAVREQ
        await until(lambda: b.is_hma, 3 * T_HANN, "the first candidate taking over on HLEAVE")
        assert not c.is_hma and c.hma.engine.hma == MAIDS[1]
        assert b.hma.engine.hleaves == 1 and c.hma.engine.hleaves == 1  # by HLEAVE, not by silence
        await stream([b, c], b)

        n0 = c.hma.engine.takeovers
        b.hma.abort()  # killed: its HMA socket closed without HLEAVE, then the rest without a word
        closed.append(b)
        await b.close(leave=False)
        took = await until(lambda: c.is_hma, 20 * T_HANN, "take-over after 3 missed HANNOUNCEs")
        assert took > 1.5 * T_HANN  # it waited for the missed announcements (3 T_HANN from the last heard)
        await stream([c], c)
        assert c.hma.engine.takeovers == n0 + 1 and c.hma.engine.hleaves == 1  # by silence this time
    finally:
        loop.remove_reader(rx.fileno())
        feed.close()
        for s in svcs:
            if s not in closed and s.relay.udp_port:
                await s.close(leave=False)


def test_hma_election_and_takeover_across_a_veth_link(netns):  # noqa: F811
    dma, rma = netns
    with inside(rma):
        rx = receiver(RMA_IP)
    try:
        with inside(dma):
            asyncio.run(asyncio.wait_for(scenario(rx, DMA_IP), 60))
    finally:
        rx.close()


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hma_election_and_takeover_on_loopback():
    """The same on lo, with ports picked free at run time: the variant for machines where the
    namespaces cannot be made (not root, outside CI); it runs everywhere, beside the other."""
    port, hport = _free_udp_port(), _free_udp_port()
    rx = receiver("127.0.0.1", port)
    try:
        asyncio.run(asyncio.wait_for(scenario(rx, "127.0.0.1", port, hport), 60))
    finally:
        rx.close()


def test_mcast_options_are_checked_with_a_clear_error():
    import subprocess
    import sys

    from tessera import cliargs
    from tessera.errors import TesseraError

    assert cliargs.mcast_group("239.1.2.3", "--mcast") == ("239.1.2.3", 26033)
    assert cliargs.mcast_group("239.1.2.3:4000", "--mcast") == ("239.1.2.3", 4000)
    for bad in ("10.0.0.1", "239.1.2.3:0", "239.1.2.3:x", "host:1", ""):
        with pytest.raises(TesseraError, match="GROUP"):
            cliargs.mcast_group(bad, "--mcast")
    base = [sys.executable, "-m", "tessera", "dma", "--sm", "127.0.0.1:1", "--session-id", "1", "--pki-dir", "/nonexistent"]
    for extra, want in ((["--mcast", "10.0.0.1"], "--mcast wants GROUP[:PORT]"),
                        (["--mcast", "239.1.2.3", "--mcast-if", "eth0"], "--mcast-if wants an IPv4 address")):
        p = subprocess.run(base + extra, capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and want in p.stderr, p.stderr
