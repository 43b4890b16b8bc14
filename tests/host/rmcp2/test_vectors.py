"""The host codec reproduces tests/vectors/rmcp2/*.json byte for byte (docs/rmcp2-profile.md)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P

VEC = Path(__file__).resolve().parents[2] / "vectors" / "rmcp2"


def load(name: str) -> dict:
    return json.loads((VEC / f"{name}.json").read_text())


# field name -> how to rebuild it from the description (enum by name, bytes from hex)
_ENUMS = {"gp_attribute": C.GpAttribute, "gk_mecha": C.GkMecha, "con_en_dec_id": C.EnDecId, "gk_name": C.GkName,
          "auth_attribute": C.AuthAttribute, "auth_name": C.AuthName, "auth_result": C.SecReturn,
          "key_type": C.KeyType}
_VALUE_ENUM = {"GkMechCapab": C.GkName, "EnDecCapab": C.EnDecId, "AuthAlgCapab": C.AuthId, "ConEnDecAlg": C.EnDecId,
               "GkEnDecAlg": C.EnDecId, "AuthAlg": C.AuthId, "GkMechDeliver": C.GkName, "AuthMechDeliver": C.AuthName,
               "ConEnDecDeliver": C.EnDecId, "GkEnDecDeliver": C.EnDecId, "AuthAlgDeliver": C.AuthId,
               "SecReturnCtl": C.SecReturn, "ResultCtl": C.Result, "DeliverResultCtl": C.DeliverResult}


def _field(cls: str, name: str, v):
    if v is None:
        return None
    if name == "key":
        return C.KeyMaterial(C.KeyType[v["key_type"]], bytes.fromhex(v["key_data"]))
    if name == "ma_auth":
        return C.MaAuth(v["pass_no"], bytes.fromhex(v["data"]))
    if name == "value":
        return _VALUE_ENUM[cls][v] if cls in _VALUE_ENUM else bytes.fromhex(v)
    if name == "entries":
        return tuple(bytes.fromhex(e) for e in v)
    if name in _ENUMS:
        return _ENUMS[name][v]
    if isinstance(v, str):
        return bytes.fromhex(v)
    return v


def build(desc: dict) -> C.Message:
    controls = []
    for c in desc["controls"]:
        cls = c["control"]
        controls.append(getattr(C, cls)(**{k: _field(cls, k, v) for k, v in c.items() if k != "control"}))
    return C.Message(C.MsgType[desc["type"]], C.NodeType[desc["nt"]], int(desc["session_id"], 16),
                     bytes.fromhex(desc["maid"]), tuple(controls))


MESSAGES = load("messages")["cases"]
CONTENT_ADDR = load("messages")["content_addr_cases"]


@pytest.mark.parametrize("case", MESSAGES + CONTENT_ADDR, ids=[c["name"] for c in MESSAGES + CONTENT_ADDR])
def test_message_vectors(case):
    raw = bytes.fromhex(case["msg"])
    want = build(case["desc"])
    got = C.decode(raw)
    assert got == want
    assert got.skipped == case["skipped"]
    assert (int(got.type), int(got.nt)) == (case["type"], case["nt"])
    assert want.encode().hex() == case.get("canonical", case["msg"])


def test_vectors_cover_every_message_and_control():
    types = {c["type"] for c in MESSAGES}
    codes = {s[0] for c in MESSAGES + CONTENT_ADDR for s in c["spans"]}
    assert types == {int(t) for t in C.MsgType}
    assert codes == {int(t) for t in C.CtlType}
    assert any(c["skipped"] for c in MESSAGES)


def test_content_addr_vectors_hold_the_contract_example():
    hb = next(c for c in CONTENT_ADDR if c["name"] == "hb-rma-content-addr")
    assert hb["msg"].endswith("c80800009c409c41") and hb["spans"] == [[0xC8, "c80800009c409c41"]]
    assert {(c["type"], c["nt"]) for c in CONTENT_ADDR} == {(int(C.MsgType.HB), 3), (int(C.MsgType.PPROBREQ), 5)}


def test_corpus_errors():
    cases = load("corpus")["cases"]
    assert len(cases) > 500
    seen = set()
    for case in cases:
        try:
            C.decode(bytes.fromhex(case["msg"]))
            got = 0
        except C.Rmcp2Error as e:
            got = int(e.code)
        assert got == case["error"], case["tag"]
        seen.add(got)
    # every decoder error number (1-13) is exercised, and valid messages are in it too
    assert seen >= set(range(0, 14)) - {3}


def test_envelope_vectors():
    v = load("envelope")
    for c in v["cases"]:
        key = P.ProtKey(P.KeyRef(c["key_ref"]), bytes.fromhex(c["key"]), c["gen"])
        suite = P.Suite(C.EnDecId(c["enc"]), C.AuthId(c["auth"]))
        assert key.k_enc(suite.enc).hex() == c["k_enc"] and key.k_mac(suite.auth).hex() == c["k_mac"]
        sealed = P.seal(bytes.fromhex(c["plain"]), key, suite, c["seq"], bytes.fromhex(c["iv"]))
        assert sealed.hex() == c["sealed"], c["name"]
        w = P.ReplayWindow()
        assert P.unseal(sealed, suite, lambda m, s: key, lambda m, k: w).hex() == c["plain"]
        assert w.high == c["seq"]
    tk = P.ProtKey(P.KeyRef.KTLS, bytes.fromhex(v["key_tamper"]))
    for c in v["tamper"]:
        w = P.ReplayWindow()
        if c["high"]:
            w.commit(c["high"])
        try:
            P.unseal(bytes.fromhex(c["sealed"]), P.BOOTSTRAP, lambda m, s: tk if s.ref == tk.ref else None,
                     lambda m, k: w)
            got = 0
        except C.Rmcp2Error as e:
            got = int(e.code)
        assert got == c["error"], c["tag"]
    assert {c["error"] for c in v["tamper"]} >= {0, 1, 2, 6, 14, 15, 16, 17, 18}


def test_key_vectors():
    v = load("keys")
    sid = int(v["session_id"], 16)
    maid = bytes.fromhex(v["maid"])
    k = P.ktls(bytes.fromhex(v["seed"]), sid, maid, bytes.fromhex(v["nonce_c"]), bytes.fromhex(v["cert"]))
    assert k.hex() == v["k_tls"]
    assert P.hashed_ktls(k, sid).hex() == v["hashed_ktls"]
    assert P.hashed_maid(sid, maid).hex() == v["hashed_maid"]
    ks = [bytes.fromhex(x) for x in v["ks"]]
    for g in range(1, len(ks)):
        assert P.ks_next(ks[g - 1], sid, g + 1) == ks[g]
    for d in v["key_data"]:
        kd = C.KeyData(d["gen"], C.KeyMode(d["mode"]), d["period"], bytes.fromhex(d["key"]))
        assert kd.encode().hex() == d["data"] and C.KeyData.decode(bytes.fromhex(d["data"])) == kd
    assert P.probe_proof(P.hashed_ktls(k, sid), sid, bytes.fromhex(v["probe_nonce"])).hex() == v["probe_proof"]


def test_generator_is_deterministic():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen", VEC.parents[2] / "tools" / "gen_rmcp2_vectors.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for name in ("messages", "keys", "envelope"):
        assert json.loads(json.dumps(gen.FILES[name]())) == load(name), name
