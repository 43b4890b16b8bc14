#!/usr/bin/env python3
"""Vectors for every KEYDELIVER form of profile B.16 (Kg under K_MAS, Kg under the
previous Kg, Kc under Ks, Kc under Kg), in both message suites, made by the host engines
(groupkey.py, contentkey.py) from fixed randoms; and a hostile corpus of each form with the
error number the board RMA must count (computed here with the host envelope and codec).

    .venv/bin/python tools/gen_rmcp2_keys_vectors.py   # writes tests/vectors/rmcp2/keys_deliver.json

Deterministic: rerunning rewrites an identical file.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import sys
from pathlib import Path

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2.contentkey import KcRelay, KcSchedule, ahead
from tessera.rmcp2.groupkey import GroupKeyManager

OUT = Path(__file__).resolve().parents[1] / "tests" / "vectors" / "rmcp2" / "keys_deliver.json"
SID = 0x0123456789ABCDEF
MAID_DMA = C.make_maid("127.0.0.1", 26032, 0x0D01)
MAID_SMA = C.make_maid("127.0.0.1", 26032, 0x05A1)
MAID_RMA = C.make_maid("127.0.0.1", 40001, 0x0A01)
MAID_RMA2 = C.make_maid("127.0.0.1", 40002, 0x0A02)
SUITES = {"cbc-sha1": P.Suite(C.EnDecId.AES_CBC_128, C.AuthId.HMAC_SHA1),
          "ctr-md5": P.Suite(C.EnDecId.AES_CTR_128, C.AuthId.HMAC_MD5)}


class Rand:
    """Fixed randoms: SHA-256 of a label and a counter."""

    def __init__(self, label: str) -> None:
        self.label, self.c = label, itertools.count()

    def __call__(self, n: int) -> bytes:
        return hashlib.sha256(f"tessera-rmcp2-keys:{self.label}:{next(self.c)}".encode()).digest()[:n]


def H(b: bytes) -> str:
    return bytes(b).hex()


def _case(name: str, form: str, suite: str, key: P.ProtKey, sealed: bytes, plain: bytes, kind: C.KeyType,
          kd: C.KeyData, rma: dict | None) -> dict:
    _, sec = P.peek(sealed)
    return {"name": name, "form": form, "suite": suite, "enc": int(SUITES[suite].enc), "auth": int(SUITES[suite].auth),
            "key_ref": int(key.ref), "key": H(key._raw), "gen": key.gen, "seq": sec.seq,
            "iv": H(sealed[28:44]), "plain": H(plain), "sealed": H(sealed), "key_type": int(kind),
            "delivered_gen": kd.gen, "delivered_key": H(kd.key), "rma": rma}


def cases_for(sname: str) -> list[dict]:
    suite = SUITES[sname]
    rand = Rand(sname)
    out = []
    # Kg under K_MAS: a BACKWARD leave, delivery to the remaining RMA
    g = GroupKeyManager(SID, MAID_DMA, C.GkMecha.BACKWARD, suite, rand, 0.0)
    kmas = rand(16)
    g.member_joined(MAID_RMA, kmas, 0.0)
    g.member_joined(MAID_RMA2, rand(16), 0.0)
    gen0, kg0 = g.current()
    (d,) = g.member_left(MAID_RMA2, 1.0)
    rma = {"maid": H(MAID_RMA), "kmas": H(kmas), "kg_gen": gen0, "kg": H(kg0)}
    plain = _open(d.data, suite, P.ProtKey(P.KeyRef.KMAS, kmas))
    out.append(_case(f"kg-kmas-{sname}", "kg-kmas", sname, P.ProtKey(P.KeyRef.KMAS, kmas), d.data, plain,
                     C.KeyType.KG, *_kd(plain), rma))
    # Kg under the previous Kg: a PERIODIC rollover
    g = GroupKeyManager(SID, MAID_DMA, C.GkMecha.PERIODIC, suite, rand, 0.0, period=60.0)
    kmas = rand(16)
    g.member_joined(MAID_RMA, kmas, 0.0)
    old = g.current_key()
    rma = {"maid": H(MAID_RMA), "kmas": H(kmas), "kg_gen": old.gen, "kg": H(old._raw)}
    (d,) = g.tick(60.0)
    plain = _open(d.data, suite, old)
    out.append(_case(f"kg-kg-{sname}", "kg-kg", sname, old, d.data, plain, C.KeyType.KG, *_kd(plain), rma))
    # Kc under Ks: the SMA's delivery to the DMA
    ks = P.ProtKey(P.KeyRef.KS, rand(16), 7)
    sched = KcSchedule(SID, MAID_SMA, rand, 0.0, ks_suite=suite)
    sealed = sched.keydeliver(MAID_DMA, 1, ks)
    plain = _open(sealed, suite, ks)
    out.append(_case(f"kc-ks-{sname}", "kc-ks", sname, ks, sealed, plain, C.KeyType.KC, *_kd(plain), None))
    # Kc under Kg: the same plain message re-sealed by the DMA for its group
    relay = KcRelay(SID, MAID_DMA, g, ks_suite=suite)
    kg = g.current_key()
    (d,) = relay.receive(sealed, lambda gen: ks if gen == ks.gen else None, 61.0)
    rma = {"maid": H(MAID_RMA), "kmas": H(kmas), "kg_gen": kg.gen, "kg": H(kg._raw)}
    assert _open(d.data, suite, kg) == plain  # re-wrapped, not re-made
    out.append(_case(f"kc-kg-{sname}", "kc-kg", sname, kg, d.data, plain, C.KeyType.KC, *_kd(plain), rma))
    return out


def _open(sealed: bytes, suite: P.Suite, key: P.ProtKey) -> bytes:
    return P.unseal(sealed, suite, lambda m, s: key if (s.ref, s.gen) == (key.ref, key.gen) else None,
                    lambda m, k: P.ReplayWindow())


def _kd(plain: bytes) -> tuple[C.KeyData]:
    return (C.KeyData.decode(C.decode(plain).get(C.KeyInfo).key_data),)


# ---------------------------------------------------------------------------- corpus
def expect(case: dict, data: bytes) -> int:
    """The error number (0: installed) a board RMA holding case["rma"] gets for `data`,
    by the rules of B.16 written with the host envelope and codec."""
    r = case["rma"]
    suite = SUITES[case["suite"]]
    kmas = P.ProtKey(P.KeyRef.KMAS, bytes.fromhex(r["kmas"]))
    kg = P.ProtKey(P.KeyRef.KG, bytes.fromhex(r["kg"]), r["kg_gen"])

    def lookup(maid: bytes, sec: P.SecHeader):
        if sec.ref == P.KeyRef.KMAS and maid == bytes.fromhex(r["maid"]):
            return kmas
        if sec.ref == P.KeyRef.KG and maid == MAID_DMA and sec.gen == kg.gen:
            return kg
        return None
    try:
        if len(data) > 1080:
            return int(C.ErrorCode.OVERSIZE)
        plain = P.unseal(data, suite, lookup, lambda m, k: P.ReplayWindow())
        if len(plain) > 1024:
            return int(C.ErrorCode.OVERSIZE)
        msg = C.decode(plain)
        ki = msg.get(C.KeyInfo)
        if msg.type != C.MsgType.KEYDELIVER:
            return -1  # authentic, not a key delivery: counted apart (errors[0])
        if msg.session_id != SID:
            return int(C.ErrorCode.MAID)
        kd = C.KeyData.decode(ki.key_data)
        if ki.key_type == C.KeyType.KG and not ahead(kd.gen, kg.gen):
            return int(C.ErrorCode.REPLAY)
        return 0
    except C.Rmcp2Error as e:
        return int(e.code)


def corpus(cases: list[dict]) -> list[dict]:
    out = []
    rmc = [c for c in cases if c["rma"] is not None and c["suite"] == "cbc-sha1"]
    for c in rmc:
        s = bytes.fromhex(c["sealed"])
        n = len(s)
        muts = {
            "as-is": s, "truncated-59": s[:59], "truncated-tag": s[:-1], "tag-flipped": s[:-1] + bytes([s[-1] ^ 1]),
            "ct-flipped": s[:50] + bytes([s[50] ^ 0x80]) + s[51:], "keyref-ks": s[:20] + b"\x01" + s[21:],
            "keyref-unknown": s[:20] + b"\x04" + s[21:], "gen-other": s[:23] + bytes([(s[23] + 1) % 256]) + s[24:],
            "alg-ctr": s[:21] + b"\x02" + s[22:], "seq-0": s[:24] + bytes(4) + s[28:],
            "maid-other": s[:12] + MAID_RMA2 + s[20:], "length-short": s[:2] + (n - 1).to_bytes(2, "big") + s[4:],
            "version-3": bytes([0x30 | (s[0] & 15)]) + s[1:], "oversize": s[:2] + b"\x04\x40" + s[4:] + bytes(1088 - n),
        }
        if c["key_type"] == C.KeyType.KG:  # authentic, fresh Seq, but a generation not ahead: stale
            plain = bytearray.fromhex(c["plain"])
            plain[-20] = c["rma"]["kg_gen"]
            key = P.ProtKey(P.KeyRef(c["key_ref"]), bytes.fromhex(c["key"]), c["gen"])
            muts["stale-gen"] = P.seal(bytes(plain), key, SUITES[c["suite"]], 2, bytes(16))
        for tag, data in muts.items():
            out.append({"case": c["name"], "tag": tag, "data": H(data), "error": expect(c, data)})
    return out


def build() -> dict:
    cases = [c for s in SUITES for c in cases_for(s)]
    return {"doc": "profile B.16: KEYDELIVER forms sealed by the host engines from fixed randoms. key/key_ref/gen: "
                   "the protecting key; plain: the message inside; delivered_*: the KEY_DATA it carries; rma: what a "
                   "board RMA holds before it (null: not for an RMA). corpus: mutations of the cbc-sha1 RMA cases "
                   "and the B.12 error number the RMA counts (0 installed, -1 authentic but not a key delivery).",
            "session_id": f"{SID:016x}", "dma_maid": H(MAID_DMA), "cases": cases, "corpus": corpus(cases)}


def main() -> int:
    OUT.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
