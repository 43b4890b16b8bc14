#!/usr/bin/env python3
"""Write the content-packet vectors (docs/rmcp2-profile.md B.17) from the host encoder and
decoder, with fixed keys, IVs and Seq: rerunning rewrites identical files.

    python tools/gen_rmcp2_data_vectors.py

tests/vectors/rmcp2/data.json:
  cases    one packet per (CON_EN_DEC_ID, AUTH_ID, size): key, IV, Seq, plaintext, bytes.
  steps    receivers' lives, flat ("new" starts one, so a board parses one step at a time): key installs (with the KcRing's answer) and packets (with the
           event kind and plaintext, or the error number), in order: epoch changes 254 ->
           255 -> 1, old epochs refused, replays, an object and its failures.
tests/vectors/rmcp2/data_corpus.json:
  corpus   mutated/truncated packets against a fresh receiver holding Gen 7, each with the
           error number (0 = accepted) the host decoder gives; the firmware must agree.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import content as D

OUT = Path(__file__).resolve().parents[1] / "tests" / "vectors" / "rmcp2"
SID = bytes.fromhex("0123456789abcdef")
MAID = C.make_maid("127.0.0.1", 26032, 0x05A1)
SIZES = (0, 1, 15, 16, 17, 100, 1023, 1024)


def fixed(label: str, n: int = 16) -> bytes:
    return hashlib.sha256(b"tessera-rmcp2-data:" + label.encode()).digest()[:n]


class Rand:
    def __init__(self, label: str) -> None:
        self.label, self.i = label, 0

    def __call__(self, n: int) -> bytes:
        self.i += 1
        return fixed(f"{self.label}:{self.i}", n)


def plain(n: int, label: str) -> bytes:
    out = b""
    i = 0
    while len(out) < n:
        out += fixed(f"{label}:{i}", 32)
        i += 1
    return out[:n]


def cases() -> list[dict]:
    out = []
    for enc in (1, 2):
        for auth in (1, 2):
            for size in SIZES:
                name = f"enc{enc}-auth{auth}-{size}"
                key, iv, p = fixed("kc:" + name), fixed("iv:" + name), plain(size, name)
                gen, seq = 1 + size % 255, 1 + size * 7
                pkt = D.seal_packet(SID, MAID, D.Kind.STREAM, enc, auth, gen, key, seq, iv, p)
                out.append({"name": name, "enc": enc, "auth": auth, "gen": gen, "key": key.hex(), "seq": seq,
                            "iv": iv.hex(), "kind": 1, "plain": p.hex(), "packet": pkt.hex()})
    return out


class Script:
    """Runs steps through a host Decoder and records what it answered."""

    def __init__(self, name: str, enc: int, auth: int) -> None:
        self.ring = D.KcRing(enc, auth)
        self.dec = D.Decoder(SID, self.ring, max_object=4096)
        self.enc = D.Encoder(SID, MAID, enc, auth, Rand(name))
        self.name = name
        self.steps: list[dict] = [{"op": "new", "script": name, "enc": enc, "auth": auth, "max_object": 4096}]
        self.keys: dict[int, bytes] = {}

    def key(self, gen: int, tag: str = "") -> bytes:
        return fixed(f"{self.name}:kc{gen}{tag}")

    def install(self, gen: int, tag: str = "") -> None:
        k = self.key(gen, tag)
        ok = self.ring.install(gen, k)
        self.steps.append({"op": "install", "gen": gen, "key": k.hex(), "result": ok,
                                  "gens": list(self.ring.gens())})

    def rx(self, pkt: bytes) -> None:
        step = {"op": "rx", "packet": pkt.hex()}
        try:
            ev = self.dec.receive(pkt)
            step.update(error=0, kind=int(ev.kind), plain=ev.data.hex())
        except C.Rmcp2Error as e:
            step.update(error=int(e.code))
        step["gens"] = list(self.ring.gens())
        self.steps.append(step)

    def use(self, gen: int, tag: str = "") -> None:
        self.enc.set_key(gen, self.key(gen, tag))


def scripts() -> list[dict]:
    out = []
    for enc, auth in ((1, 1), (2, 1), (1, 2), (2, 2)):
        s = Script(f"epochs-{enc}{auth}", enc, auth)
        s.install(254)
        s.use(254)
        first = s.enc.stream(b"under 254")
        s.rx(first)
        s.rx(first)  # replay
        s.install(255)  # next
        s.install(253)  # behind: refused
        s.rx(s.enc.stream(plain(300, "a")))  # still 254
        s.use(255)
        p255 = s.enc.stream(b"first under 255")
        s.use(254)
        late254 = s.enc.stream(b"late under 254")
        s.rx(p255)  # switches: 254 dropped
        s.rx(late254)  # KEY
        s.install(1)  # 255 -> 1
        s.use(1)
        s.rx(s.enc.stream(plain(1024, "b")))
        s.install(1, "other")  # same Gen, another key: replaces (SMA restarted)
        s.install(40)  # further ahead (urgent rotation, or the RMA was away): next, switched by the first packet
        s.use(40)
        obj = list(s.enc.object(plain(2500, "obj"), chunk=1000))
        for p in obj:
            s.rx(p)
        s.rx(obj[1])  # replayed chunk
        out += s.steps
    # object failures, one script
    s = Script("objects", 2, 1)
    s.install(9)
    s.use(9)
    data = plain(2100, "o2")
    obj = list(s.enc.object(data, chunk=700))
    s.rx(obj[0])
    s.rx(obj[2])  # gap: OBJECT
    s.rx(obj[3])  # no object open: OBJECT
    # a forged END (right key, wrong digest): only a group member could do this
    good = list(s.enc.object(data, chunk=1024))
    for p in good[:-1]:
        s.rx(p)
    kc = s.key(9)
    s.rx(D.seal_packet(SID, MAID, D.Kind.OBJ_END, 2, 1, 9, kc, s.enc.seq_object, fixed("iv-end"),
                       hashlib.sha256(b"not it").digest()))
    big = list(s.enc.object(plain(5000, "big"), chunk=1024))
    s.rx(big[0])  # larger than max_object
    s.rx(big[1])
    short = D.seal_packet(SID, MAID, D.Kind.OBJ_BEGIN, 2, 1, 9, kc, s.enc.seq_object + 1, fixed("iv-b"), b"\x00\x00\x00\x05")
    s.enc.seq_object += 1
    s.rx(short)
    s.rx(D.seal_packet(SID, MAID, D.Kind.OBJ_END, 2, 1, 9, kc, s.enc.seq_object + 1, fixed("iv-e"),
                       hashlib.sha256(b"").digest()))  # shorter than announced
    out += s.steps
    return out


def corpus() -> list[dict]:
    rnd = random.Random(13)
    key = fixed("corpus-kc")
    base = []
    for enc in (1, 2):
        e = D.Encoder(SID, MAID, enc, 1, Rand(f"corpus{enc}"))
        e.set_key(7, key)
        base += [e.stream(plain(n, f"c{n}")) for n in (0, 5, 16, 40, 200, 1024)]
        base += list(e.object(plain(30, "co"), chunk=16))
    items = []

    def verdict(pkt: bytes, enc: int) -> int:
        ring = D.KcRing(enc, 1)
        ring.install(7, key)
        try:
            D.Decoder(SID, ring).receive(pkt)
            return 0
        except C.Rmcp2Error as x:
            return int(x.code)

    for pkt in base:
        enc = pkt[21]
        muts = [pkt]
        for _ in range(20):
            b = bytearray(pkt)
            op = rnd.randrange(6)
            if op == 0:
                b = b[:rnd.randrange(len(b))]
            elif op == 1:
                i = rnd.randrange(len(b))
                b[i] ^= 1 << rnd.randrange(8)
            elif op == 2:
                b += bytes(rnd.randrange(1, 40))
                b[2:4] = len(b).to_bytes(2, "big")
            elif op == 3:
                i = rnd.randrange(20, 28)
                b[i] = rnd.randrange(256)
            elif op == 4:
                b[2:4] = rnd.randrange(65536).to_bytes(2, "big")
            else:
                b = bytearray(rnd.randbytes(rnd.randrange(0, 1200)))
            muts.append(bytes(b))
        items += [{"enc": enc, "packet": m.hex(), "error": verdict(m, enc)} for m in muts]
    big = bytes(D.MAX_PACKET + 1)
    items.append({"enc": 1, "packet": big.hex(), "error": verdict(big, 1)})
    return items


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    doc = {"session_id": SID.hex(), "maid": MAID.hex(), "cases": cases(), "steps": scripts()}
    (OUT / "data.json").write_text(json.dumps(doc, indent=1) + "\n")
    (OUT / "data_corpus.json").write_text(json.dumps({"key": fixed("corpus-kc").hex(), "gen": 7,
                                                       "corpus": corpus()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
