#!/usr/bin/env python3
"""Enrol a fleet of SCPM devices with a key setting node, install a service provider key on
every one, and rotate their master keys.

    python examples/enrol_fleet.py --db ksn.sqlite fleet.json

fleet.json lists the devices, each with the file holding the setup key from its label
(32 hex digits; keep these files mode 0600 - a key never goes on the command line):

    [{"address": "0x0A000101", "endpoint": "192.0.2.7:24767", "setup_key_file": "labels/a.key",
      "name": "meter-a"}, ...]

A device already enrolled is not enrolled again. Exits 1 when any device failed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tessera import BatchFailed, Ksn, TesseraError, format_addr, parse_addr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fleet", type=Path, help="JSON list of devices (address, endpoint, setup_key_file, name)")
    ap.add_argument("--db", required=True, help="the KSN database (created when missing)")
    ap.add_argument("--port", type=int, default=24767, help="the KSN's UDP port (0: any free port)")
    ap.add_argument("--sp-index", type=int, default=1, help="the service provider key to install")
    ap.add_argument("--rotations", type=int, default=1, help="master key updates per device")
    args = ap.parse_args()

    fleet = json.loads(args.fleet.read_text())
    failed = 0
    with Ksn(args.db, create=True, port=args.port) as ksn:
        enrolled = {d.addr for d in ksn.devices() if d.state == "enrolled"}
        for dev in fleet:
            addr = parse_addr(dev["address"])
            if addr in enrolled:
                print(f"{format_addr(addr)}: already enrolled")
                continue
            host, _, port = dev["endpoint"].rpartition(":")
            setup_key = bytes.fromhex((args.fleet.parent / dev["setup_key_file"]).read_text().strip())
            try:
                e = ksn.enrol(addr, setup_key, host, int(port), name=dev.get("name", ""))
                print(f"{format_addr(addr)}: enrolled, master key generation {e.master_gen}")
            except TesseraError as err:
                print(f"{format_addr(addr)}: enrolment FAILED: {err}")
                failed += 1

        for k in ksn.install_sp_key(args.sp_index):
            print(f"{format_addr(k.addr)}: SP key {k.index} generation {k.gen} installed")
        for _ in range(args.rotations):
            try:
                for r in ksn.rotate():
                    print(f"{format_addr(r.addr)}: master key generation {r.old_gen} -> {r.new_gen}")
            except BatchFailed as err:
                print(f"rotation FAILED on {', '.join(map(format_addr, err.failed or []))}: {err}")
                failed += 1

        print(f"{'device':10}  {'name':10} {'master':>6}  keys")
        for d in ksn.devices():
            keys = ", ".join(f"{k} g{g}" for k, g in d.keys.items())
            print(f"{d.address}  {d.name[:10]:10} {d.master_gen:>6}  {keys}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
