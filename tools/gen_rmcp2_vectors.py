#!/usr/bin/env python3
"""Write the secure RMCP-2 test vectors tests/vectors/rmcp2/*.json (docs/rmcp2-profile.md).

    python tools/gen_rmcp2_vectors.py                    # all files
    python tools/gen_rmcp2_vectors.py messages corpus    # some of them

messages.json: one or more valid messages of every message type with every control, each
    with its bytes, a field-by-field description, the spans of its known controls, and
    (for what an RMA sends) the firmware builder call that must produce the same bytes.
corpus.json:   malformed messages (mutations, truncations, hand-made cases), each with the
    error number the host decoder gives (profile B.12); the firmware must give the same.
envelope.json: protected messages (B.7) under fixed keys, IVs and sequence numbers.
keys.json:     K_TLS and the hashed values (B.5), the Ks hash step and KEY_DATA (B.6).
Everything comes from the host codec and is deterministic: rerunning rewrites identical files.
"""
from __future__ import annotations

import hashlib
import json
import random
import sys
from dataclasses import fields
from enum import IntEnum
from pathlib import Path

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P

OUT = Path(__file__).resolve().parents[1] / "tests" / "vectors" / "rmcp2"
SID = 0x0123456789ABCDEF
MAID_RMA = C.make_maid("127.0.0.1", 40001, 0x0A01)
MAID_DMA = C.make_maid("127.0.0.1", 26032, 0x0D01)
MAID_SMA = C.make_maid("127.0.0.1", 26032, 0x05A1)
MAID_SM = C.make_maid("127.0.0.1", 26030, 0x0001)
N, M, T = C.NodeType, C.MsgType, C.CtlType


def fixed(label: str, n: int = 16) -> bytes:
    return hashlib.sha256(b"tessera-rmcp2-vector:" + label.encode()).digest()[:n]


def H(b: bytes) -> str:
    return bytes(b).hex()


def msg(t: C.MsgType, nt: C.NodeType, maid: bytes, *controls: C.Control) -> C.Message:
    return C.Message(t, nt, SID, maid, tuple(controls))


def describe_value(v):
    if isinstance(v, IntEnum):
        return v.name
    if isinstance(v, (bytes, bytearray)):
        return H(v)
    if isinstance(v, tuple):
        return [describe_value(x) for x in v]
    if v is None or isinstance(v, int):
        return v
    # KeyMaterial / MaAuth
    return {f.name: describe_value(getattr(v, f.name)) for f in fields(v)}


def describe(m: C.Message) -> dict:
    return {"type": m.type.name, "nt": m.nt.name, "session_id": f"{m.session_id:016x}", "maid": H(m.maid),
            "controls": [{"control": type(c).__name__,
                          **{f.name: describe_value(getattr(c, f.name)) for f in fields(c)}}
                         for c in m.controls]}


def spans(raw: bytes) -> list:
    """[code, hex] of each known control with its sub-controls, as the firmware records them."""
    out, i, n = [], C.HEADER_LEN, len(raw)
    m = C.decode(raw)
    known = iter(m.controls)
    while i < n:
        t, ln = raw[i], raw[i + 1]
        if t not in {int(c) for c in C.CtlType}:
            i += ln
            continue
        c = next(known)
        size = len(c.encode())
        out.append([t, H(raw[i:i + size])])
        i += size
    return out


def valid_messages() -> list[tuple[str, C.Message, list | None]]:
    """(name, message, firmware builder call or None)."""
    kd = C.KeyData(1, C.KeyMode.FRESH, 3600, fixed("ks1")).encode()
    kg = C.KeyData(7, C.KeyMode.FRESH, 0, fixed("kg7")).encode()
    kc = C.KeyData(3, C.KeyMode.FRESH, 0, fixed("kc3")).encode()
    acl = tuple(P.hashed_maid(SID, C.make_maid("10.0.0.%d" % i, 40000 + i, i)) +
                P.hashed_ktls(fixed("ktls%d" % i), SID) for i in range(1, 4))
    sui = b"CP-user-0042"
    nonce = fixed("nonce-c")
    hm = P.hashed_maid(SID, MAID_RMA)
    pn = fixed("probe-nonce", 8)
    proof = P.probe_proof(P.hashed_ktls(fixed("ktls-rma"), SID), SID, pn)
    R = C.Result
    cases: list[tuple[str, C.Message, list | None]] = [
        ("subsreq-rma-open", msg(M.SUBSREQ, N.RMA, MAID_RMA), ["subsreq", None]),
        ("subsreq-rma-closed", msg(M.SUBSREQ, N.RMA, MAID_RMA, C.ServUserIdent(sui)), ["subsreq", H(sui)]),
        ("subsreq-rma-closed-max-id", msg(M.SUBSREQ, N.RMA, MAID_RMA, C.ServUserIdent(bytes(range(1, 254)))),
         ["subsreq", H(bytes(range(1, 254)))]),
        ("subsreq-sma", msg(M.SUBSREQ, N.SMA, MAID_SMA), None),
        ("subsreq-dma", msg(M.SUBSREQ, N.DMA, MAID_DMA), None),
        *[(f"subsans-{r.name.lower()}", msg(M.SUBSANS, N.SM, MAID_RMA, C.ResultCtl(r)), None)
          for r in (R.ACCEPTED, R.SERV_USER_ID_MISSING, R.SERV_USER_ID_NOT_RECOGNIZED, R.NOT_ALLOWED)],
        ("secagreq-sma", msg(M.SECAGREQ, N.SMA, MAID_SMA,
                             C.SmaPropose(C.GpAttribute.CLOSED, C.GkMecha.PERIODIC_FORWARD_BACKWARD, C.EnDecId.AES_CTR_128),
                             C.GkMechCapab(C.GkName.KDC, 1), C.GkMechCapab(C.GkName.LKH, 2),
                             C.EnDecCapab(C.EnDecId.AES_CTR_128, 1), C.EnDecCapab(C.EnDecId.AES_CBC_128, 2),
                             C.EnDecCapab(C.EnDecId.SEED, 5),
                             C.AuthAlgCapab(C.AuthId.HMAC_SHA1, 1), C.AuthAlgCapab(C.AuthId.HMAC_MD5, 3)), None),
        ("secagreq-dma", msg(M.SECAGREQ, N.DMA, MAID_DMA, C.GkMechCapab(C.GkName.KDC, 1),
                             C.EnDecCapab(C.EnDecId.AES_CBC_128, 1), C.AuthAlgCapab(C.AuthId.HMAC_SHA1, 1)), None),
        ("secagreq-dma-late", msg(M.SECAGREQ, N.DMA, MAID_DMA), None),
        ("secagreq-rma", msg(M.SECAGREQ, N.RMA, MAID_RMA), ["secagreq"]),
        ("seclist", msg(M.SECLIST, N.SM, MAID_RMA,
                        C.GkMech(C.GpAttribute.CLOSED, C.GkMecha.BACKWARD_FORWARD, C.GkName.KDC), C.AuthMech(),
                        C.ConEnDecAlg(C.EnDecId.AES_CTR_128), C.GkEnDecAlg(C.EnDecId.AES_CBC_128),
                        C.AuthAlg(C.AuthId.HMAC_SHA1)), None),
        ("seclist-open-static", msg(M.SECLIST, N.SM, MAID_DMA,
                                    C.GkMech(C.GpAttribute.OPEN, C.GkMecha.STATIC, C.GkName.LKH), C.AuthMech(),
                                    C.ConEnDecAlg(C.EnDecId.AES_CBC_128), C.GkEnDecAlg(C.EnDecId.AES_CTR_128),
                                    C.AuthAlg(C.AuthId.HMAC_MD5)), None),
        ("secalgreq-rma-one", msg(M.SECALGREQ, N.RMA, MAID_RMA, C.ConEnDecDeliver(C.EnDecId.SEED)),
         ["secalgreq", [[0x1C, 4]]]),
        ("secalgreq-rma-all", msg(M.SECALGREQ, N.RMA, MAID_RMA, C.GkMechDeliver(C.GkName.MIKEY),
                                  C.AuthMechDeliver(C.AuthName.MEM_AUTH), C.ConEnDecDeliver(C.EnDecId.SEED),
                                  C.GkEnDecDeliver(C.EnDecId.PKCS1), C.AuthAlgDeliver(C.AuthId.MD5)),
         ["secalgreq", [[0x1A, 3], [0x1B, 1], [0x1C, 4], [0x1D, 3], [0x1E, 3]]]),
        ("secalgreq-dma", msg(M.SECALGREQ, N.DMA, MAID_DMA, C.GkMechDeliver(C.GkName.GSAKMP)), None),
        ("secalgans", msg(M.SECALGANS, N.SM, MAID_RMA, C.ConEnDecDeliver(C.EnDecId.SEED),
                          C.DeliverResultCtl(C.DeliverResult.NOT_DELIVERABLE),
                          C.AuthAlgDeliver(C.AuthId.MD5), C.DeliverResultCtl(C.DeliverResult.AVAILABLE)), None),
        *[(f"secagans-{r.name.lower()}", msg(M.SECAGANS, N.RMA, MAID_RMA, C.SecReturnCtl(r)), ["secagans", int(r)])
          for r in C.SecReturn],
        ("secagans-dma", msg(M.SECAGANS, N.DMA, MAID_DMA, C.SecReturnCtl(C.SecReturn.OK)), None),
        ("keydeliver-ks", msg(M.KEYDELIVER, N.SM, MAID_DMA, C.KeyInfo(C.KeyType.KS, kd)), None),
        ("keydeliver-kg", msg(M.KEYDELIVER, N.DMA, MAID_RMA, C.KeyInfo(C.KeyType.KG, kg)), None),
        ("keydeliver-kc", msg(M.KEYDELIVER, N.SMA, MAID_DMA, C.KeyInfo(C.KeyType.KC, kc)), None),
        ("keydeliver-kg-max", msg(M.KEYDELIVER, N.DMA, MAID_DMA, C.KeyInfo(C.KeyType.KG, bytes(range(256)) * 3)),
         None),
        ("hrsreq", msg(M.HRSREQ, N.DMA, MAID_DMA), None),
        ("hrsans", msg(M.HRSANS, N.SM, MAID_DMA, C.AclList(acl)), None),
        ("hrsans-empty", msg(M.HRSANS, N.SM, MAID_DMA, C.AclList(())), None),
        ("relreq-rma", msg(M.RELREQ, N.RMA, MAID_RMA, C.Auth()), ["relreq", 0, ""]),
        ("relreq-rma-pass1", msg(M.RELREQ, N.RMA, MAID_RMA, C.Auth(ma_auth=C.MaAuth(1, fixed("p1", 32)))),
         ["relreq", 1, H(fixed("p1", 32))]),
        ("relreq-dma", msg(M.RELREQ, N.DMA, MAID_DMA, C.Auth()), None),
        ("relans-ok-kg", msg(M.RELANS, N.DMA, MAID_RMA, C.AuthAns(C.SecReturn.OK, C.KeyMaterial(C.KeyType.KG, kg))),
         None),
        ("relans-error", msg(M.RELANS, N.DMA, MAID_RMA, C.AuthAns(C.SecReturn.ERROR)), None),
        ("relans-pass2", msg(M.RELANS, N.DMA, MAID_RMA,
                             C.AuthAns(C.SecReturn.RETRANSMISSION_REQ, None, C.MaAuth(2, fixed("p2", 32)))), None),
        ("relans-kg-kc", msg(M.RELANS, N.SMA, MAID_DMA, C.AuthAns(C.SecReturn.OK, C.KeyMaterial(C.KeyType.KG, kg)),
                             C.KeyInfo(C.KeyType.KC, kc)), None),
        ("pprobreq-rma", msg(M.PPROBREQ, N.RMA, MAID_RMA, C.ProbeAuth(hm, pn, proof)),
         ["pprobreq", H(hm), H(pn), H(proof)]),
        ("pprobreq-dma", msg(M.PPROBREQ, N.DMA, MAID_DMA), None),
        ("pprobans", msg(M.PPROBANS, N.DMA, MAID_RMA, C.ResultCtl(R.ACCEPTED), C.Status(2, 17, 7)), None),
        ("pprobans-refused", msg(M.PPROBANS, N.DMA, MAID_RMA, C.ResultCtl(R.NOT_IN_ACL)), None),
        ("hsolicit", msg(M.HSOLICIT, N.RMA, MAID_RMA), ["empty", int(M.HSOLICIT)]),
        ("hannounce", msg(M.HANNOUNCE, N.DMA, MAID_DMA), None),
        ("hleave", msg(M.HLEAVE, N.DMA, MAID_DMA, C.Candidate(C.make_maid("127.0.0.2", 26032, 2)),
                       C.Candidate(C.make_maid("127.0.0.3", 26032, 3))), None),
        ("hleave-alone", msg(M.HLEAVE, N.DMA, MAID_DMA), None),
        ("streq", msg(M.STREQ, N.SM, MAID_RMA), None),
        ("stans-rma", msg(M.STANS, N.RMA, MAID_RMA, C.Status(0, 0, 7)), ["status", int(M.STANS), 0, 0, 7]),
        ("stcolreq", msg(M.STCOLREQ, N.DMA, MAID_RMA), None),
        ("stcolans-rma", msg(M.STCOLANS, N.RMA, MAID_RMA, C.Status(0, 1, 255)),
         ["status", int(M.STCOLANS), 0, 1, 255]),
        ("leavreq-rma", msg(M.LEAVREQ, N.RMA, MAID_RMA, C.ResultCtl(R.LEAVE_NORMAL)),
         ["result", int(M.LEAVREQ), int(R.LEAVE_NORMAL)]),
        ("leavreq-sm", msg(M.LEAVREQ, N.SM, MAID_SM, C.ResultCtl(R.EXPELLED)), None),
        ("leavans-rma", msg(M.LEAVANS, N.RMA, MAID_RMA, C.ResultCtl(R.ACCEPTED)),
         ["result", int(M.LEAVANS), int(R.ACCEPTED)]),
        ("leavans-dma", msg(M.LEAVANS, N.DMA, MAID_DMA, C.ResultCtl(R.ACCEPTED)), None),
        ("hb-rma", msg(M.HB, N.RMA, MAID_RMA), ["empty", int(M.HB)]),
        ("hb-sm", msg(M.HB, N.SM, MAID_SM), None),
        ("termreq", msg(M.TERMREQ, N.DMA, MAID_RMA, C.ResultCtl(R.SESSION_TERMINATED)), None),
        ("termans-rma", msg(M.TERMANS, N.RMA, MAID_RMA, C.ResultCtl(R.ACCEPTED)),
         ["result", int(M.TERMANS), int(R.ACCEPTED)]),
        ("ktlsreq-rma", msg(M.KTLSREQ, N.RMA, MAID_RMA, C.KtlsNonce(nonce)), ["ktlsreq", H(nonce)]),
        ("ktlsreq-dma", msg(M.KTLSREQ, N.DMA, MAID_DMA, C.KtlsNonce(nonce)), None),
        ("ktlsans", msg(M.KTLSANS, N.SM, MAID_RMA, C.KtlsSeed(fixed("seed", 32))), None),
        ("kcreq", msg(M.KCREQ, N.DMA, MAID_DMA, C.ResultCtl(R.LEAVE_NORMAL)), None),
    ]
    assert {m.type for _, m, _ in cases} == set(C.MsgType)
    assert {c.CODE for _, m, _ in cases for c in m.controls} == set(C.CtlType) - {T.CONTENT_ADDR}
    return cases


def content_addr_messages() -> list[tuple[str, C.Message, list | None]]:
    """CONTENT_ADDR (B.4, 0xC8) on the two messages that carry it (B.15, contract of issue 13):
    the RMA's HB on its control link (NT RMA) and the DMA's PPROBREQ on its upstream link (NT DMA).
    Kept apart from `cases` (and out of the corpus): a board decoder only ever builds these (it
    may skip 0xC8 as an unknown control when it reads one), so the firmware's span counts of
    `cases` stay as they are."""
    return [
        ("hb-rma-content-addr", msg(M.HB, N.RMA, MAID_RMA, C.ContentAddr(40000, 40001)), None),
        ("hb-rma-content-addr-udp-only", msg(M.HB, N.RMA, MAID_RMA, C.ContentAddr(40000, 0)), None),
        ("pprobreq-dma-content-addr", msg(M.PPROBREQ, N.DMA, MAID_DMA, C.ContentAddr(26033, 26034)), None),
    ]


def _case(name: str, m: C.Message, rma: list | None) -> dict:
    raw = m.encode()
    return {"name": name, "msg": H(raw), "type": int(m.type), "nt": int(m.nt), "skipped": 0,
            "spans": spans(raw), "desc": describe(m), "rma": rma}


def messages() -> dict:
    out = [_case(*c) for c in valid_messages()]
    # unknown controls are skipped by their Length (B.2): the same message with strangers inside
    base = msg(M.SECLIST, N.SM, MAID_RMA, C.GkMech(C.GpAttribute.OPEN, C.GkMecha.PERIODIC, C.GkName.KDC),
               C.AuthMech(), C.ConEnDecAlg(C.EnDecId.AES_CBC_128), C.GkEnDecAlg(C.EnDecId.AES_CBC_128),
               C.AuthAlg(C.AuthId.HMAC_SHA1))
    clean = base.encode()
    for k, (at, junk) in enumerate([(20, b"\x7e\x02"), (28, b"\x33\x05abc"), (len(clean), b"\xfe\x04\xff\xff"),
                                    (32, b"\x40\x03\x00\x10\x06\x00\x00\x00\x00")]):
        raw = bytearray(clean[:at] + junk + clean[at:])
        raw[2:4] = len(raw).to_bytes(2, "big")
        d = C.decode(bytes(raw))
        assert d == base and d.skipped == (2 if k == 3 else 1)
        out.append({"name": f"seclist-unknown-{k}", "msg": H(raw), "type": int(M.SECLIST), "nt": 1,
                    "skipped": d.skipped, "spans": spans(bytes(raw)), "desc": describe(base), "canonical": H(clean),
                    "rma": None})
    return {
        "description": (
            "Valid secure RMCP-2 messages (docs/rmcp2-profile.md). cases[]: msg = the whole message (hex); "
            "type, nt = message and node type codes; desc = field-by-field description (enum names, hex bytes); "
            "spans = [control type, hex of the control with its sub-controls] for every known control in wire "
            "order; skipped = unknown controls a decoder skips; canonical = the bytes an encoder gives for desc "
            "when msg holds unknown controls; rma = the firmware builder call [function, args...] (hex strings "
            "for bytes) that must give msg, or null. session_id, MAIDs: profile B.1. content_addr_cases: the same "
            "for the messages carrying CONTENT_ADDR (B.4 0xC8: HB from an RMA, PPROBREQ from a DMA), apart from "
            "cases because a board decoder may skip 0xC8 as unknown."),
        "session_id": f"{SID:016x}",
        "cases": out,
        "content_addr_cases": [_case(*c) for c in content_addr_messages()],
    }


def _mutations(raw: bytes, rnd: random.Random) -> list[tuple[str, bytes]]:
    out = []
    n = len(raw)
    for cut in sorted({19, 20, 21, n - 1, rnd.randrange(19, n)}):
        if 0 <= cut < n:
            out.append((f"cut{cut}", raw[:cut]))
            b = bytearray(raw[:cut])
            if cut >= 4:
                b[2:4] = cut.to_bytes(2, "big")
                out.append((f"cut{cut}-len", bytes(b)))
    for _ in range(4):
        b = bytearray(raw)
        i = rnd.randrange(n)
        b[i] ^= 1 << rnd.randrange(8)
        out.append((f"flip{i}", bytes(b)))
    for _ in range(3):
        b = bytearray(raw)
        i = rnd.randrange(n)
        b[i] = rnd.randrange(256)
        out.append((f"set{i}", bytes(b)))
    b = bytearray(raw + bytes(rnd.randrange(1, 6)))
    b[2:4] = len(b).to_bytes(2, "big")
    out.append(("tail", bytes(b)))
    return out


def _hand_made() -> list[tuple[str, bytes]]:
    """Cases aimed at each check of B.2/B.12."""
    def m(t, nt, body=b"", maid=MAID_RMA, ver=4, length=None):
        n = 20 + len(body) if length is None else length
        return bytes(((ver << 4) | nt, t)) + n.to_bytes(2, "big") + SID.to_bytes(8, "big") + maid + body

    kg = C.KeyData(1, C.KeyMode.FRESH, 0, bytes(16)).encode()
    km = bytes((1,)) + (4 + len(kg)).to_bytes(2, "big") + b"\x02" + kg
    return [
        ("empty", b""), ("short", bytes(19)), ("version3", m(0x02, 3, ver=3)), ("version0", m(0x02, 3, ver=0)),
        ("length-short", m(0x02, 3, length=19)), ("length-long", m(0x02, 3, length=21)),
        ("unknown-type", m(0x03, 3)), ("unknown-type-ff", m(0xFF, 1)),
        ("nt-0", m(0x02, 0)), ("nt-4", m(0x02, 4)), ("nt-sm-subsreq", m(0x02, 1)), ("nt-rma-seclist", m(0x22, 3)),
        ("maid-zero", m(0x02, 3, maid=bytes(8))), ("hrsreq-body", m(0x25, 5, b"\x7e\x02")),
        ("ctl-cut", m(0x02, 3, b"\x22")), ("ctl-len0", m(0x02, 3, b"\x22\x00")), ("ctl-len1", m(0x02, 3, b"\x7e\x01")),
        ("ctl-over", m(0x02, 3, b"\x22\x09abc")), ("sui-empty", m(0x02, 3, b"\x22\x02")),
        ("sub-at-ctl", m(0x02, 3, b"\x01\x04\x00\x00")), ("sub81-at-ctl", m(0x02, 3, b"\x81\x00\x04\x01")),
        ("fixed-len", m(0x23, 3, b"\x1f\x05\x01\x00\x00")), ("unexpected", m(0x23, 3, b"\x1f\x04\x01\x00\xc1\x04\x01\x00")),
        ("duplicate", m(0x23, 3, b"\x1f\x04\x01\x00\x1f\x04\x01\x00")), ("missing", m(0x23, 3)),
        ("reserved", m(0x23, 3, b"\x1f\x04\x01\x01")), ("sec-return-5", m(0x23, 3, b"\x1f\x04\x05\x00")),
        ("sui-from-sma", m(0x02, 2, b"\x22\x03x", maid=MAID_SMA)),
        ("sma-no-propose", m(0x21, 2, maid=MAID_SMA)), ("dma-propose", m(0x21, 5, b"\x11\x08\x01\x00\x01\x00\x00\x00")),
        ("rma-capab", m(0x21, 3, b"\x12\x04\x01\x01")), ("capab-dup-value", m(0x21, 5, b"\x12\x04\x01\x01\x12\x04\x01\x02")),
        ("capab-prefer-0", m(0x21, 5, b"\x13\x04\x01\x00")), ("capab-prefer-6", m(0x21, 5, b"\x13\x04\x01\x06")),
        ("capab-17", m(0x21, 5, b"".join(bytes((0x14, 4, 1 + k % 3, 1)) for k in range(17)))),
        ("propose-reserved", m(0x21, 2, b"\x11\x08\x01\x00\x01\x00\x00\x01", maid=MAID_SMA)),
        ("propose-gkmecha-8", m(0x21, 2, b"\x11\x08\x01\x08\x01\x00\x00\x00", maid=MAID_SMA)),
        ("secalgreq-empty", m(0x27, 3)), ("secalgans-unpaired", m(0xB0, 1, b"\x1c\x04\x04\x00")),
        ("secalgans-swapped", m(0xB0, 1, b"\xc4\x04\x02\x00\x1c\x04\x04\x00")),
        ("keyinfo-no-km", m(0x24, 5, b"\x20\x04\x02\x00")),
        ("keyinfo-km-type", m(0x24, 5, b"\x20\x04\x01\x00" + km)),
        ("keyinfo-nt", m(0x24, 1, b"\x20\x04\x02\x00" + km)),
        ("km-len3", m(0x24, 5, b"\x20\x04\x02\x00\x01\x00\x03")),
        ("km-over", m(0x24, 5, b"\x20\x04\x02\x00\x01\x00\x30\x02")),
        ("km-type-9", m(0x24, 5, b"\x20\x04\x02\x00\x01\x00\x04\x09")),
        ("authans-flag2", m(0x0C, 5, b"\x24\x04\x01\x02")), ("authans-failedconf", m(0x0C, 5, b"\x24\x04\x04\x00")),
        ("authans-flag-no-km", m(0x0C, 5, b"\x24\x04\x01\x01")),
        ("ma-auth-pass4", m(0x09, 3, b"\x23\x04\x01\x00\x81\x00\x04\x04")),
        ("ma-auth-short", m(0x09, 3, b"\x23\x04\x01\x00\x81\x00\x03")),
        ("auth-name-2", m(0x09, 3, b"\x23\x04\x02\x00")),
        ("acl-no-data", m(0x26, 1, b"\x21\x02", maid=MAID_DMA)),
        ("acl-count", m(0x26, 1, b"\x21\x02\x02\x00\x26\x00\x00\x02" + bytes(32), maid=MAID_DMA)),
        ("acl-reserved", m(0x26, 1, b"\x21\x02\x02\x00\x06\x01\x00\x00", maid=MAID_DMA)),
        ("result-unknown", m(0xA1, 1, b"\xc1\x04\x43\x00")), ("result-0", m(0xA1, 1, b"\xc1\x04\x00\x00")),
        ("probe-missing", m(0xA2, 3)), ("probe-from-dma", m(0xA2, 5, b"\xc6\x24" + bytes(34), maid=MAID_DMA)),
        ("probe-reserved", m(0xA2, 3, b"\xc6\x24\x01" + bytes(33))),
        ("candidate-zero", m(0xA6, 5, b"\xc7\x0a" + bytes(8), maid=MAID_DMA)),
        ("status-reserved", m(0xA8, 3, b"\xc5\x08\x00\x00\x00\x00\x01\x01")),
        ("nonce-reserved", m(0xB1, 3, b"\xc2\x14\x00\x01" + bytes(16))),
        ("seed-short", m(0xB2, 1, b"\xc3\x14" + bytes(18))),
        ("gkmech-name-6", m(0x22, 1, b"\x15\x08\x01\x00\x06\x00\x00\x00")),
        ("authmech-attr-2", m(0x22, 1, b"\x16\x04\x02\x01")),
        ("seclist-missing", m(0x22, 1, b"\x16\x04\x01\x01")),
    ]


def corpus() -> dict:
    rnd = random.Random(1603)
    cases = []
    for name, raw in _hand_made():
        cases.append((name, raw))
    for name, m, _ in valid_messages():
        raw = m.encode()
        if len(raw) > 1024:
            continue
        cases.append((name, raw))
        for tag, b in _mutations(raw, rnd):
            cases.append((f"{name}/{tag}", b))
    out = []
    for tag, raw in cases:
        assert len(raw) <= 1024
        try:
            C.decode(raw)
            err = 0
        except C.Rmcp2Error as e:
            err = int(e.code)
        out.append({"tag": tag, "msg": H(raw), "error": err})
    return {
        "description": (
            "Malformed (and some valid) secure RMCP-2 messages, at most 1024 bytes (the firmware's limit). "
            "error = the profile B.12 error number of the first failing check (0: valid). Every decoder must "
            "give exactly that number and raise nothing else."),
        "cases": out,
    }


def envelope() -> dict:
    cases = []
    plain_msgs = [m for name, m, _ in valid_messages() if name in (
        "subsans-accepted", "subsans-serv_user_id_missing", "seclist", "secalgans", "subsreq-rma-closed",
        "secagans-ok", "keydeliver-ks", "hrsans", "ktlsreq-rma", "hb-rma")]
    refs = [(P.KeyRef.KTLS, 0), (P.KeyRef.KS, 1), (P.KeyRef.KS, 200), (P.KeyRef.KG, 7), (P.KeyRef.KMAS, 0),
            (P.KeyRef.HASHED_KTLS, 0)]
    suites = [P.BOOTSTRAP, P.Suite(C.EnDecId.AES_CTR_128, C.AuthId.HMAC_SHA1),
              P.Suite(C.EnDecId.AES_CBC_128, C.AuthId.HMAC_MD5), P.Suite(C.EnDecId.AES_CTR_128, C.AuthId.HMAC_MD5)]
    k = 0
    for m in plain_msgs:
        for s in suites:
            ref, gen = refs[k % len(refs)]
            raw = fixed(f"key{k}")
            key = P.ProtKey(ref, raw, gen)
            iv = fixed(f"iv{k}")
            seq = [1, 2, 1000, P.SEQ_MAX][k % 4]
            plain = m.encode()
            sealed = P.seal(plain, key, s, seq, iv)
            cases.append({"name": f"{m.type.name.lower()}-{k}", "key": H(raw), "key_ref": int(ref), "gen": gen,
                          "enc": int(s.enc), "auth": int(s.auth), "seq": seq, "iv": H(iv),
                          "k_enc": H(key.k_enc(s.enc)), "k_mac": H(key.k_mac(s.auth)),
                          "plain": H(plain), "sealed": H(sealed)})
            k += 1
    # tampering: one protected message, each broken in one way, with the error expected
    key = P.ProtKey(P.KeyRef.KTLS, fixed("tamper"))
    good = P.seal(plain_msgs[0].encode(), key, P.BOOTSTRAP, 5, fixed("iv-t"))
    bad = []

    def put(tag, b, seq_window=0):
        w = P.ReplayWindow()
        if seq_window:
            w.commit(seq_window)
        try:
            P.unseal(b, P.BOOTSTRAP, lambda maid, sec: key if sec.ref == key.ref else None, lambda maid, k: w)
            err = 0
        except C.Rmcp2Error as e:
            err = int(e.code)
        bad.append({"tag": tag, "sealed": H(b), "high": seq_window, "error": err})

    put("good", good)
    put("replay", good, 5)
    put("old", good, 5 + 32)
    put("window", good, 5 + 31)
    for i in (0, 1, 3, 5, 13, 20, 21, 22, 23, 24, 27, 30, 45, len(good) - 17, len(good) - 1):
        b = bytearray(good)
        b[i] ^= 0x01
        put(f"flip{i}", bytes(b))
    for cut in (20, 59, 60, len(good) - 1):
        b = bytearray(good[:cut])
        if cut >= 4:
            b[2:4] = cut.to_bytes(2, "big")
        put(f"cut{cut}", bytes(b))
    b = bytearray(good)
    b[22] = 0x02  # HMAC-MD5 is valid but not the suite in force
    put("suite", bytes(b))
    return {
        "description": (
            "Message protection (profile B.7). cases[]: key (16 bytes), key_ref, gen, enc (EncAlg), auth (AuthAlg), "
            "seq, iv; k_enc/k_mac = derived keys; plain = the plain message; sealed = the protected message. "
            "tamper[]: a protected message under key_tamper (K_TLS, bootstrap suite AES-CBC + HMAC-SHA1) "
            "altered; high = the receiver window's highest Seq beforehand (0: fresh); error = the B.12 number."),
        "key_tamper": H(fixed("tamper")),
        "cases": cases,
        "tamper": bad,
    }


def keys() -> dict:
    cert = fixed("cert", 32) * 12  # stands for a certificate's DER bytes
    seed, nonce = fixed("seed", 32), fixed("nonce-c")
    k_tls = P.ktls(seed, SID, MAID_RMA, nonce, cert)
    ks = [fixed("ks1")]
    for g in range(2, 5):
        ks.append(P.ks_next(ks[-1], SID, g))
    kd = [{"gen": g, "mode": int(md), "period": per, "key": H(fixed(f"kd{g}")),
           "data": H(C.KeyData(g, md, per, fixed(f"kd{g}")).encode())}
          for g, md, per in ((1, C.KeyMode.FRESH, 3600), (255, C.KeyMode.HASHED, 0), (2, C.KeyMode.FRESH, 65535))]
    pn = fixed("probe-nonce", 8)
    return {
        "description": "Key derivations of profile B.5/B.6/B.4 (all hex): K_TLS from seed, session_id, maid, "
                       "nonce_c and the SHA-256 of cert; hashed_ktls, hashed_maid; ks[i] = generation i+1 of Ks "
                       "by the hash step; key_data = KEY_DATA encodings; probe_proof for probe_nonce.",
        "session_id": f"{SID:016x}", "maid": H(MAID_RMA), "seed": H(seed), "nonce_c": H(nonce), "cert": H(cert),
        "k_tls": H(k_tls), "hashed_ktls": H(P.hashed_ktls(k_tls, SID)), "hashed_maid": H(P.hashed_maid(SID, MAID_RMA)),
        "ks": [H(k) for k in ks], "key_data": kd, "probe_nonce": H(pn),
        "probe_proof": H(P.probe_proof(P.hashed_ktls(k_tls, SID), SID, pn)),
    }


FILES = {"messages": messages, "corpus": corpus, "envelope": envelope, "keys": keys}


def main(argv: list[str]) -> int:
    names = argv or list(FILES)
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        data = FILES[name]()
        (OUT / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {OUT / (name + '.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
