"""Vectors of profile B.16 (tests/vectors/rmcp2/keys_deliver.json, tools/gen_rmcp2_keys_vectors.py):
every KEYDELIVER form reproduced byte for byte by the host envelope, opened to the key it
carries; the hostile corpus gives the same error numbers in the board key engine (here under
CPython via mpshim; tests/firmware/fwtest_rmcp2_keys.py runs it inside micropython)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tessera import mpshim
from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P

from .test_groupkey import Ring

mpshim.install()
from tessera_fw.rmcp2 import keys as K  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
VEC = json.loads((ROOT / "tests" / "vectors" / "rmcp2" / "keys_deliver.json").read_text())
SIDB = bytes.fromhex(VEC["session_id"])
DMA = bytes.fromhex(VEC["dma_maid"])


def test_generator_is_deterministic():
    spec = importlib.util.spec_from_file_location("genk", ROOT / "tools" / "gen_rmcp2_keys_vectors.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert json.loads(json.dumps(gen.build())) == VEC


def test_every_form_in_both_suites():
    assert {(c["form"], c["suite"]) for c in VEC["cases"]} == {
        (f, s) for f in ("kg-kmas", "kg-kg", "kc-ks", "kc-kg") for s in ("cbc-sha1", "ctr-md5")}


def test_host_envelope_reproduces_and_opens_each_case():
    for c in VEC["cases"]:
        key = P.ProtKey(P.KeyRef(c["key_ref"]), bytes.fromhex(c["key"]), c["gen"])
        suite = P.Suite(C.EnDecId(c["enc"]), C.AuthId(c["auth"]))
        plain = bytes.fromhex(c["plain"])
        assert P.seal(plain, key, suite, c["seq"], bytes.fromhex(c["iv"])).hex() == c["sealed"], c["name"]
        msg = P.unseal_decode(bytes.fromhex(c["sealed"]), suite, lambda m, s: key, lambda m, k: P.ReplayWindow())
        ki = msg.get(C.KeyInfo)
        kd = C.KeyData.decode(ki.key_data)
        assert msg.type == C.MsgType.KEYDELIVER and ki.key_type == c["key_type"]
        assert (kd.gen, kd.key.hex(), kd.mode) == (c["delivered_gen"], c["delivered_key"], C.KeyMode.FRESH)
        assert msg.nt == (C.NodeType.DMA if ki.key_type == C.KeyType.KG else C.NodeType.SMA)  # 11.2.9.1 b
        # K_MAS deliveries name the RMA, Kg/Ks-sealed ones the DMA (B.16)
        assert msg.maid == (bytes.fromhex(c["rma"]["maid"]) if c["form"] == "kg-kmas" else DMA)
    kc = {c["form"]: c for c in VEC["cases"] if c["suite"] == "cbc-sha1"}
    assert kc["kc-ks"]["plain"] == kc["kc-kg"]["plain"]  # the DMA re-seals the SMA's message unchanged


def _board(c: dict) -> K.Keys:
    r = c["rma"]
    b = K.Keys(SIDB, bytes.fromhex(r["maid"]), Ring(), enc=c["enc"], auth=c["auth"])
    b.joined(DMA, bytes.fromhex(r["kmas"]), r["kg_gen"], bytes.fromhex(r["kg"]))
    return b


def test_board_engine_installs_each_rma_case_once():
    for c in VEC["cases"]:
        if c["rma"] is None:
            continue
        b = _board(c)
        assert b.receive(bytes.fromhex(c["sealed"]), 0) == c["key_type"], c["name"]
        if c["key_type"] == 2:
            assert b.kg_gen() == c["delivered_gen"] and b.kg._raw.hex() == c["delivered_key"]
            assert (b.kg_prev is None) == (c["form"] == "kg-kmas")  # no grace after a unicast re-key
        else:
            assert b.ring.keys == {c["delivered_gen"]: bytes.fromhex(c["delivered_key"])}
        assert b.receive(bytes.fromhex(c["sealed"]), 0) == 0 and b.errors[17] == 1  # replayed


def test_corpus_same_error_numbers_in_the_board_engine():
    cases = {c["name"]: c for c in VEC["cases"]}
    for v in VEC["corpus"]:
        b = _board(cases[v["case"]])
        got = b.receive(bytes.fromhex(v["data"]), 0)
        errs = [i for i, n in enumerate(b.errors) if n]
        want = v["error"]
        if want == 0:
            assert got and not errs, v["tag"]
        else:
            assert got == 0 and errs == [max(want, 0)], (v["case"], v["tag"], errs, want)
