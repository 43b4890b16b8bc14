"""Firmware crypto core in MicroPython under the ESP32 heap, side by side with the bare
cryptolib / hashlib calls on the same data; DH group 14 timing; self-test heap; .mpy sizes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tessera.boards import build, profile
from tessera.boards.interp import micropython_path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    prof = profile.load("esp32")
    print(f"running MicroPython crypto bench under heap {prof.heap_bytes} ...", file=sys.stderr)
    out = subprocess.run(
        [micropython_path(), "-X", f"heapsize={prof.heap_bytes}", str(ROOT / "bench/mpy/crypto_bench.py"), str(ROOT)],
        check=True, capture_output=True, text=True, timeout=600,
    ).stdout
    rows = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    print("## Crypto core (firmware, MicroPython unix port)\n")
    print(f"Heap limit {prof.heap_bytes} bytes (esp32 profile). Each row times our firmware call and the bare "
          "cryptolib/hashlib work on the same data in the same interpreter run (best of 5).\n")
    print("| operation | bytes | ours (µs) | bare (µs) | ratio | ours MB/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "size" in r:
            print(f"| {r['op']} | {r['size']} | {r['ours_us']:.1f} | {r['raw_us']:.1f} | "
                  f"{r['ours_us'] / r['raw_us']:.2f}x | {r['size'] / r['ours_us']:.1f} |")
    print("\nBare references: aes-cbc = one `cryptolib.aes(key, 2, iv).encrypt(data, out)`; "
          "aes-ctr-from-ecb = one ECB call over the same number of blocks (the keystream alone; "
          "CTR adds counter blocks and the XOR); hmac-sha256 = the two SHA-256 passes HMAC needs.\n")
    print("| DH group 14 (2048-bit) | exponent bits | key generation (ms) | agreement (ms) |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        if r["op"] == "dh-group14":
            print(f"| {'short (used)' if r['exp_bits'] == 256 else 'full length'} | {r['exp_bits']} | {r['keygen_ms']} | {r['agree_ms']} |")
    st = next(r for r in rows if r["op"] == "selftest")
    print(f"\nSelf-test under the {prof.heap_bytes}-byte heap: `{st['summary']}` "
          "(peak_heap: most heap in use above the starting point, seen between checks; retained: still allocated afterwards).\n")
    print("On a board, interpreted code runs roughly 100x slower than here (reference/micropython.md); "
          "the ratios, not the absolute times, are what carry over.\n")
    print("### Firmware size (.mpy from mpy-cross)\n")
    print("| board | arch | modules | bytes | flash budget | used |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for p in profile.load_all():
        res = build.compile_firmware(p.mpy_arch)
        print(f"| {p.name} | {p.mpy_arch} | {len(res.files)} | {res.total} | {p.flash_budget_bytes} | "
              f"{100 * res.total / p.flash_budget_bytes:.1f}% |")


if __name__ == "__main__":
    main()
