#!/usr/bin/env python3
"""Check a device's crypto against the host's: every AES and HMAC known-answer vector of
tests/vectors/crypto is computed on the board (the firmware's tessera_fw.crypto, on the
board's cryptolib/hashlib) and on the host (tessera.crypto, on `cryptography`), and both
are compared with the vector.

    python examples/check_vectors.py --virtual bench-1
    python examples/check_vectors.py --serial /dev/ttyUSB0 --profile esp32

Exits 1 on any disagreement.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tessera import Board
from tessera.crypto import aes, mac

VECTORS = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "crypto"

# Runs on the board: reads (kind, args...) cases as JSON, prints the results as one JSON list.
BOARD_CODE = """
import json
from binascii import hexlify, unhexlify
from tessera_fw.crypto import aes, hmac
out = []
for c in json.loads({cases!r}):
    a = [unhexlify(x) for x in c[2:]]
    if c[0] == 'hmac':
        out.append(hexlify(hmac.hmac(a[0], a[1], c[1])).decode() if hmac.available(c[1]) else None)
    elif c[1] == 'ecb':
        out.append(hexlify(aes.ecb_encrypt(a[0], a[1])).decode())
    else:
        out.append(hexlify(aes.cbc_encrypt(a[0], a[1], a[2])).decode())
print(json.dumps(out))
"""


def cases() -> list[tuple[str, list[str], str, bytes]]:
    """(name, board case, expected hex, host result)"""
    out = []
    for c in json.loads((VECTORS / "hmac.json").read_text())["cases"]:
        key, data = bytes.fromhex(c["key"]), bytes.fromhex(c["data"])
        out.append((c["name"], ["hmac", c["hash"], c["key"], c["data"]], c["mac"], mac.hmac(key, data, c["hash"])))
    for c in json.loads((VECTORS / "aes.json").read_text())["cases"]:
        key, pt = bytes.fromhex(c["key"]), bytes.fromhex(c["plaintext"])
        if c["mode"] == "ecb":
            out.append((c["name"], ["aes", "ecb", c["key"], c["plaintext"]], c["ciphertext"], aes.ecb_encrypt(key, pt)))
        elif c["mode"] == "cbc":
            out.append((c["name"], ["aes", "cbc", c["key"], c["iv"], c["plaintext"]], c["ciphertext"],
                        aes.cbc_encrypt(key, bytes.fromhex(c["iv"]), pt)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--virtual", metavar="NAME", help="a running virtual board")
    g.add_argument("--serial", metavar="PORT", help="a board on a serial port")
    ap.add_argument("--profile", default="esp32", help="board profile (default esp32)")
    args = ap.parse_args()
    board = Board.virtual(args.virtual, args.profile) if args.virtual else Board.serial(args.serial, args.profile)

    todo = cases()
    got = board.eval_json(BOARD_CODE.format(cases=json.dumps([c[1] for c in todo])))
    bad = skipped = 0
    for (name, _, expected, host), dev in zip(todo, got):
        if dev is None:  # e.g. HMAC-MD5 on a board whose hashlib has no MD5
            skipped += 1
            print(f"skip  {name}: not available on the board")
            continue
        ok = dev == expected and host.hex() == expected
        bad += not ok
        print(f"{'ok' if ok else 'FAIL':5} {name}" + ("" if ok else f": board {dev}, host {host.hex()}, "
                                                      f"vector {expected}"))
    print(f"{board.name}: {len(todo) - bad - skipped} of {len(todo)} vectors agree on board and host"
          + (f", {skipped} not available on the board" if skipped else "") + (f", {bad} DISAGREE" if bad else ""))
    return 1 if bad or len(got) != len(todo) else 0


if __name__ == "__main__":
    sys.exit(main())
