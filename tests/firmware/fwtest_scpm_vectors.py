# The host engineer's SCPM vectors (tests/vectors/scpm/, written by tools/gen_scpm_vectors.py
# from the host codec) reproduced byte for byte by the firmware codec inside MicroPython.
from mpytest import unhex, vectors

from fwtest_scpm_util import iter_array, scalar

from tessera_fw.scpm.const import SCPMError
from tessera_fw.scpm.frame import Codec, Key, encode
from tessera_fw.scpm.snf import RxWindow


class Ring:
    """Keys by (peer, kind, index, gen); windows per key and peer (fresh unless kept)."""

    def __init__(self):
        self.keys = {}

    def add(self, peer, kind, index, gen, raw):
        k = Key(kind, index, gen, raw)
        self.keys[(peer, kind, index, gen)] = k
        return k

    def lookup(self, sa, kind, index, gen):
        return self.keys.get((sa, kind, index, gen))

    def window(self, sa, key):
        w = key.rx.get(sa)
        if w is None:
            w = key.rx[sa] = RxWindow()
        return w

    def fresh(self):
        for k in self.keys.values():
            k.rx = {}


def test_frames_encode_and_decode_byte_for_byte():
    n = 0
    for c in iter_array("scpm/frames.json", "cases"):
        k = Key(c["kind"], c["index"], c["gen"], unhex(c["key"]))
        assert k.k_enc == unhex(c["k_enc"]), c["name"]
        assert k.mac(b"") is not None
        assert k.shd(c["service"]) == unhex(c["shd"]), c["name"]
        if c["iv"]:
            f = unhex(c["frame"])
            assert k.ecb.encrypt(f[11:19] + f[1:9]) == unhex(c["iv"]), c["name"]
        p = unhex(c["padata"])
        f = encode(c["sa"], c["da"], k, c["snf"], p, c["service"])
        assert bytes(f) == unhex(c["frame"]), c["name"]
        r = Ring()
        r.keys[(c["sa"], c["kind"], c["index"], c["gen"])] = k
        d = Codec(c["da"]).decode(unhex(c["frame"]), r)
        assert bytes(d.padata()) == p, c["name"]
        assert d.snf == c["snf"] and d.service == c["service"] and d.authority == c["kind"]
        n += 1
    for c in iter_array("scpm/frames.json", "plain"):
        assert bytes(encode(c["sa"], c["da"], None, 0, unhex(c["padata"]))) == unhex(c["frame"]), c["name"]
        d = Codec(c["da"]).decode(unhex(c["frame"]), Ring())
        assert bytes(d.padata()) == unhex(c["padata"])
    assert n >= 120


def test_k_mac_derivation():
    from tessera_fw.scpm.frame import hmac_sha256

    for i, c in enumerate(iter_array("scpm/frames.json", "cases")):
        if i > 6:
            break
        assert hmac_sha256(unhex(c["key"]), b"SCPM-MAC") == unhex(c["k_mac"])


def test_snf_sequences():
    v = vectors("scpm/snf.json")
    assert v["window"] == 32
    for s in v["sequences"]:
        w = RxWindow(s.get("reserved", 0))
        for i, st in enumerate(s["steps"]):
            try:
                w.check(st["snf"])
                w.commit(st["snf"])
                got = 0
            except SCPMError as e:
                got = e.code
            assert got == st["result"], (s["name"], i, got)
            assert w.high == st["high"], (s["name"], i)


def test_corpus_replay_no_crash_same_errors():
    # every case through the decoder with a fresh window: the same error number (first
    # failing check of the pinned order) or the same PADATA, and only SCPMError ever
    import os

    names = [n for n in os.listdir(_root() + "/tests/vectors/scpm") if n.startswith("corpus") and n.endswith(".json")]
    assert names
    total = 0
    for name in names:
        r = Ring()
        for k in iter_array("scpm/" + name, "keys"):
            r.add(k["peer"], k["kind"], k["index"], k["gen"], unhex(k["key"]))
        c = Codec(scalar("scpm/" + name, "me"))
        for i, case in enumerate(iter_array("scpm/" + name, "cases")):
            r.fresh()
            try:
                d = c.decode(unhex(case["frame"]), r)
                got = 0
            except SCPMError as e:
                got = e.code
            assert got == case["error"], (name, i, case.get("tag"), got, case["error"])
            if not got:
                assert bytes(d.padata()) == unhex(case["padata"]), (name, i)
            total += 1
    assert total > 100


def _root():
    import mpytest

    return mpytest.ROOT
