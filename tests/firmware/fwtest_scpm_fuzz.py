# Robustness of the whole device engine: the host's decoder corpus and mutations of valid
# key-management / application frames go into Device.receive; only SCPMError may happen
# inside (counted, never raised), and the engine keeps answering valid frames afterwards.
import gc

from tessera_fw.scpm.device import Device  # first: compiling it needs the most heap

gc.collect()
from fwtest_scpm_util import DEV, SETUP, MiniKSN, Seq, enrol, iter_array, scalar  # noqa: E402
from mpytest import unhex  # noqa: E402
from tessera_fw.scpm import const as C  # noqa: E402
from tessera_fw.scpm.frame import Key  # noqa: E402
from tessera_fw.scpm.store import MemFS, Store  # noqa: E402


def test_corpus_into_the_engine():
    me = scalar("scpm/corpus.json", "me")
    gc.collect()  # the device's buffers low in the heap, not splitting the free space the cases need
    d = Device(me, bytes(16), store=Store(MemFS()), rand=Seq())
    for k in iter_array("scpm/corpus.json", "keys"):
        key = Key(k["kind"], k["index"], k["gen"], unhex(k["key"]))
        if k["kind"] == C.KIND_SETUP:
            d.setup = d.keys[0] = key
        else:
            d.keys[k["kind"] * 16 + k["index"]] = key
        d.ksn = k["peer"]
    n = answered = 0
    for case in iter_array("scpm/corpus.json", "cases"):
        for key in d.keys:
            if key is not None:
                key.rx.clear()  # each case on its own: fresh windows (no new dicts between parses)
        out = d.receive(unhex(case["frame"]))
        if case["error"]:
            assert out == [], case.get("tag")
        else:
            answered += len(out)
        case = out = None  # free before the next case is parsed (its hex needs up to 4 KB in one piece)
        n += 1
    assert n > 100 and sum(d.errors.values()) > 0


class Lcg:
    def __init__(self, seed):
        self.s = seed

    def __call__(self, n):
        self.s = (self.s * 1103515245 + 12345) & 0x7FFFFFFF
        return self.s % n


def test_mutated_frames_never_crash_the_engine():
    d = Device(DEV, SETUP, store=Store(MemFS()), rand=Seq())
    ksn = enrol(d)
    m = ksn.keys[(4, 0, 1)]
    u = ksn.keys[(1, 0, 1)]
    seeds = [
        ksn.frame(m, ksn.km(C.OP_SP_KEY_INIT, b"\x02\x01" + bytes(16))),
        ksn.frame(m, ksn.km(C.OP_SYNC_REQ, bytes(16)), svc=1),
        ksn.frame(m, ksn.km(C.OP_MKU_ABORT, b"\x02")),
        ksn.frame(u, ksn.km(C.OP_APP_SET, b"\x01\x05"), svc=2),
        ksn.frame(None, ksn.km(C.OP_ENROL_HELLO)),
        ksn.frame(None, ksn.km(C.OP_APP_GET, b"\x01")),
    ]
    r = Lcg(7)
    for i in range(1500):
        b = bytearray(seeds[i % len(seeds)])
        op = r(4)
        if op == 0:
            b[r(len(b))] ^= 1 << r(8)
        elif op == 1:
            b[r(len(b))] = r(256)
        elif op == 2:
            b = b[:r(len(b))]
        else:
            b = b + bytes(r(20))
        if b and r(3) == 0 and len(b) >= 11:  # keep BC consistent half the time
            b[9] = (len(b) - 11) >> 8
            b[10] = (len(b) - 11) & 0xFF
        d.receive(bytes(b))  # must not raise
    # still serving: a fresh valid frame is answered
    p, _ = ksn.open(d.receive(ksn.frame(m, ksn.km(C.OP_SYNC_REQ, bytes(16))))[0])
    assert p[0] == C.OP_SYNC_RESP
