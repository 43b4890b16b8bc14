#!/usr/bin/env python3
"""Write the SCPM test vectors tests/vectors/scpm/*.json (docs/scpm-profile.md).

    python tools/gen_scpm_vectors.py               # frames, snf, pdus, corpus, transcripts
    python tools/gen_scpm_vectors.py frames corpus # some of them

Frames, PDUs, SNF decisions and the corpus come from the host codec alone. The
key-management transcripts run the host KSN engine against the FIRMWARE device engine
(tessera_fw.scpm.device under CPython through tessera.mpshim) with fixed randoms on both
sides, so each side's tests can reproduce its own frames from the other side's.
Everything is deterministic: rerunning rewrites identical files.
"""
from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

from tessera.scpm import codec as C

OUT = Path(__file__).resolve().parents[1] / "tests" / "vectors" / "scpm"
DEV, KSN = 0x0A000002, C.KSN_ADDRESS


def H(b: bytes) -> str:
    return b.hex()


def fixed_key(label: str) -> bytes:
    return hashlib.sha256(b"tessera-scpm-vector:" + label.encode()).digest()[:16]


# (kind, index, gen) of the keys the vectors use; the same context serves the corpus.
KEYS = [(C.KeyKind.SETUP, 0, 1), (C.KeyKind.USER, 0, 1), (C.KeyKind.SP, 0, 1), (C.KeyKind.SP, 5, 2),
        (C.KeyKind.MAKER, 0, 1), (C.KeyKind.MASTER, 0, 3)]


def key_of(kind: int, index: int, gen: int) -> bytes:
    return fixed_key(f"{int(kind)}/{index}/{gen}")


def padata_of(n: int) -> bytes:
    return bytes((i * 7 + 3) & 0xFF for i in range(n))


def frames() -> dict:
    cases = []
    for kind, index, gen in KEYS:
        raw = key_of(kind, index, gen)
        uk = C.UsageKey(raw)
        for svc in C.Service:
            for n in (0, 1, 13, 14, 16, 100, C.MAX_PADATA):
                snf = 1 + n + 1000 * int(svc)
                shd = C.SecureHeader(svc, kind, index, gen)
                frame = C.seal(DEV, KSN, shd, snf, padata_of(n), uk)
                iv = C._iv(uk, shd.encode(), snf.to_bytes(4, "big"), DEV, KSN) if svc != C.Service.AUTH else b""
                cases.append({
                    "name": f"{kind.name.lower()}{index}g{gen}-svc{int(svc)}-{n}",
                    "sa": DEV, "da": KSN, "service": int(svc), "kind": int(kind), "index": index,
                    "gen": gen, "snf": snf, "key": H(raw), "k_enc": H(uk.enc), "k_mac": H(uk.mac),
                    "iv": H(iv), "shd": H(shd.encode()), "padata": H(padata_of(n)), "frame": H(frame),
                })
    plain = [{"name": f"plain-{n}", "sa": KSN, "da": DEV, "padata": H(padata_of(n)),
              "frame": H(C.encode_plain(KSN, DEV, padata_of(n)))} for n in (0, 19, C.MAX_ADATA)]
    return {
        "description": (
            "SCPM frame vectors (docs/scpm-profile.md sections 2, 3, 5). cases[]: one secure "
            "frame per key x service x PADATA length (0, 1, 13, 14, 16, 100, 1024 = max). "
            "Fields: sa, da (node addresses, int), service (1 auth, 2 conf, 3 auth+conf), kind, "
            "index, gen, snf (int); key = the 16-byte usage key, k_enc/k_mac = its derived keys "
            "(section 1), iv = the IV of section 5 ('' for service 1), shd = the 4 SHD bytes, "
            "padata and frame = the PADATA and the whole general frame. All bytes are hex. "
            "plain[]: general frames with HD 0x10 (sa, da, padata, frame). A receiver with "
            "address da holding `key` for (sa, kind, index, gen) and a fresh window must return "
            "padata; a sender must produce frame byte for byte."),
        "cases": cases,
        "plain": plain,
    }


def pdus() -> dict:
    k16, n16, pub = fixed_key("pdu-key"), fixed_key("pdu-nonce"), bytes(range(256))
    items = [
        C.EnrolHello(0x0101), C.EnrolChallenge(0x0102, n16),
        C.UserKeyInit(0x0103, n16, 1, k16, 1, fixed_key("u")), C.UserKeyInitAck(0x0103, 1, 1),
        C.SpKeyInit(0x0104, 5, 2, k16), C.SpKeyInitAck(0x0104, 5, 2),
        C.MakerKeyInit(0x0105, 1, k16), C.MakerKeyInitAck(0x0105, 1),
        C.UserKeySet(0x0106, 2, k16), C.UserKeySetAck(0x0106, 2),
        C.MkuStart(0x0107, 2, n16, pub), C.MkuResponse(0x0107, 2, n16, pub[::-1], k16),
        C.MkuCommit(0x0107, 2, k16), C.MkuCommitAck(0x0107, 2), C.MkuAbort(0x0107, 2),
        C.MkuRequest(0x0108, 2), C.SyncReq(0x0109, n16), C.SyncResp(0x0109, n16, 2, 3, 0x0107),
        C.KmError(0x010A, 17, 0x12), C.AppGet(0x0200, 1), C.AppSet(0x0201, 2, b""),
        C.AppSet(0x0202, 2, b"\x01\x02"), C.AppResult(0x0203, 1, 0, b"on"), C.AppResult(0x0204, 9, 22, b""),
    ]
    cases = []
    for p in items:
        fields = {f: (H(v) if isinstance(v, bytes) else v) for f, v in vars(p).items() if f != "txid"}
        cases.append({"op": p.OP.name, "txid": p.txid, "fields": fields, "padata": H(p.encode())})
    bad = [("", 18), ("01", 18), ("0101", 18), ("010101ff", 18), ("02" + "00" * 17, 18),
           ("00aaaa", 22), ("16aaaa", 22), ("43aaaa", 22), ("ffaaaa", 22), ("40aaaa", 18),
           ("41aaaa", 18), ("42aaaa01", 18), ("1faaaa11", 18)]
    return {
        "description": (
            "SCPM PDU vectors (profile sections 6, 7). cases[]: op name, txid and fields "
            "(ints, or hex for byte fields) with the PADATA encoding `padata` (hex). bad[]: "
            "PADATA (hex) and the error number a decoder must report (18 ERR_MALFORMED, "
            "22 ERR_UNKNOWN_OP)."),
        "cases": cases,
        "bad": [{"padata": p, "error": e} for p, e in bad],
    }


def snf() -> dict:
    seqs = [
        ("in-order", [1, 2, 3, 4]),
        ("zero", [0, 1, 0]),
        ("replay", [1, 2, 2, 1]),
        ("reorder-in-window", [5, 3, 4, 1, 2, 5]),
        ("window-edge", [40, 8, 7, 9, 8, 39, 40, 41]),
        ("jump", [1, 100, 68, 67, 99, 101, 1]),
        ("big-jump", [3, 1000000, 999968, 999967, 4000000000, 0xFFFFFFFE]),
        ("first-high", [33, 1, 2, 33, 34]),
    ]
    def feed(w: C.ReplayWindow, seq) -> list[dict]:
        steps = []
        for s in seq:
            try:
                w.check(s)
                w.commit(s)
                steps.append({"snf": s, "result": 0, "high": w.high})
            except C.ScpmError as e:
                steps.append({"snf": s, "result": int(e.code), "high": w.high})
        return steps

    out = [{"name": name, "steps": feed(C.ReplayWindow(), seq)} for name, seq in seqs]
    out.append({"name": "after-reboot-reserved-65", "reserved": 65,
                "steps": feed(C.ReplayWindow.restore(65), (1, 33, 65, 66, 64, 66))})
    return {
        "description": (
            "SNF receiver decisions (profile section 4, WINDOW 32). sequences[]: SNFs fed in "
            "order to one fresh receiver window (or, with `reserved`, a window restored after a "
            "reboot from that flash reservation: every SNF <= reserved counts as seen). Each step: "
            "snf, result (0 accepted, else the error number: 9 ERR_SNF, 10 ERR_REPLAY, "
            "11 ERR_TOO_OLD) and the highest accepted SNF after the step."),
        "window": C.WINDOW,
        "sequences": out,
    }


def _ctx_keys() -> dict:
    return {(DEV, int(k), i, g): C.UsageKey(key_of(k, i, g)) for k, i, g in KEYS}


def corpus_expect(frame: bytes, keys: dict) -> tuple[int, bytes]:
    try:
        r = C.receive(frame, KSN, lambda sa, shd: keys.get((sa, int(shd.kind), shd.index, shd.gen)),
                      lambda sa, shd: C.ReplayWindow())
        return 0, r.padata
    except C.ScpmError as e:
        return int(e.code), b""


def craft(svc: C.Service, plain: bytes, key: C.UsageKey, snf: int = 9, kind=C.KeyKind.USER, index=0, gen=1) -> bytes:
    """A secure frame around an arbitrary body plaintext (to reach the step-5 errors)."""
    shd = C.SecureHeader(svc, kind, index, gen)
    shd_b, snf_b = shd.encode(), snf.to_bytes(4, "big")
    body = plain if svc == C.Service.AUTH else C.aes.cbc_encrypt(key.enc, C._iv(key, shd_b, snf_b, DEV, KSN), plain)
    mac = svc != C.Service.CONF
    out = bytes([C.HD_SECURE]) + DEV.to_bytes(4, "big") + KSN.to_bytes(4, "big")
    out += (8 + len(body) + (16 if mac else 0)).to_bytes(2, "big") + shd_b + snf_b + body
    return out + (C.hmac(key.mac, out)[:16] if mac else b"")


def crafted(keys: dict) -> list[tuple[str, bytes]]:
    uk = keys[(DEV, 1, 0, 1)]
    ok2 = b"\x00\x03abc" + C.bcc(b"\x00\x03abc")
    return [
        ("snf-zero-svc1", craft(C.Service.AUTH, b"\x00\x01x", uk, snf=0)),
        ("snf-zero-svc3", craft(C.Service.AUTH_CONF, b"\x00\x01x" + bytes(13), uk, snf=0)),
        ("pbc-oversize-svc1", craft(C.Service.AUTH, b"\x04\x01" + bytes(1025), uk)),
        ("pbc-short-svc1", craft(C.Service.AUTH, b"\x00\x05abc", uk)),
        ("pbc-beyond-svc3", craft(C.Service.AUTH_CONF, b"\x00\x20" + bytes(14), uk)),
        ("pbc-oversize-svc3", craft(C.Service.AUTH_CONF, b"\x04\x01" + bytes(14), uk)),
        ("pad-nonzero-svc3", craft(C.Service.AUTH_CONF, b"\x00\x03abc" + bytes(10) + b"\x01", uk)),
        ("pad-16-svc3", craft(C.Service.AUTH_CONF, b"\x00\x03abc" + bytes(27), uk)),
        ("bcc-ok-svc2", craft(C.Service.CONF, ok2 + bytes(9), uk)),
        ("bcc-bad-svc2", craft(C.Service.CONF, ok2[:-1] + bytes([ok2[-1] ^ 1]) + bytes(9), uk)),
        ("pad-nonzero-svc2", craft(C.Service.CONF, ok2 + bytes(8) + b"\x07", uk)),
        ("pbc-beyond-svc2", craft(C.Service.CONF, b"\x00\x0f" + bytes(14), uk)),
        ("no-key-gen", craft(C.Service.AUTH, b"\x00\x00", uk, gen=9)),
        ("no-key-sp-index", craft(C.Service.AUTH, b"\x00\x00", uk, kind=C.KeyKind.SP, index=4)),
        ("wrong-key", craft(C.Service.AUTH_CONF, b"\x00\x00" + bytes(14), keys[(DEV, 3, 0, 1)])),
    ]


def corpus(n_random: int = 400) -> dict:
    rnd = random.Random(24767)
    keys = _ctx_keys()
    seeds: list[bytes] = []
    for kind, index, gen in KEYS:
        uk = keys[(DEV, int(kind), index, gen)]
        for svc in C.Service:
            for n in (0, 5, 30):
                seeds.append(C.seal(DEV, KSN, C.SecureHeader(svc, kind, index, gen), 7, padata_of(n), uk))
    seeds.append(C.encode_plain(DEV, KSN, C.EnrolChallenge(5, bytes(16)).encode()))
    frames: list[tuple[str, bytes]] = [("valid", s) for s in seeds]
    for _ in range(n_random):
        s = bytearray(rnd.choice(seeds))
        how = rnd.randrange(9)
        if how == 0:
            i = rnd.randrange(len(s))
            s[i] ^= 1 << rnd.randrange(8)
            tag = f"bitflip@{i}"
        elif how == 1:
            i = rnd.randrange(len(s))
            s[i] = rnd.randrange(256)
            tag = f"byte@{i}"
        elif how == 2:
            cut = rnd.randrange(len(s))
            s = s[:cut]
            tag = f"truncate{cut}"
        elif how == 3:
            s += bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 40)))
            tag = "extend"
        elif how == 4:  # consistent BC so the frame gets past step 1.2
            s += bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 40)))
            s[9:11] = (len(s) - 11).to_bytes(2, "big")
            tag = "extend-bc"
        elif how == 5:
            i = rnd.randrange(11, 19)
            s[i] = rnd.randrange(256)
            tag = f"shd-snf@{i}"
        elif how == 6:
            s = bytearray(rnd.randrange(256) for _ in range(rnd.randrange(0, 120)))
            tag = "random"
        elif how == 7:
            s = bytearray([C.HD_SECURE]) + s[1:11] + bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 80)))
            s[9:11] = (len(s) - 11).to_bytes(2, "big")
            tag = "random-adata"
        else:
            i = rnd.randrange(1, 9)
            s[i] = rnd.randrange(256)
            tag = f"address@{i}"
        frames.append((tag, bytes(s)))
    frames += crafted(keys)
    big = bytearray(C.encode_general(C.HD_SECURE, DEV, KSN, bytes(C.MAX_ADATA)))
    frames.append(("max-adata", bytes(big)))
    frames.append(("oversize", bytes(big) + b"\0"))
    over = C.HD_SECURE.to_bytes(1, "big") + DEV.to_bytes(4, "big") + KSN.to_bytes(4, "big") + (2000).to_bytes(2, "big") + bytes(2000)
    frames.append(("oversize-bc", over))
    frames.append(("empty", b""))
    cases = []
    for tag, f in frames:
        err, padata = corpus_expect(f, keys)
        cases.append({"tag": tag, "frame": H(f), "error": err, "padata": H(padata)})
    return {
        "description": (
            "Decoder corpus (profile sections 2-4, 8): valid seeds, bit flips, byte "
            "substitutions, truncations, extensions, random ADATA, oversize and random frames. "
            "Each case is judged on its own by a receiver whose address is `me` holding "
            "`keys` (peer address, kind, index, gen, key hex) with a FRESH replay window: "
            "error = 0 and padata (hex) when steps 1-5 of section 3 pass, else the error number "
            "of section 8 (first failing check in the pinned order). A receiver must never "
            "crash, never report anything but an SCPM error, and keep serving."),
        "me": KSN,
        "keys": [{"peer": DEV, "kind": int(k), "index": i, "gen": g, "key": H(key_of(k, i, g))} for k, i, g in KEYS],
        "cases": cases,
    }


GENERATORS = {"frames": frames, "pdus": pdus, "snf": snf, "corpus": corpus}


def write(name: str, data: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {OUT / name}.json", file=sys.stderr)


def main(argv: list[str]) -> int:
    names = argv or [*GENERATORS, "transcripts"]
    for name in names:
        if name == "transcripts":
            from tessera.scpm import transcripts

            write(name, transcripts.generate())
        else:
            write(name, GENERATORS[name]())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
