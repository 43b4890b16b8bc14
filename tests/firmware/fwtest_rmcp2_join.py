# The tree-join vectors (tests/vectors/rmcp2/join.json, profile B.11, B.15) reproduced by the
# board's join client inside MicroPython: the RMA's messages byte for byte from the fixed
# randoms, K_MAS and Kg as the host derived them, and the tampered / replayed DMA messages
# refused with the same numbers as the host.
import gc

from tessera_fw.rmcp2 import seal  # noqa: F401 first: compiling it needs the most heap

gc.collect()
from tessera_fw.rmcp2 import join as J  # noqa: E402

gc.collect()
from mpytest import unhex  # noqa: E402
from tessera_fw.rmcp2 import annexe as A  # noqa: E402

gc.collect()
from vecstream import iter_array  # noqa: E402

_STEPS = {"probe": 0, "pass1": 1, "pass3": 2}


class Script:
    def __init__(self, *values):
        self.values = list(values)

    def __call__(self, n):
        v = self.values.pop(0)
        assert len(v) == n
        return v


def _join(t, on_kg=None):
    return J.Join(unhex(t["session_id"]), unhex(t["maid_client"]), unhex(t["w"]), t["enc"], t["auth"],
                  Script(unhex(t["nonce"]), unhex(t["xa"]), unhex(t["rc"])), on_kg)


def test_transcripts_reproduced_byte_for_byte():
    n = 0
    for t in iter_array("rmcp2/join.json", "transcripts"):
        if t["kind"] != "rma":
            continue  # the CMA side runs on hosts only
        got = []
        j = _join(t, lambda g, k: got.append((g, k)))
        wire = t["wire"]
        out = j.start()
        for i in range(0, len(wire), 2):
            assert wire[i]["from"] == "client"
            assert bytes(out) == unhex(wire[i]["bytes"]), (t["name"], i)
            out = j.receive(unhex(wire[i + 1]["bytes"]))
        assert out is None and J.STATE_NAMES[j.state] == "joined", (t["name"], j.errors)
        assert j.kmas == unhex(t["kmas"]) and got == [(t["kg_gen"], unhex(t["kg"]))]
        assert j.status == tuple(t["status"]) and not j.errors
        # the formulas one by one (B.11)
        sid, rc, rs = unhex(t["session_id"]), unhex(t["rc"]), unhex(t["rs"])
        idc, ids, w = unhex(t["idc"]), unhex(t["ids"]), unhex(t["w"])
        assert A.k1(w, sid, idc, rc) == unhex(t["k1"]) and A.k2(w, sid, idc, rc, ids, rs) == unhex(t["k2"])
        e1 = unhex(t["e1"])
        from tessera_fw.crypto import dh

        assert A.crypt(t["enc"], unhex(t["k1"]), e1, True) == dh.DH(unhex(t["xa"])).public
        m = A.master(w, unhex(t["z"]), sid, idc, rc, e1, ids, rs, unhex(t["e2"]))
        assert m == unhex(t["m"])
        n += 1
        gc.collect()
    assert n == 2


def test_tampered_and_replayed_refused_like_the_host():
    n = 0
    t = None
    for t in iter_array("rmcp2/join.json", "transcripts"):
        break
    for c in iter_array("rmcp2/join.json", "rma_tamper"):
        j = _join(t)
        j.start()
        for k in range(_STEPS[c["state"]]):
            j.receive(unhex(t["wire"][1 + 2 * k]["bytes"]))
        assert J.STATE_NAMES[j.state] == c["state"]
        assert j.receive(unhex(c["bytes"])) is None
        want = {c["error"]: 1} if c["error"] else {}
        assert j.errors == want, (c["name"], j.errors)
        assert j.fail == c["refused"], (c["name"], j.fail)
        assert j.kg is None and j.kmas is None
        n += 1
        gc.collect()
    assert n >= 20


def test_precompute_moves_the_key_pair_off_the_critical_path():
    t = None
    for t in iter_array("rmcp2/join.json", "transcripts"):
        break
    j = J.Join(unhex(t["session_id"]), unhex(t["maid_client"]), unhex(t["w"]), t["enc"], t["auth"],
               Script(unhex(t["xa"]), unhex(t["nonce"]), unhex(t["rc"])))  # the pair is drawn first
    assert j.precompute() and not j.precompute()  # one pair, kept until the join uses it
    j.start()
    out = j.receive(unhex(t["wire"][1]["bytes"]))
    assert bytes(out) == unhex(t["wire"][2]["bytes"])  # the same pass 1 as computed on demand
