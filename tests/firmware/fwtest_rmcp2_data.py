# The content packets of docs/rmcp2-profile.md B.17 inside MicroPython: the board's
# KcRing/Receiver reproduce the host's vectors (tests/vectors/rmcp2/data*.json) packet for
# packet, the mutated corpus gives the same error numbers, and a received packet allocates
# less heap than its own size and retains nothing.
import gc

from tessera_fw.rmcp2 import content as D  # first: compiling it needs the most heap

gc.collect()
from fwtest_scpm_util import iter_array  # noqa: E402
from mpytest import unhex  # noqa: E402
from tessera_fw.rmcp2.const import Rmcp2Error  # noqa: E402

SID = unhex("0123456789abcdef")


class Sink:
    def __init__(self):
        self.got = []

    def __call__(self, kind, mv):
        self.got.append((kind, bytes(mv)))


def _rx(rx, pkt):
    try:
        return rx.receive(pkt), 0
    except Rmcp2Error as e:
        return 0, e.code


def test_cases_decrypt_byte_for_byte():
    n = 0
    for c in iter_array("rmcp2/data.json", "cases"):
        ring = D.KcRing(c["enc"], c["auth"])
        assert ring.install(c["gen"], unhex(c["key"]))
        sink = Sink()
        rx = D.Receiver(SID, ring, sink)
        kind, err = _rx(rx, unhex(c["packet"]))
        assert err == 0, (c["name"], err)
        assert kind == D.KIND_STREAM and sink.got == [(1, unhex(c["plain"]))], c["name"]
        assert _rx(rx, unhex(c["packet"]))[1] == 17  # the same packet again: REPLAY
        n += 1
    assert n == 32


def test_scripts_epochs_replays_objects():
    ring = rx = sink = None
    n = 0
    for st in iter_array("rmcp2/data.json", "steps"):
        op = st["op"]
        if op == "new":
            ring = D.KcRing(st["enc"], st["auth"])
            sink = Sink()
            rx = D.Receiver(SID, ring, sink, st["max_object"])
            name = st["script"]
        elif op == "install":
            assert ring.install(st["gen"], unhex(st["key"])) == st["result"], (name, n)
        else:
            del sink.got[:]
            kind, err = _rx(rx, unhex(st["packet"]))
            assert err == st["error"], (name, n, err, st["error"])
            if not err:
                assert kind == st["kind"] and sink.got == [(kind, unhex(st["plain"]))], (name, n)
        if op != "new":
            assert list(ring.gens()) == st["gens"], (name, n, ring.gens(), st["gens"])
        n += 1
    assert n == 90


def test_corpus_same_error_numbers():
    key = unhex(_top("key"))  # the corpus is streamed: too big for a board heap at once
    seen = {}
    n = 0
    for c in iter_array("rmcp2/data_corpus.json", "corpus"):
        ring = D.KcRing(c["enc"], 1)
        ring.install(7, key)
        err = _rx(D.Receiver(SID, ring, Sink()), unhex(c["packet"]))[1]
        assert err == c["error"], (n, err, c["error"])
        seen[err] = 1
        n += 1
    assert n > 300 and 0 in seen and 16 in seen and 1 in seen and 2 in seen


def _top(name):
    import mpytest

    with open(mpytest.ROOT + "/tests/vectors/rmcp2/data_corpus.json", "rb") as f:
        head = f.read(200)
    i = head.find(b'"' + name.encode() + b'": "') + len(name) + 5
    return head[i:i + 32].decode()


def test_viper_helpers_compiled_on_import():
    # the fast path is there (compiled from source by the interpreter's own native emitter)
    assert D.VIPER


def test_heap_per_packet_below_packet_size_nothing_retained():
    # 1 KB payloads, both ciphers: what one receive() allocates (gc.mem_alloc delta with the
    # collector off) and what stays after a collection.
    for c in iter_array("rmcp2/data.json", "cases"):
        if not c["name"].endswith("-1024"):
            continue
        ring = D.KcRing(c["enc"], c["auth"])
        key = unhex(c["key"])
        ring.install(c["gen"], key)
        count = [0]

        def cb(kind, mv):
            count[0] += 1

        rx = D.Receiver(SID, ring, cb)
        pkt = unhex(c["packet"])
        rx.receive(pkt)  # warm-up (first-call allocations)
        ring.cur.win = D.Window()
        gc.collect()
        before = gc.mem_alloc()
        gc.disable()
        rx.receive(pkt)
        used = gc.mem_alloc() - before
        gc.enable()
        gc.collect()
        kept = gc.mem_alloc() - before
        assert count[0] == 2
        assert used <= len(pkt), (c["name"], used, len(pkt))
        assert kept <= 0, (c["name"], kept)
        print("heap per packet", c["name"], used, "of", len(pkt), "kept", kept)


def test_ctr_counter_blocks_carry_and_wrap():
    dst = bytearray(64)
    ctr = bytearray(b"\xff" * 16)
    D._ctr_blocks(dst, ctr, 3)
    assert bytes(dst[:48]) == b"\xff" * 16 + bytes(16) + bytes(15) + b"\x01"  # wraps modulo 2^128
    ctr = bytearray(bytes(12) + b"\x00\x00\xff\xfe")
    D._ctr_blocks(dst, ctr, 4)
    assert bytes(dst[48:64]) == bytes(13) + b"\x01\x00\x01"  # carries through two bytes
