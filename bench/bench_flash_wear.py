"""Flash wear of the SCPM device key store on rp2's LittleFS (issue 9 #7).

Runs the real littlefs C code (PyPI littlefs-python) with MicroPython's rp2 configuration:
4096-byte blocks, 212 blocks (Pico W: 848 KB), read_size 32, prog_size 256 (rp2 _boot.py),
cache_size 4 * max(read, prog) = 1024, lookahead 32, block_cycles 100 (extmod/vfs_lfsx.c).
Each save is what FileFS.write does: open "wb", write the slot image, close. The block device
counts erases per block. Old layout: the JSON record (~900 B) in two A/B slot files per save.
New layout: the counters image (14 B per key/peer entry) per save, plus one keys image write
per KEYS_EVERY saves. Projection for 10 years at one frame per second: the device writes
once per 64 received and once per 64 sent frames per (key, peer), so 2 / 64 saves per frame.

    .venv/bin/python bench/bench_flash_wear.py [--saves N] [--peers P] [--layout both|old|new]

The worst block is scaled linearly from the simulated saves: pessimistic for a short run
(a metadata pair moves only every block_cycles erases), so longer runs give lower figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from littlefs import LittleFS, UserContext

BLOCK, BLOCKS = 4096, 212
FRAMES_10Y = 10 * 365 * 24 * 3600  # one frame per second
SAVES_10Y = FRAMES_10Y * 2 // 64
KEYS_EVERY = 2000  # a key change per 2000 counter saves (one a day at 1 frame/s): generous


class CountingContext(UserContext):
    def __init__(self) -> None:
        super().__init__(BLOCK * BLOCKS)
        self.erases = [0] * BLOCKS

    def erase(self, cfg, block):
        self.erases[block] += 1
        return super().erase(cfg, block)


def new_fs():
    ctx = CountingContext()
    fs = LittleFS(ctx, block_size=BLOCK, block_count=BLOCKS, read_size=32, prog_size=256,
                  cache_size=1024, lookahead_size=32, block_cycles=100)
    # the rest of a deployed board: firmware files (~60 KB) and its config
    for i in range(12):
        with fs.open(f"lib_{i}.mpy", "wb") as f:
            f.write(os.urandom(5000))
    with fs.open("scpm.json", "wb") as f:
        f.write(b'{"address": "0a000002", "setup_key": "404142434445464748494a4b4c4d4e4f", "port": 24767}')
    ctx.erases = [0] * BLOCKS
    return fs, ctx


def slot_image(body_len: int) -> bytes:
    return os.urandom(6 + body_len + 8)


def json_record_len(peers: int) -> int:
    keys = [[1, 0, 1, "20" * 16], [2, 3, 2, "33" * 16], [3, 0, 1, "55" * 16], [4, 0, 1, "10" * 16]]
    snf = [[1, 0, 1, 0x0B000001 + i, 4294901824, 1073745920] for i in range(peers)]
    return len(json.dumps({"v": 1, "keys": keys, "snf": snf, "ksn": 1}))


def run(saves: int, old: bool, peers: int) -> tuple[float, int, int]:
    fs, ctx = new_fs()
    if old:
        img, names = slot_image(json_record_len(peers)), ("scpm_a.bin", "scpm_b.bin")
    else:
        img, names = slot_image(4 + 14 * peers), ("scpm_c.bin", "scpm_d.bin")
        keys = slot_image(6 + 4 * 18 + 1 + 14 * peers)
    for i in range(saves):
        if not old and i % KEYS_EVERY == 0:
            with fs.open(("scpm_a.bin", "scpm_b.bin")[(i // KEYS_EVERY) & 1], "wb") as f:
                f.write(keys)
        with fs.open(names[i & 1], "wb") as f:
            f.write(img)
    return sum(ctx.erases) / saves, max(ctx.erases), len(img)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--saves", type=int, default=20000, help="saves simulated per layout")
    ap.add_argument("--peers", type=int, default=8, help="(key, peer) entries in the record")
    ap.add_argument("--layout", choices=("both", "old", "new"), default="both")
    a = ap.parse_args()
    print("## SCPM key store flash wear (rp2 LittleFS)\n")
    print(f"Real littlefs (littlefs-python) with the rp2 port's mount settings: {BLOCKS} x {BLOCK} B blocks, "
          f"prog 256, read 32, cache 1024, lookahead 32, block_cycles 100; {a.peers} (key, peer) entries; "
          f"{a.saves:,} saves simulated per layout, projected to 10 years at one frame per second "
          f"({SAVES_10Y:,} saves). The most-erased block is scaled linearly from the run, which overstates it "
          f"for short runs (docs/scpm-firmware.md \"Flash wear\" has the 200,000-save figures).\n")
    print("| layout | image | erases per save | 10 years: average per block | most-erased block |")
    print("| --- | --- | --- | --- | --- |")
    for old in {"both": (True, False), "old": (True,), "new": (False,)}[a.layout]:
        print(f"running the {'old' if old else 'new'} layout ...", file=sys.stderr, flush=True)
        per, worst, size = run(a.saves, old, a.peers)
        name = "JSON record, one file per save" if old else "counters image (+ keys image per 2000 saves)"
        print(f"| {name} | {size} B | {per:.4f} | {SAVES_10Y * per / BLOCKS:,.0f} | {worst * SAVES_10Y / a.saves:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
