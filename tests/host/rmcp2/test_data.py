"""Content packets (profile B.17) and the DMA relay: the host encoder/decoder against the
vectors, hypothesis fuzzing, the relay over loopback UDP and TCP (unchanged bytes, bounded
per RMA, a slow RMA never stalls the others, no key anywhere in it), and the end to end
path SMA encoder -> relay -> board receiver inside the real MicroPython."""
from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import os
import socket
import subprocess
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.boards.interp import micropython_path
from tessera.paths import firmware_dir
from tessera.rmcp2 import codec as C
from tessera.rmcp2 import content as D
from tessera.rmcp2 import relay as R

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
VEC = os.path.join(ROOT, "tests", "vectors", "rmcp2")
SID = bytes.fromhex("0123456789abcdef")
MAID = C.make_maid("127.0.0.1", 26032, 0x05A1)
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load(name):
    with open(os.path.join(VEC, name)) as f:
        return json.load(f)


def ring_with(enc, auth, *keys):
    ring = D.KcRing(enc, auth)
    for gen, k in keys:
        assert ring.install(gen, k)
    return ring


def rand_source():
    return lambda n: os.urandom(n)


# -- vectors --------------------------------------------------------------------------------

def test_vectors_encoded_byte_for_byte_and_decoded():
    v = load("data.json")
    assert len(v["cases"]) == 32
    for c in v["cases"]:
        key, iv, plain = bytes.fromhex(c["key"]), bytes.fromhex(c["iv"]), bytes.fromhex(c["plain"])
        pkt = D.seal_packet(SID, MAID, D.Kind.STREAM, c["enc"], c["auth"], c["gen"], key, c["seq"], iv, plain)
        assert pkt.hex() == c["packet"], c["name"]
        dec = D.Decoder(SID, ring_with(c["enc"], c["auth"], (c["gen"], key)))
        assert dec.receive(pkt) == D.Event(D.Kind.STREAM, plain)


def test_vector_scripts_replayed():
    dec = ring = None
    for st_ in load("data.json")["steps"]:
        if st_["op"] == "new":
            ring = D.KcRing(st_["enc"], st_["auth"])
            dec = D.Decoder(SID, ring, max_object=st_["max_object"])
            continue
        if st_["op"] == "install":
            assert ring.install(st_["gen"], bytes.fromhex(st_["key"])) is st_["result"]
        else:
            try:
                ev = dec.receive(bytes.fromhex(st_["packet"]))
                assert (0, int(ev.kind), ev.data.hex()) == (st_["error"], st_["kind"], st_["plain"])
            except C.Rmcp2Error as e:
                assert int(e.code) == st_["error"]
        assert list(ring.gens()) == st_["gens"]


def test_vector_corpus_same_errors():
    v = load("data_corpus.json")
    key = bytes.fromhex(v["key"])
    codes = set()
    for c in v["corpus"]:
        dec = D.Decoder(SID, ring_with(c["enc"], 1, (7, key)))
        try:
            dec.receive(bytes.fromhex(c["packet"]))
            got = 0
        except C.Rmcp2Error as e:
            got = int(e.code)
        assert got == c["error"]
        codes.add(got)
    assert {0, 1, 2, 16} <= codes


def test_specific_errors():
    key = bytes(range(16))
    enc = D.Encoder(SID, MAID, 2, 1, rand_source())
    enc.set_key(5, key)
    pkt = enc.stream(b"x" * 100)

    def err(data, ring=None, sid=SID):
        with pytest.raises(C.Rmcp2Error) as ei:
            D.Decoder(sid, ring or ring_with(2, 1, (5, key))).receive(data)
        return ei.value.code

    E = C.ErrorCode
    assert err(pkt[:59]) == E.TRUNCATED
    assert err(pkt + bytes(1100)) == E.OVERSIZE
    assert err(pkt[:-1]) == E.LENGTH
    assert err(bytes([0x52]) + pkt[1:]) == E.VERSION
    assert err(pkt[:1] + b"\xc1" + pkt[2:]) == E.UNKNOWN_MESSAGE
    assert err(bytes([0x45]) + pkt[1:]) == E.NODE_TYPE
    assert err(pkt, sid=bytes(8)) == E.VALUE
    assert err(pkt[:12] + bytes(8) + pkt[20:]) == E.MAID
    assert err(pkt[:20] + b"\x07" + pkt[21:]) == E.VALUE
    assert err(pkt, ring_with(1, 1, (5, key))) == E.ALGORITHM  # not the agreed CON_EN_DEC_ID
    assert err(pkt, ring_with(2, 1, (6, key))) == E.KEY  # unknown epoch
    assert err(pkt[:-1] + bytes([pkt[-1] ^ 1])) == E.MAC
    assert err(pkt[:50] + bytes([pkt[50] ^ 1]) + pkt[51:]) == E.MAC
    assert err(pkt, ring_with(2, 1, (5, bytes(16)))) == E.MAC  # another key of the same Gen
    dec = D.Decoder(SID, ring_with(2, 1, (5, key)))
    dec.receive(pkt)
    with pytest.raises(C.Rmcp2Error) as ei:
        dec.receive(pkt)
    assert ei.value.code == E.REPLAY and dec.errors == {E.REPLAY: 1}


def test_kc_ring_rules():
    r = D.KcRing(1, 1)
    k = [bytes([i]) * 16 for i in range(4)]
    assert r.install(255, k[0]) and r.gens() == (255, 0)
    assert r.install(1, k[1]) and r.gens() == (255, 1)  # 255 is followed by 1
    assert not r.install(254, k[2]) and r.gens() == (255, 1)  # never back
    assert r.install(3, k[2]) and r.gens() == (255, 3)  # further ahead: the next, replacing 1 (urgent rotation)
    with pytest.raises(C.Rmcp2Error):
        r.install(0, k[0])


def test_urgent_rotation_keeps_the_current_kc_until_the_switch():
    """B.16's urgent rotation announces Gen g+2 while g is in use and g+1 was announced: content
    under g must keep decrypting until the first packet under g+2 (it once dropped g at install)."""
    k = {g: bytes([g]) * 16 for g in (5, 6, 7)}
    ring = ring_with(1, 1, (5, k[5]), (6, k[6]))
    dec = D.Decoder(SID, ring)
    assert ring.install(7, k[7]) and ring.gens() == (5, 7)
    iv = bytes(16)
    p5 = D.seal_packet(SID, MAID, D.Kind.STREAM, 1, 1, 5, k[5], 1, iv, b"still under 5")
    p7 = D.seal_packet(SID, MAID, D.Kind.STREAM, 1, 1, 7, k[7], 1, iv, b"first under 7")
    assert dec.receive(p5) == D.Event(D.Kind.STREAM, b"still under 5")
    assert dec.receive(p7) == D.Event(D.Kind.STREAM, b"first under 7") and ring.gens() == (7, 0)


# -- hypothesis -----------------------------------------------------------------------------

@FAST
@given(enc=st.sampled_from([1, 2]), auth=st.sampled_from([1, 2]), gen=st.integers(1, 255),
       payloads=st.lists(st.binary(max_size=1024), min_size=1, max_size=4), key=st.binary(min_size=16, max_size=16))
def test_roundtrip_any_payload(enc, auth, gen, payloads, key):
    e = D.Encoder(SID, MAID, enc, auth, rand_source())
    e.set_key(gen, key)
    dec = D.Decoder(SID, ring_with(enc, auth, (gen, key)))
    for p in payloads:
        assert dec.receive(e.stream(p)).data == p
    obj = b"".join(payloads)
    events = [dec.receive(x) for x in e.object(obj, chunk=300)]
    assert b"".join(ev.data for ev in events if ev.kind == D.Kind.OBJ_DATA) == obj
    assert events[-1] == D.Event(D.Kind.OBJ_END, hashlib.sha256(obj).digest())


@FAST
@given(data=st.binary(max_size=1300))
def test_arbitrary_bytes_only_rmcp2_errors(data):
    dec = D.Decoder(SID, ring_with(1, 1, (7, bytes(16))))
    with pytest.raises(C.Rmcp2Error):
        dec.receive(data)


_KEY = bytes(range(16, 32))
_BASE = {enc: D.Encoder(SID, MAID, enc, 1, lambda n: bytes(n)) for enc in (1, 2)}
for _e in _BASE.values():
    _e.set_key(9, _KEY)
_PKTS = {enc: _BASE[enc].stream(bytes(range(200))) for enc in (1, 2)}


@FAST
@given(enc=st.sampled_from([1, 2]), pos=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_any_bit_flip_rejected(enc, pos, bit):
    pkt = bytearray(_PKTS[enc])
    pos %= len(pkt)
    pkt[pos] ^= 1 << bit
    with pytest.raises(C.Rmcp2Error):
        D.Decoder(SID, ring_with(enc, 1, (9, _KEY))).receive(bytes(pkt))


# -- relay ----------------------------------------------------------------------------------

class UdpSink(asyncio.DatagramProtocol):
    def __init__(self):
        self.got: list[bytes] = []

    def datagram_received(self, data, addr):
        self.got.append(data)


async def udp_sink():
    loop = asyncio.get_running_loop()
    tr, proto = await loop.create_datagram_endpoint(UdpSink, local_addr=("127.0.0.1", 0))
    return tr, proto, tr.get_extra_info("sockname")[:2]


class TcpSink:
    """An RMA's TCP listener for reliable delivery."""

    def __init__(self):
        self.frames: list[bytes] = []
        self.server = None
        self.closed = asyncio.Event()

    async def start(self):
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[:2]

    async def _conn(self, reader, writer):
        try:
            while True:
                head = await reader.readexactly(4)
                n = D.frame_length(head)
                self.frames.append(head + await reader.readexactly(n - 4))
        except asyncio.IncompleteReadError:
            self.closed.set()
        writer.close()


async def until(cond, timeout=20.0, what=""):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_relay_udp_and_tcp_unchanged_to_every_rma():
    async def main():
        relay = R.Relay(SID)
        await relay.start()
        sinks, subs = [], []
        for i in range(3):
            tr, up, ua = await udp_sink()
            ts = TcpSink()
            ta = await ts.start()
            sinks.append((tr, up, ts))
            subs.append(R.Subscriber(bytes([i + 1]) * 8, udp=ua, tcp=ta))
        relay.set_subscribers(subs)
        enc = D.Encoder(SID, MAID, 2, 1, rand_source())
        enc.set_key(1, bytes(16))
        stream = [enc.stream(os.urandom(n)) for n in (1, 500, 1024, 17, 999)]
        loop = asyncio.get_running_loop()
        sma, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=("127.0.0.1", relay.udp_port))
        for p in stream:
            sma.sendto(p)
        sma.sendto(b"junk" * 20)  # dropped at the relay, counted
        obj = list(enc.object(os.urandom(5000)))
        _r, w = await asyncio.open_connection("127.0.0.1", relay.tcp_port)
        for p in obj:
            w.write(p)
        await w.drain()
        await until(lambda: all(len(s[1].got) == len(stream) and len(s[2].frames) == len(obj) for s in sinks),
                    what="every RMA has every packet")
        for _tr, up, ts in sinks:
            assert up.got == stream and ts.frames == obj  # byte for byte, in order
        assert relay.stats["udp_relayed"] == 3 * len(stream) and relay.stats["tcp_relayed"] == 3 * len(obj)
        assert relay.stats["rejected_UNKNOWN_MESSAGE"] == 1 or relay.stats["rejected_LENGTH"] == 1
        relay.set_subscribers(subs[:1])  # the join layer removes two RMAs
        sma.sendto(stream[0])
        await until(lambda: len(sinks[0][1].got) == len(stream) + 1, what="remaining RMA")
        await asyncio.sleep(0.2)
        assert len(sinks[1][1].got) == len(sinks[2][1].got) == len(stream)
        w.close()
        sma.close()
        await relay.close()
        for tr, _up, ts in sinks:
            tr.close()
            ts.server.close()
    asyncio.run(asyncio.wait_for(main(), 60))


def test_sma_sender_through_two_relays_to_rmas():
    """The SMA's sender to two DMA relays, each with its own RMAs (figure 104): stream and
    object arrive decrypted and byte-exact at every RMA; the relays see only ciphertext."""
    kc = os.urandom(16)

    async def main():
        relays, rmas = [], []
        for _d in range(2):
            relay = R.Relay(SID)
            await relay.start()
            subs = []
            for i in range(2):
                tr, up, ua = await udp_sink()
                ts = TcpSink()
                subs.append(R.Subscriber(bytes([len(rmas) + 1]) * 8, udp=ua, tcp=await ts.start()))
                rmas.append((tr, up, ts))
            relay.set_subscribers(subs)
            relays.append(relay)
        sender = R.SmaSender([("127.0.0.1", r.udp_port, r.tcp_port) for r in relays])
        enc = D.Encoder(SID, MAID, 1, 2, rand_source())
        enc.set_key(200, kc)
        payloads = [os.urandom(n) for n in (10, 1024, 333)]
        for p in payloads:
            sender.stream(enc.stream(p))
            await asyncio.sleep(0.01)
        obj = os.urandom(70_000)
        pkts = list(enc.object(obj))
        await sender.object(pkts)
        await until(lambda: all(len(up.got) == 3 and len(ts.frames) == len(pkts) for _t, up, ts in rmas),
                    what="every RMA behind both DMAs")
        for tr, up, ts in rmas:
            dec = D.Decoder(SID, ring_with(1, 2, (200, kc)))
            assert [dec.receive(x).data for x in up.got] == payloads
            evs = [dec.receive(x) for x in ts.frames]
            assert b"".join(e.data for e in evs if e.kind == D.Kind.OBJ_DATA) == obj
            assert evs[-1].kind == D.Kind.OBJ_END
            tr.close()
            ts.server.close()
        assert sender.stats["udp_sent"] == 6 and sender.stats["tcp_connect_failed"] == 0
        await sender.close()
        for r in relays:
            await r.close()
    asyncio.run(asyncio.wait_for(main(), 60))


def test_relay_slow_rma_closed_others_served():
    async def main():
        relay = R.Relay(SID, queue_bytes=128 * 1024)
        await relay.start()
        fast = [TcpSink() for _ in range(2)]
        slow = socket.socket()  # an RMA that never reads: a listener never accepting, small buffer
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.bind(("127.0.0.1", 0))
        slow.listen(1)
        subs = [R.Subscriber(bytes([i + 1]) * 8, tcp=await s.start()) for i, s in enumerate(fast)]
        subs.append(R.Subscriber(b"\x03" * 8, tcp=slow.getsockname()))
        relay.set_subscribers(subs)
        enc = D.Encoder(SID, MAID, 1, 1, rand_source())
        enc.set_key(1, bytes(16))
        obj = list(enc.object(os.urandom(1024 * 1024)))  # 1 MB: more than the stalled path holds
        _r, w = await asyncio.open_connection("127.0.0.1", relay.tcp_port)
        for i in range(0, len(obj), 64):
            w.write(b"".join(obj[i:i + 64]))
            await w.drain()
        await until(lambda: all(len(s.frames) == len(obj) for s in fast), 60, "fast RMAs complete")
        for s in fast:
            assert s.frames == obj
        assert relay.per_rma[("tcp_slow_closed", subs[2].maid)] == 1
        assert relay.stats["tcp_slow_closed"] == 1
        w.close()
        await relay.close()
        for s in fast:
            s.server.close()
        slow.close()
    asyncio.run(asyncio.wait_for(main(), 120))


def _objects_reachable(root, limit=200_000):
    seen, todo, out = set(), [root], []
    while todo and len(seen) < limit:
        o = todo.pop()
        if id(o) in seen or isinstance(o, type) or type(o).__name__ == "module" or isinstance(o, asyncio.AbstractEventLoop):
            continue
        seen.add(id(o))
        out.append(o)
        todo.extend(gc.get_referents(o))
    return out


def _live(o) -> bool:
    if not isinstance(o, memoryview):
        return False
    try:
        return o.nbytes >= 0
    except ValueError:  # released
        return False


def test_relay_never_holds_a_key():
    """The relay takes no key and keeps none: after relaying, nothing reachable from it
    holds Kc, K_enc or K_mac (figure 104: DMAs never decrypt content)."""
    kc = os.urandom(16)
    k_enc, k_mac = D.data_keys(kc, 2, 1)
    enc = D.Encoder(SID, MAID, 2, 1, rand_source())
    enc.set_key(3, kc)
    pkt = enc.stream(b"secret content" * 20)  # made outside the loop: only the relay is walked

    async def main():
        relay = R.Relay(SID)
        await relay.start()
        tr, up, ua = await udp_sink()
        relay.set_subscribers([R.Subscriber(b"\x01" * 8, udp=ua)])
        relay.from_udp(pkt, ("127.0.0.1", 1))
        await until(lambda: up.got == [pkt], what="relayed")
        _r, w = await asyncio.open_connection("127.0.0.1", relay.tcp_port)
        w.write(pkt)
        await w.drain()
        await until(lambda: relay.stats["tcp_in"] == 1, what="TCP frame in")
        reach = _objects_reachable(relay)
        assert len(reach) > 20  # the walk does see the relay's state
        held = [bytes(o) for o in reach if isinstance(o, (bytes, bytearray)) or _live(o)]
        w.close()
        tr.close()
        await relay.close()
        return held
    held = asyncio.run(asyncio.wait_for(main(), 30))
    assert any(pkt in b for b in held)  # the relayed frame itself was among what the walk saw
    for b in held:
        for k in (kc, k_enc, k_mac):
            assert k not in b
    assert b"secret content" not in pkt  # what it relays is ciphertext


# -- end to end with the board's receiver in the real MicroPython ----------------------------

BOARD = textwrap.dedent("""
    import sys, socket, hashlib, binascii
    from tessera_fw.rmcp2 import content as D
    sid, k1, k2, n = binascii.unhexlify(sys.argv[1]), binascii.unhexlify(sys.argv[2]), binascii.unhexlify(sys.argv[3]), int(sys.argv[4])
    ring = D.KcRing(int(sys.argv[5]), 1)
    ring.install(1, k1)
    ring.install(2, k2)  # the next epoch, delivered ahead (KEYDELIVER under Kg)
    st = hashlib.sha256(); ob = hashlib.sha256()
    got = {'stream': 0, 'obj': 0, 'end': 0}
    def cb(kind, mv):
        if kind == D.KIND_STREAM:
            st.update(mv); got['stream'] += 1
        elif kind == D.KIND_DATA:
            ob.update(mv); got['obj'] += len(mv)
        elif kind == D.KIND_END:
            got['end'] = 1
    rx = D.Receiver(sid, ring, cb)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(socket.getaddrinfo('127.0.0.1', int(sys.argv[6]))[0][-1])
    t = socket.socket()
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(socket.getaddrinfo('127.0.0.1', int(sys.argv[7]))[0][-1])
    t.listen(1)
    print('READY')
    u.settimeout(30)
    D.udp_loop(u, rx, n)
    c, _ = t.accept()
    c.settimeout(30)
    D.tcp_loop(c, rx)
    print('STREAM', got['stream'], binascii.hexlify(st.digest()).decode())
    print('OBJECT', got['obj'], got['end'], binascii.hexlify(ob.digest()).decode())
    print('GENS', ring.gens()[0], ring.gens()[1])
    print('ERRORS', sum(rx.errors))
""")


def _free_ports(n):
    socks = []
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM)[:n]:
        s = socket.socket(socket.AF_INET, kind)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    return socks


@pytest.mark.parametrize("alg", [1, 2], ids=["cbc", "ctr"])
def test_end_to_end_sma_relay_board_micropython(alg, tmp_path):
    k1, k2 = os.urandom(16), os.urandom(16)
    n_stream = 40
    script = tmp_path / "board.py"
    # MicroPython's socket has no getsockname: the test picks two free ports at run time
    us, ts = _free_ports(2)
    up, tp = us.getsockname()[1], ts.getsockname()[1]
    us.close()
    ts.close()
    script.write_text(BOARD)
    env = dict(os.environ, MICROPYPATH=str(firmware_dir()))
    proc = subprocess.Popen([micropython_path(), "-X", "heapsize=112K", str(script), SID.hex(), k1.hex(), k2.hex(),
                             str(n_stream), str(alg), str(up), str(tp)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    async def main():
        line = await asyncio.to_thread(proc.stdout.readline)
        assert line.strip() == "READY", proc.stderr.read()
        relay = R.Relay(SID)
        await relay.start()
        relay.set_subscribers([R.Subscriber(b"\xb0" * 8, udp=("127.0.0.1", up), tcp=("127.0.0.1", tp))])
        enc = D.Encoder(SID, MAID, alg, 1, rand_source())
        enc.set_key(1, k1)
        payloads = [os.urandom(1 + (i * 97) % 1024) for i in range(n_stream)]
        loop = asyncio.get_running_loop()
        sma, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=("127.0.0.1", relay.udp_port))
        for i, p in enumerate(payloads):
            if i == n_stream // 2:
                enc.set_key(2, k2)  # Kc rotation mid-stream
            sma.sendto(enc.stream(p))
            await asyncio.sleep(0.002)  # a stream's pace, not a flood
        obj = os.urandom(20_000)
        _r, w = await asyncio.open_connection("127.0.0.1", relay.tcp_port)
        pkts = list(enc.object(obj))
        for p in pkts:
            w.write(p)
        await w.drain()
        await until(lambda: relay.stats["tcp_relayed"] == len(pkts), 30, "object relayed")
        await relay.close()  # closes the link to the board: its tcp_loop ends
        w.close()
        sma.close()
        out, err = await asyncio.to_thread(proc.communicate, timeout=60)
        return payloads, obj, out, err

    payloads, obj, out, err = asyncio.run(asyncio.wait_for(main(), 120))
    assert proc.returncode == 0, err
    lines = dict(ln.split(" ", 1) for ln in out.strip().splitlines())
    assert lines["STREAM"] == f"{len(payloads)} {hashlib.sha256(b''.join(payloads)).hexdigest()}"
    assert lines["OBJECT"] == f"{len(obj)} 1 {hashlib.sha256(obj).hexdigest()}"
    assert lines["GENS"] == "2 0"  # switched to the next epoch, the old one dropped
    assert lines["ERRORS"] == "0"


def test_firmware_receiver_under_cpython_mpshim():
    """The board module also imports and works under CPython (tessera.mpshim), where its
    viper helpers fall back to plain Python: the vector cases decrypt the same."""
    from tessera import mpshim

    mpshim.install()
    from tessera_fw.rmcp2 import content as F

    dst = bytearray(48)
    F._ctr_blocks(dst, bytearray(b"\xff" * 16), 3)
    assert bytes(dst) == b"\xff" * 16 + bytes(16) + bytes(15) + b"\x01"
    for c in load("data.json")["cases"]:
        ring = F.KcRing(c["enc"], c["auth"])
        ring.install(c["gen"], bytes.fromhex(c["key"]))
        got = []
        rx = F.Receiver(SID, ring, lambda k, mv: got.append(bytes(mv)))
        assert rx.receive(bytes.fromhex(c["packet"])) == F.KIND_STREAM
        assert got == [bytes.fromhex(c["plain"])], c["name"]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=1024), min_size=1, max_size=8), st.lists(st.integers(1, 3000), max_size=10))
def test_frame_reader_reassembles_packets_cut_anywhere(payloads, cuts):
    e = D.Encoder(SID, MAID, 2, 1, os.urandom)
    e.set_key(1, bytes(16))
    packets = [e.stream(p) for p in payloads]
    wire, got, r, at = b"".join(packets), [], D.FrameReader(), 0
    for c in cuts + [len(b"".join(packets))]:
        got += r.feed(wire[at:at + c])
        at += c
    got += r.feed(wire[at:])
    assert got == packets
    with pytest.raises(C.Rmcp2Error) as ei:  # a Length outside 60..1100: the stream cannot be resynchronised
        D.FrameReader().feed(b"\x42\xc0\x00\x10" + bytes(20))
    assert ei.value.code == C.ErrorCode.LENGTH
