#!/usr/bin/env python3
"""Read an application property on every enrolled device and, with --set, write it,
concurrently (asyncio), then read it back.

    python examples/property_all.py --db ksn.sqlite --prop 2 --set 0007 --kind sp --index 1

Default properties of the firmware: 1 power (written under the user key), 2 tariff (service
provider key), 3 firmware version (maker key). Exits 1 when any device failed.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

from tessera import AsyncKsn, DeviceError, ErrorCode, format_addr


async def one(ksn: AsyncKsn, addr: int, args: argparse.Namespace) -> bool:
    key = {"kind": args.kind, "index": args.index}
    try:
        before = await ksn.get(addr, args.prop, **key)
        if args.set is None:
            print(f"{format_addr(addr)}: property {args.prop} = {before.hex()}")
            return True
        await ksn.set(addr, args.prop, bytes.fromhex(args.set), **key)
        after = await ksn.get(addr, args.prop, **key)
        print(f"{format_addr(addr)}: property {args.prop} {before.hex()} -> {after.hex()}")
        return after == bytes.fromhex(args.set)
    except DeviceError as e:
        why = "the key has too little authority" if e.code == ErrorCode.AUTHORITY else str(e)
        print(f"{format_addr(addr)}: refused: {why}")
        return False


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", required=True, help="the KSN database")
    ap.add_argument("--port", type=int, default=24767, help="the KSN's UDP port (0: any free port)")
    ap.add_argument("--prop", type=int, required=True, help="property id")
    ap.add_argument("--set", metavar="HEX", help="value to write (hex)")
    ap.add_argument("--kind", default="user", choices=("user", "sp", "maker"), help="key to use (default user)")
    ap.add_argument("--index", type=int, default=0, help="SP key index")
    args = ap.parse_args()

    async with await AsyncKsn.open(args.db, port=args.port) as ksn:
        devices = [d.addr for d in await ksn.devices() if d.state == "enrolled"]
        ok = await asyncio.gather(*(one(ksn, a, args) for a in devices))
    print(f"{sum(ok)} of {len(ok)} devices OK")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
