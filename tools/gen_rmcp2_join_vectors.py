#!/usr/bin/env python3
"""Write tests/vectors/rmcp2/join.json: full tree-join / Annex E transcripts with fixed
randoms (docs/rmcp2-profile.md B.11, B.15), and a corpus of tampered and replayed passes.

    python tools/gen_rmcp2_join_vectors.py

"transcripts": an RMA joining a DMA (one per GK_EN_DEC_ID: CBC and CTR) and a CMA joining a
    PMA under Ks: every random drawn (in the order the engines draw them), every derived
    value (k1, k2, E1, E2, Z, M, Vs, Vc, K_MAS) and every message on the wire. The derived
    values are computed here a second time from the profile's formulas with hashlib/hmac,
    independently of tessera.rmcp2.annexe, and the two must agree.
"rma_tamper": messages from a DMA to the RMA of transcript 0, each with the state the RMA
    is in and the outcome the board must reach ("error": B.12 number, or 100 + Fail
    number; "refused": Fail number when the RMA stops).
Deterministic: rerunning rewrites identical bytes.
"""
from __future__ import annotations

import hashlib
import hmac as _hmac
import json
from pathlib import Path

from tessera.crypto import aes
from tessera.crypto.dh import P as DH_P
from tessera.rmcp2 import annexe as E
from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2 import tree as T

OUT = Path(__file__).resolve().parents[1] / "tests" / "vectors" / "rmcp2" / "join.json"
SID = 0x0123456789ABCDEF
MAID_RMA = C.make_maid("127.0.0.1", 40001, 0x0A01)
MAID_DMA = C.make_maid("127.0.0.1", 26032, 0x0D01)
MAID_CMA = C.make_maid("127.0.0.1", 26032, 0x0D02)
P_GROUP = DH_P
N, M = C.NodeType, C.MsgType


def fixed(label: str, n: int) -> bytes:
    return hashlib.sha256(b"tessera-rmcp2-join-vector:" + label.encode()).digest()[:n]


class Script:
    """rand(n) handing out the given values in order (and checking their sizes)."""

    def __init__(self, *values: bytes) -> None:
        self.values = list(values)

    def __call__(self, n: int) -> bytes:
        v = self.values.pop(0)
        assert len(v) == n, (len(v), n)
        return v


def h256(key: bytes, *parts: bytes) -> bytes:
    return _hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def independent(w: bytes, enc: int, idc: bytes, rc: bytes, xa: bytes, ids: bytes, rs: bytes, xb: bytes) -> dict:
    """The B.11 formulas again, without tessera.rmcp2.annexe."""
    sid = SID.to_bytes(8, "big")
    a, b = int.from_bytes(xa, "big"), int.from_bytes(xb, "big")
    ga, gb = pow(2, a, P_GROUP).to_bytes(256, "big"), pow(2, b, P_GROUP).to_bytes(256, "big")
    k1 = h256(w, b"RMCP2-ANNEXE-K1", sid, idc, rc)[:16]
    k2 = h256(w, b"RMCP2-ANNEXE-K2", sid, idc, rc, ids, rs)[:16]
    crypt = aes.cbc_encrypt if enc == 1 else aes.ctr_crypt
    e1, e2 = crypt(k1, bytes(16), ga), crypt(k2, bytes(16), gb)
    z = pow(2, a * b, P_GROUP).to_bytes(256, "big")
    m = h256(w, b"RMCP2-ANNEXE-M", z, hashlib.sha256(sid + idc + rc + e1 + ids + rs + e2).digest())
    return {"k1": k1, "k2": k2, "e1": e1, "e2": e2, "z": z, "m": m,
            "vs": h256(m, b"RMCP2-ANNEXE-VS")[:16], "vc": h256(m, b"RMCP2-ANNEXE-VC")[:16],
            "kmas": h256(m, b"RMCP2-ANNEXE-KMAS")[:16]}


def run(cli: T.JoinClient, eng: T.JoinEngine, conn="c") -> list[tuple[str, bytes]]:
    wire = [("client", cli.start())]
    i = 0
    while i < len(wire):
        side, data = wire[i]
        i += 1
        if side == "client":
            wire += [("server", r) for r in eng.receive(conn, data, 1.0)]
        else:
            wire += [("client", r) for r in cli.receive(data)]
    return wire


def rma_transcript(enc: int) -> tuple[dict, list]:
    tag = f"rma-{enc}"
    w = fixed(tag + ":hashed_ktls", 16)
    nonce, xa, rc = fixed(tag + ":nonce", 8), fixed(tag + ":xa", 32), fixed(tag + ":rc", 16)
    rs, xb, iv = fixed(tag + ":rs", 16), fixed(tag + ":xb", 32), fixed(tag + ":iv", 16)
    kg = (7, fixed(tag + ":kg", 16))
    suite = P.Suite(C.EnDecId(enc), C.AuthId.HMAC_SHA1 if enc == 1 else C.AuthId.HMAC_MD5)
    idc = P.hashed_maid(SID, MAID_RMA)
    acl = {idc: w}
    eng = T.JoinEngine(SID, MAID_DMA, acl_lookup=acl.get, kg_source=lambda: kg, suite=suite,
                       rand=Script(rs, xb, iv), status=lambda: (0, 3, 7))
    cli = T.JoinClient(SID, MAID_RMA, N.RMA, suite, Script(nonce, xa, rc), hashed_ktls=w)
    wire = run(cli, eng)
    assert cli.state == "joined" and [s for s, _ in wire] == ["client", "server"] * 3, cli.state
    ids = P.hashed_maid(SID, MAID_DMA)
    ind = independent(w, enc, idc, rc, xa, ids, rs, xb)
    assert ind["kmas"] == cli.kmas == eng.members()[MAID_RMA].kmas
    assert ind["e1"] in wire[2][1] and ind["e2"] in wire[3][1] and ind["vs"] in wire[3][1] and ind["vc"] in wire[4][1]
    t = {"name": tag, "kind": "rma", "enc": enc, "auth": int(suite.auth), "session_id": f"{SID:016x}",
         "maid_client": MAID_RMA.hex(), "maid_server": MAID_DMA.hex(), "w": w.hex(),
         "idc": idc.hex(), "ids": ids.hex(), "nonce": nonce.hex(), "xa": xa.hex(), "rc": rc.hex(),
         "rs": rs.hex(), "xb": xb.hex(), "iv": iv.hex(), "kg_gen": kg[0], "kg": kg[1].hex(),
         "status": [0, 3, 7],
         **{k: v.hex() for k, v in ind.items()},
         "wire": [{"from": s, "bytes": d.hex()} for s, d in wire]}
    return t, wire


def cma_transcript() -> dict:
    tag = "cma"
    ks = P.ProtKey(P.KeyRef.KS, fixed(tag + ":ks", 16), 5)
    suite = P.Suite(C.EnDecId.AES_CBC_128, C.AuthId.HMAC_SHA1)
    xa, rc, ivc = fixed(tag + ":xa", 32), fixed(tag + ":rc", 16), [fixed(tag + f":ivc{i}", 16) for i in range(3)]
    rs, xb, ivs = fixed(tag + ":rs", 16), fixed(tag + ":xb", 32), [fixed(tag + f":ivs{i}", 16) for i in range(3)]
    eng = T.JoinEngine(SID, MAID_DMA, acl_lookup=lambda h: None, kg_source=lambda: (1, bytes(16)), suite=suite,
                       rand=Script(ivs[0], rs, xb, ivs[1], ivs[2]), ks_lookup=lambda g: ks if g == 5 else None,
                       ks_current=lambda: ks, status=lambda: (1, 0, 0))
    cli = T.JoinClient(SID, MAID_CMA, N.DMA, suite, Script(ivc[0], xa, rc, ivc[1], ivc[2]), ks=ks)
    wire = run(cli, eng)
    assert cli.state == "joined" and len(wire) == 6, cli.state
    w = E.rm_secret(ks._raw, SID)
    ind = independent(w, 1, P.hashed_maid(SID, MAID_CMA), rc, xa, P.hashed_maid(SID, MAID_DMA), rs, xb)
    assert ind["kmas"] == cli.kmas == eng.children()[MAID_CMA].kmas
    return {"name": tag, "kind": "cma", "enc": 1, "auth": 1, "session_id": f"{SID:016x}",
            "maid_client": MAID_CMA.hex(), "maid_server": MAID_DMA.hex(), "ks": ks._raw.hex(), "ks_gen": 5,
            "w": w.hex(), "xa": xa.hex(), "rc": rc.hex(), "rs": rs.hex(), "xb": xb.hex(),
            "iv_client": [v.hex() for v in ivc], "iv_server": [v.hex() for v in ivs],
            **{k: v.hex() for k, v in ind.items()},
            "wire": [{"from": s, "bytes": d.hex()} for s, d in wire]}


def _flip(b: bytes, i: int) -> bytes:
    x = bytearray(b)
    x[i] ^= 0x01
    return bytes(x)


def _host_outcome(t: dict, state: str, data: bytes) -> tuple[int, int]:
    cli = T.JoinClient(SID, MAID_RMA, N.RMA, P.Suite(C.EnDecId(t["enc"]), C.AuthId(t["auth"])),
                       Script(bytes.fromhex(t["nonce"]), bytes.fromhex(t["xa"]), bytes.fromhex(t["rc"])),
                       hashed_ktls=bytes.fromhex(t["w"]))
    cli.start()
    for k in range({"probe": 0, "pass1": 1, "pass3": 2}[state]):
        cli.receive(bytes.fromhex(t["wire"][1 + 2 * k]["bytes"]))
    try:
        cli.receive(data)
        err = 0
    except C.Rmcp2Error as e:
        err = int(e.code)
    except E.AnnexeError as e:
        err = 100 + e.reason
    return err, int(cli.fail or 0)


def rma_tamper(t: dict, wire: list) -> list[dict]:
    """DMA -> RMA messages the board must refuse, each at the RMA state where it arrives."""
    probeans, pass2, final = wire[1][1], wire[3][1], wire[5][1]
    assert pass2[24] == 0x81 and pass2[27] == 2  # AUTH_ANS(20..23), MA_AUTH: type, Length(2), Pass
    ma = 28  # IDs(16) rs(16) E2(256) Vs(16) from here
    out = []

    def add(name, state, data, error=0, refused=0):
        # the host client checks a DH value fully (y^q = 1), the board only its range
        # (profile B.11): a pass 2 under a wrong k2 can be PUBLIC on the host, VERIFY on a board
        host = _host_outcome(t, state, data)
        assert host[0] == error and host[1] in (refused, E.Fail.PUBLIC if refused == E.Fail.VERIFY else refused), \
            (name, host)
        out.append({"name": name, "state": state, "bytes": data.hex(), "error": error, "refused": refused,
                    "host_refused": int(host[1])})

    # pass 2 (state pass1): tampered fields
    add("pass2 IDs flipped", "pass1", _flip(pass2, ma + 1), refused=E.Fail.VERIFY)
    add("pass2 rs flipped", "pass1", _flip(pass2, ma + 20), refused=E.Fail.VERIFY)
    add("pass2 Vs flipped", "pass1", _flip(pass2, ma + 300), refused=E.Fail.VERIFY)
    # E2 flipped: decrypts to another value (in range here) and Vs fails
    add("pass2 E2 flipped", "pass1", _flip(pass2, ma + 100), refused=E.Fail.VERIFY)
    # a server without W: E2 of g^B under a wrong k2 and a Vs it cannot make
    for i in range(64):  # a wrong W decrypts g^A to a value outside the subgroup half the time
        wrong = T.JoinEngine(SID, MAID_DMA, acl_lookup=lambda h: fixed(f"not-w-{i}", 16),
                             kg_source=lambda: (1, bytes(16)), suite=P.Suite(C.EnDecId(t["enc"]), C.AuthId(t["auth"])),
                             rand=Script(bytes.fromhex(t["rs"]), bytes.fromhex(t["xb"])))
        alt = wrong.receive("c", wire[2][1], 1.0)[0]
        if C.decode(alt).get(C.AuthAns).auth_result == C.SecReturn.RETRANSMISSION_REQ:
            break
    assert alt != pass2
    add("pass2 from a DMA without the RMA's HASHED_KTLS", "pass1", alt, refused=E.Fail.VERIFY)
    # E2 that decrypts to p-1 (a degenerate public value)
    k2 = bytes.fromhex(t["k2"])
    bad = (P_GROUP - 1).to_bytes(256, "big")
    e2 = aes.cbc_encrypt(k2, bytes(16), bad) if t["enc"] == 1 else aes.ctr_crypt(k2, bytes(16), bad)
    add("pass2 E2 decrypting to p-1", "pass1", pass2[:ma + 32] + e2 + pass2[ma + 288:], refused=E.Fail.PUBLIC)
    add("pass2 truncated by one byte", "pass1", pass2[:2] + (len(pass2) - 1).to_bytes(2, "big") + pass2[4:-1],
        error=C.ErrorCode.SUBCONTROL)
    add("pass2 Length field wrong", "pass1", pass2[:3] + bytes((pass2[3] ^ 1,)) + pass2[4:], error=C.ErrorCode.LENGTH)
    add("pass2 for another MAID", "pass1", pass2[:12] + MAID_DMA + pass2[20:], error=100 + E.Fail.LAYOUT)
    add("pass2 with Auth_result OK", "pass1", pass2[:20] + bytes((0x24, 4, 1, 0)) + pass2[24:],
        error=100 + E.Fail.LAYOUT)
    try:  # read as a plain message, as a board in state pass1 does: the decoder's error (B.12)
        C.decode(final)
        early = 100 + E.Fail.LAYOUT
    except C.Rmcp2Error as e:
        early = e.code
    add("the final RELANS before pass 3", "pass1", final, error=early)
    # final RELANS (state pass3): tampered, wrong key, clear
    add("final Tag flipped", "pass3", _flip(final, len(final) - 1), error=C.ErrorCode.MAC)
    add("final ciphertext flipped", "pass3", _flip(final, 50), error=C.ErrorCode.MAC)
    add("final Seq changed (Tag covers it)", "pass3", _flip(final, 26), error=C.ErrorCode.MAC)
    add("final Seq 0", "pass3", _flip(final, 27), error=C.ErrorCode.REPLAY)
    other = P.seal(P.unseal(final, P.Suite(C.EnDecId(t["enc"]), C.AuthId(t["auth"])),
                            lambda m, s: P.ProtKey(P.KeyRef.KMAS, bytes.fromhex(t["kmas"])),
                            lambda m, k: P.ReplayWindow()),
                   P.ProtKey(P.KeyRef.KMAS, fixed("wrong-kmas", 16)), P.Suite(C.EnDecId(t["enc"]), C.AuthId(t["auth"])),
                   1, bytes(16))
    add("final under a wrong K_MAS", "pass3", other, error=C.ErrorCode.MAC)
    km = C.KeyMaterial(C.KeyType.KG, C.KeyData(1, C.KeyMode.FRESH, 0, bytes(16)).encode())
    clear = C.Message(M.RELANS, N.DMA, SID, MAID_RMA, (C.AuthAns(C.SecReturn.OK, km),)).encode()
    add("final in clear (no K_MAS)", "pass3", clear, error=100 + E.Fail.LAYOUT)
    add("PPROBANS replayed after pass 1", "pass1", probeans, error=100 + E.Fail.LAYOUT)
    add("pass2 replayed after pass 3", "pass3", pass2, error=100 + E.Fail.LAYOUT)
    refusal = C.Message(M.RELANS, N.DMA, SID, MAID_RMA, (C.AuthAns(C.SecReturn.ERROR),)).encode()
    add("RELANS Auth_result ERROR", "pass1", refusal, refused=E.Fail.REFUSED)
    ppa = C.Message(M.PPROBANS, N.DMA, SID, MAID_RMA, (C.ResultCtl(C.Result.NOT_IN_ACL),)).encode()
    add("PPROBANS NOT_IN_ACL", "probe", ppa, refused=E.Fail.NOT_IN_ACL)
    return out


def main() -> None:
    t1, w1 = rma_transcript(1)
    t2, _ = rma_transcript(2)
    doc = {"about": "docs/rmcp2-profile.md B.11, B.15; tools/gen_rmcp2_join_vectors.py",
           "transcripts": [t1, t2, cma_transcript()], "rma_tamper": rma_tamper(t1, w1)}
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT} ({len(doc['transcripts'])} transcripts, {len(doc['rma_tamper'])} tamper cases)")


if __name__ == "__main__":
    main()
