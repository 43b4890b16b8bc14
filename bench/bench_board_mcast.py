"""Heap cost of the board's multicast reception (board_rx / board_mc, docs/rmcp2.md
"Multicast reception"), in the MicroPython unix port under the ESP32 profile's 112 KB heap,
from the .mpy build a board is deployed with: gc.mem_alloc() after gc.collect() around
importing board_rx (every board with content), importing board_mc (only a board that names a
group) and joining the group (its socket, membership and poll entry). The join runs inside a
network namespace of its own (root and iproute2's ip; otherwise that row says why it is
missing). Prints one Markdown section (bench/run.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "host"))

from tessera.boards import build  # noqa: E402
from tessera.boards.interp import micropython_path  # noqa: E402

HEAP = 112 * 1024
SCRIPT = """
import gc, select
from tessera_fw.rmcp2 import content
gc.collect(); a = gc.mem_alloc()
from tessera_fw.rmcp2 import board_rx
gc.collect(); b = gc.mem_alloc()
from tessera_fw.rmcp2.board_mc import join, leave
gc.collect(); c = gc.mem_alloc()
so = join((bytes([239, 13, 0, 9]), 26099, bytes(4)), print) if JOIN else None
if so is not None:
    p = select.poll(); p.register(so, 1)
gc.collect(); d = gc.mem_alloc()
print(b - a, c - b, d - c if so is not None else -1)
"""


def run(mpy: Path, ns: str | None) -> list[int]:
    code = SCRIPT.replace("JOIN", "True" if ns else "False")
    argv = [micropython_path(), "-X", f"heapsize={HEAP}", "-c", code]
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=dict(os.environ, MICROPYPATH=str(mpy)))
    if out.returncode:
        raise SystemExit(out.stderr)
    return [int(x) for x in out.stdout.split()[-3:]]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mpy = build.compile_firmware(None, Path(tmp)).out_dir
        ns = None
        why = ""
        if shutil.which("ip") and os.geteuid() == 0:
            ns = f"tsr-bench-{os.getpid()}"
            steps = (("netns", "add", ns), ("-n", ns, "link", "set", "lo", "up"),
                     ("-n", ns, "route", "add", "224.0.0.0/4", "dev", "lo"))
            for st in steps:
                r = subprocess.run(["ip", *st], capture_output=True, text=True)
                if r.returncode:
                    why = r.stderr.strip()
                    break
        else:
            why = "needs root and iproute2's ip"
        try:
            rx, mc, sock = run(mpy, None if why else ns)
        finally:
            if ns:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    print("## Board multicast reception: heap\n")
    print(f"MicroPython unix port, `-X heapsize={HEAP // 1024}K`, .mpy build, `gc.mem_alloc()` after `gc.collect()`.\n")
    print("| what | bytes | held by |")
    print("|---|---:|---|")
    print(f"| `board_rx.py` code | {rx} | every board taking content, while a control link runs |")
    print(f"| `board_mc.py` code | {mc} | a board whose rmcp2.json names `\"mcast\"` |")
    print(f"| group socket + membership + poll entry | {sock if not why else 'not measured: ' + why} | the same |")


if __name__ == "__main__":
    main()
