# The board RMA's content sink (sink.py) and its candidate parent DMAs (rma_cfg "dmas",
# board_tree re-graft), inside MicroPython.
import gc
import os

from tessera_fw.rmcp2 import board_tree as BT

gc.collect()
from tessera_fw.rmcp2.sink import FileSink  # noqa: E402


def _tmp(name):
    d = "/tmp/fwtest_rmcp2_board_%s_%s" % (name, "".join("%02x" % b for b in os.urandom(4)))
    os.mkdir(d)
    return d


def _read(p):
    with open(p, "rb") as f:
        return f.read()


def _rmtree(d):
    for n in os.listdir(d):
        p = d + "/" + n
        try:
            _rmtree(p)
        except OSError:
            os.remove(p)
    os.rmdir(d)


def test_file_sink_keeps_only_verified_objects():
    base = _tmp("sink")
    try:
        d = base + "/rx"
        s = FileSink(d)
        s.stream(memoryview(b"abc"))
        s.stream(memoryview(b"defg"))
        s.begin(1, 6)
        s.data(memoryview(b"hel"))
        assert sorted(os.listdir(d)) == ["obj-1.part", "stream.bin"]
        s.data(memoryview(b"lo!"))
        assert s.end(1)
        assert _read(d + "/obj-1.bin") == b"hello!"
        s.begin(2, 3)
        s.data(memoryview(b"xyz"))
        s.abort()  # digest wrong / link lost: the part is deleted, no .bin
        s.begin(3, 2)
        s.data(memoryview(b"12"))
        s.begin(4, 1)  # a BEGIN while object 3 is open: 3 is dropped
        s.data(memoryview(b"Z"))
        assert s.end(4) and not s.end(4)  # nothing open any more
        s.stream(memoryview(b"h"))
        s.close()
        assert sorted(os.listdir(d)) == ["obj-1.bin", "obj-4.bin", "stream.bin"]
        assert _read(d + "/stream.bin") == b"abcdefgh" and _read(d + "/obj-4.bin") == b"Z"
        s2 = FileSink(d)  # the directory kept: appended to
        s2.stream(memoryview(b"++"))
        s2.close()
        assert _read(d + "/stream.bin") == b"abcdefgh++"
    finally:
        _rmtree(base)


class _Runner:
    def __init__(self, cands, hb_ms=1000):
        self.cfg = {"backoff_ms": (100, 400), "hb_ms": hb_ms}
        self.link = None
        self.waits = []

        class _R:
            enc = 2
            mac = 1

            def hashed_ktls(self):
                return b"w" * 16

        self.rma = _R()

    def jitter(self, w):
        return w

    def pause(self, ms):
        self.waits.append(ms)
        return True


class _Ring:
    def __init__(self):
        self.forgot = 0
        self.cur = self.nxt = None

    def forget(self):
        self.forgot += 1


class _Cx:
    def memory(self):
        return (7, [1], [2], 3)


class _Keys:
    ring = None


class _Tree(BT.Tree):
    def __init__(self):  # no runner, keys or sockets: run()'s loop only
        pass


def _tree(cands, script):
    """A Tree without sockets: join() and control() follow `script`, a list of
    (join ok, control outcome) per attempt; returns the Tree and the candidates tried."""
    t = _Tree()
    t.r = _Runner(cands)
    t.cands = cands
    t.ci = 0
    t.host, t.port, t.dma_maid = cands[0]
    t.hdma = None
    t.cx = _Cx()  # made after a join; let go after each control link, its memory() kept
    t.own_ring = True
    t.kept = None
    t.ring = _Ring()
    t.keys = _Keys()
    t.keys.ring = t.ring
    tried = []
    steps = list(script)

    def join(enc, auth):
        tried.append(t.host)
        ok, t._how = steps.pop(0)
        t.fail = 0 if ok else t._how  # a failed join's outcome is its refusal reason (0: no answer)
        return ok

    t.join = join
    t.control = lambda: t._how
    return t, tried


def test_rotation_over_candidate_dmas():
    c = (("a", 1, b"A" * 8), ("b", 2, b"B" * 8), ("c", 3, b"C" * 8))
    # refused at a, joined b which leaves (LEAVE_NORMAL), c dropped, a (wrapped) expels
    t, tried = _tree(c, [(False, 0), (True, BT.LEFT), (True, BT.DROPPED), (True, BT.EXPELLED)])
    ring = t.ring
    assert t.run() == BT.EXPELLED
    assert tried == ["a", "b", "c", "a"], tried
    # back to the SM: the Kc ring made by the tree client is forgotten and let go, none kept
    assert ring.forgot == 1 and t.ring is None and t.keys.ring is None and t.cx is None and t.kept is None
    assert t.cmem == (7, [1], [2], 3)  # the next join's reception goes on numbering objects
    # the hdma of a candidate is recomputed at its next join (another DMA's MAID)
    assert t.dma_maid == b"A" * 8 and t.hdma is None
    # six failed joins in a row (here all short links or refusals) -> back to the SM, each
    # at the next candidate, the backoff doubling up to its most
    t, tried = _tree(c, [(False, 0), (True, BT.DROPPED), (False, 0), (True, BT.LEFT), (False, 0), (False, 0)])
    assert t.run() == BT.DROPPED
    assert tried == ["a", "b", "c", "a", "b", "c"], tried
    assert t.r.waits == [100, 200, 400, 400, 400], t.r.waits
    # NOT_IN_ACL (annexe reason 2): the DMAs have not fetched the ACL since the admission;
    # the preferred DMA is tried again (3 more times at most), then the next one
    t, tried = _tree(c, [(False, 2), (True, BT.EXPELLED)])
    assert t.run() == BT.EXPELLED and tried == ["a", "a"], tried
    t, tried = _tree(c, [(False, 2), (False, 2), (False, 2), (False, 2), (True, BT.EXPELLED)])
    assert t.run() == BT.EXPELLED and tried == ["a", "a", "a", "a", "b"], tried
    # one candidate (the older "dma" + "dma_maid"): the same DMA again, as before
    one = (("a", 1, b"A" * 8),)
    t, tried = _tree(one, [(True, BT.DROPPED), (True, BT.LEFT), (True, BT.EXPELLED)])
    assert t.run() == BT.EXPELLED and tried == ["a", "a", "a"]
    # a ring the caller gave (Runner(ring=...)) is the caller's: kept
    t, tried = _tree(one, [(True, BT.EXPELLED)])
    t.own_ring = False
    ring = t.ring
    assert t.run() == BT.EXPELLED and t.ring is ring and ring.forgot == 0

