# Multicast reception of the board RMA (board_rx.Content with rmcp2.json "content" "mcast",
# B.17 multicast-enabled groups) inside MicroPython: the settings are validated, and the
# unicast socket and the group's socket feed one Receiver, so a packet that arrives by both
# counts once (the second copy is a REPLAY of its Kc slot's window).
import gc
import os
import select
import socket
import time

from tessera_fw.rmcp2 import content as D  # first: compiling it needs the most heap

gc.collect()
from fwtest_scpm_util import iter_array  # noqa: E402
from mpytest import unhex  # noqa: E402
from tessera_fw.rmcp2 import rma_cfg  # noqa: E402
from tessera_fw.rmcp2.board_rx import Content  # noqa: E402

SID = unhex("0123456789abcdef")
GOOD = '"sm_host": "10.0.0.2", "session_id": "0123456789abcdef", "maid": "0a0000020ab20001"'


def _load(content):
    p = "/tmp/fwtest_rmcp2_mcast_%s.json" % "".join("%02x" % b for b in os.urandom(4))
    with open(p, "w") as f:
        f.write("{%s, \"content\": %s}" % (GOOD, content))
    try:
        return rma_cfg.load(p)
    finally:
        os.remove(p)


def _bad(content, word):
    try:
        _load(content)
    except ValueError as e:
        assert word in str(e), (content, e)
        return
    raise AssertionError("accepted: " + content)


def test_rmcp2_json_mcast_validated():
    c = _load('{"mcast": "239.13.0.7"}')
    # the group on B.10's content port, any interface; no UDP port announced, TCP picked
    assert c["mcast"] == (bytes([239, 13, 0, 7]), 26033, bytes(4)) and c["content"] == (None, 0)
    c = _load('{"mcast": "224.0.1.2", "mcast_port": 40000, "mcast_if": "10.0.0.9", "udp": 0, "tcp": null}')
    assert c["mcast"] == (bytes([224, 0, 1, 2]), 40000, bytes([10, 0, 0, 9])) and c["content"] == (0, None)
    assert _load('{"udp": 5}')["mcast"] is None and _load('{"udp": 5}')["content"] == (5, 0)
    assert _load("null")["mcast"] is None
    for bad, word in (('{"mcast": "10.0.0.1"}', "multicast"), ('{"mcast": "239.1.1"}', "mcast"),
                      ('{"mcast": "239.1.1.256"}', "mcast"), ('{"mcast": "239.1.1.x"}', "mcast"),
                      ('{"mcast": 239}', "mcast"), ('{"mcast": "239.1.1.1", "mcast_port": 0}', "mcast_port"),
                      ('{"mcast": "239.1.1.1", "mcast_port": 70000}', "mcast_port"),
                      ('{"mcast": "239.1.1.1", "mcast_if": "eth0"}', "mcast_if"),
                      ('{"mcast": "239.1.1.1", "mcast_if": "1.2.3.4.5"}', "mcast_if")):
        _bad(bad, word)


class _Rma:
    sid = SID


class _Runner:
    cfg = {"timeout_s": 5, "hb_ms": 400}
    rma = _Rma()

    def __init__(self):
        self.logs = []

    def log(self, s):
        self.logs.append(s)

    def rand(self, n):
        return os.urandom(n)


class _Tree:
    def __init__(self, ring):
        self.r = _Runner()
        self.ring = ring


class _Sink:
    def __init__(self):
        self.got = []

    def stream(self, mv):
        self.got.append(bytes(mv))

    def close(self):
        pass


def test_one_receiver_for_unicast_and_the_group():
    c = None
    for c in iter_array("rmcp2/data.json", "cases"):
        if len(c["plain"]) >= 64:  # a payload of some size (the first vectors are empty)
            break
    ring = D.KcRing(c["enc"], c["auth"])
    ring.install(c["gen"], unhex(c["key"]))
    sink = _Sink()
    cx = Content(_Tree(ring), (0, None), sink)
    p = select.poll()
    cx.bind(p)
    # the group's socket as it is after mcast_join: a UDP socket polled beside the others
    # (the join itself crosses a veth link in tests/host/rmcp2/test_fw_board_mcast.py)
    cx.cm, mport = cx._sock(socket.SOCK_DGRAM, 0)
    cx.cm.settimeout(0)
    cx.mcast = (bytes([239, 13, 0, 9]), mport, bytes(4))  # close() drops it (not joined: ignored) and closes
    p.register(cx.cm, select.POLLIN)
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pkt = unhex(c["packet"])
    try:
        for port in (cx.uport, mport):
            out.sendto(pkt, socket.getaddrinfo("127.0.0.1", port)[0][-1])
        seen = 0
        t0 = time.ticks_ms()
        while seen < 2 and time.ticks_diff(time.ticks_ms(), t0) < 3000:
            got = 0
            for ev in p.ipoll(100):
                got |= cx.which(ev[0])
            if got:
                cx.handle(got, p)
            seen = cx.counts[0] + cx.rx.errors[17]
        st = cx.status()
        assert sink.got == [unhex(c["plain"])] and cx.counts[1] == len(c["plain"]) // 2, st  # once, byte-exact
        assert cx.counts[0] == 1 and cx.rx.errors[17] == 1 and cx.counts[5] == 1, st  # c_mc_in: one from the group
        assert "cerr17=1" in st and "c_mc_in=1" in st, st
    finally:
        out.close()
        cx.close()
    assert cx.cm is None and cx.cu is None
