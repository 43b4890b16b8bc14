# Profile B.16 key deliveries on the board, inside MicroPython: the host's vectors
# (tests/vectors/rmcp2/keys_deliver.json) sealed byte for byte by the firmware envelope,
# installed by keys.py, and the hostile corpus counted with the same error numbers.
import gc

# Compiled from source here (a board loads .mpy): each module is compiled on a collected heap,
# the biggest first, so that the compiler's transient buffers do not fragment the esp32 profile.
# In one import chain, the result depended on the length of the checkout's path (CI failed).
from tessera_fw.rmcp2 import msg  # noqa: F401

gc.collect()
from tessera_fw.rmcp2 import seal as S  # noqa: E402

gc.collect()
from tessera_fw.rmcp2 import keys as K  # noqa: E402

gc.collect()
from mpytest import unhex  # noqa: E402

SIDB = unhex("0123456789abcdef")


class Ring:
    """The install(gen, key16) interface of the content layer's KcRing (test stand-in)."""

    def __init__(self):
        self.keys = {}

    def install(self, gen, key):
        self.keys[gen] = key


def iter_array(rel, member):
    # fwtest_scpm_util.iter_array would pull in the SCPM constants (too much for the esp32
    # profile next to keys.py); this file is small: load it once, keep only one member
    import json

    import mpytest

    with open(mpytest.ROOT + "/tests/vectors/" + rel) as f:
        items = json.load(f)[member]
    gc.collect()
    return items


def _cases():
    return iter_array("rmcp2/keys_deliver.json", "cases")


def _board(c, dma):
    r = c["rma"]
    b = K.Keys(SIDB, unhex(r["maid"]), Ring(), c["enc"], c["auth"])
    b.joined(dma, unhex(r["kmas"]), r["kg_gen"], unhex(r["kg"]))
    return b


def _dma():
    return unhex("7f00000165b0" + "0d01")  # 127.0.0.1:26032 instance 0x0D01, as the generator


def test_sealed_byte_for_byte():
    env = S.Envelope()
    n = 0
    for c in _cases():
        key = S.ProtKey(c["key_ref"], unhex(c["key"]), c["gen"])
        out = env.seal(unhex(c["plain"]), key, c["enc"], c["auth"], c["seq"], unhex(c["iv"]))
        assert bytes(out) == unhex(c["sealed"]), c["name"]
        n += 1
    assert n == 8


def test_installed_once_then_replay():
    dma = _dma()
    n = 0
    for c in _cases():
        if c["rma"] is None:
            continue
        b = _board(c, dma)
        sealed = unhex(c["sealed"])
        assert b.receive(sealed, 0) == c["key_type"], c["name"]
        if c["key_type"] == 2:
            assert b.kg_gen() == c["delivered_gen"]
            assert (b.kg_prev is None) == (c["form"] == "kg-kmas")
        else:
            assert b.ring.keys == {c["delivered_gen"]: unhex(c["delivered_key"])}
        assert b.receive(sealed, 0) == 0 and b.errors[17] == 1
        n += 1
    assert n == 6


def test_grace_of_the_previous_kg_uses_board_ticks():
    dma = _dma()
    for c in _cases():
        if c["form"] != "kg-kg":
            continue
        b = _board(c, dma)
        t0 = 0x3FFFFFFF - 1000  # just before a board's ticks_ms wraps (2^30)
        assert b.receive(unhex(c["sealed"]), t0) == 2 and b.kg_prev is not None
        b.receive(b"", (t0 + 29000) & 0x3FFFFFFF)
        assert b.kg_prev is not None  # 29 s later, across the wrap: still in grace
        b.receive(b"", (t0 + 30000) & 0x3FFFFFFF)
        assert b.kg_prev is None


def test_corpus_same_error_numbers():
    dma = _dma()
    cases = {}
    for c in _cases():
        if c["rma"] is not None:
            cases[c["name"]] = c
    n = 0
    for v in iter_array("rmcp2/keys_deliver.json", "corpus"):
        b = _board(cases[v["case"]], dma)
        got = b.receive(unhex(v["data"]), 0)
        errs = [i for i in range(19) if b.errors[i]]
        want = v["error"]
        if want == 0:
            assert got and not errs, v["tag"]
        else:
            assert got == 0 and errs == [max(want, 0)], (v["case"], v["tag"], errs, want)
        n += 1
    assert n >= 40


def test_heap_of_the_engine():
    """Heap of one Keys engine, on its own and sharing the RMA's envelope and decoder."""
    from tessera_fw.rmcp2.msg import Decoder

    maid = unhex("0a0000010001" + "0001")
    gc.collect()
    before = gc.mem_alloc()
    b = K.Keys(SIDB, maid, Ring())
    gc.collect()
    alone = gc.mem_alloc() - before
    env, dec = S.Envelope(), Decoder()
    gc.collect()
    before = gc.mem_alloc()
    c = K.Keys(SIDB, maid, Ring(), env=env, dec=dec)
    gc.collect()
    shared = gc.mem_alloc() - before
    print("keys.Keys() heap alone / sharing env+dec:", alone, shared)
    assert alone < 6144, alone  # the envelope's two 1080-byte buffers dominate
    assert shared < 1536, shared
    del b, c
