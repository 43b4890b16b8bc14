#!/usr/bin/env python3
"""Run the firmware self-test on every attached board and summarise.

    python examples/selftest_all.py                   # USB boards (as esp32) and running virtual boards
    python examples/selftest_all.py --serial /dev/ttyACM0 --profile rp2040
    python examples/selftest_all.py --virtual bench-1 --virtual bench-2   # only these virtual boards

Exits 1 when any board fails or does not answer.
"""
from __future__ import annotations

import argparse
import sys

from tessera import Board, BoardError, serial_ports, virtual_boards


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serial", action="append", default=[], help="a board's serial port (repeatable; default: "
                    "every USB serial port)")
    ap.add_argument("--profile", default="esp32", help="board profile of the serial boards (default esp32)")
    ap.add_argument("--virtual", action="append", default=[], metavar="NAME",
                    help="only these running virtual boards (repeatable; default: all of them)")
    ap.add_argument("--no-virtual", action="store_true", help="skip the running virtual boards")
    args = ap.parse_args()

    if args.virtual:  # named boards only: no serial port is scanned
        boards = [b for b in virtual_boards() if b.name in args.virtual]
        unknown = set(args.virtual) - {b.name for b in boards}
        if unknown:
            print(f"not running: {', '.join(sorted(unknown))}")
            return 1
    else:
        boards = [Board.serial(p, args.profile) for p in (args.serial or serial_ports())]
        if not args.no_virtual:
            boards += virtual_boards()
    if not boards:
        print("no boards attached")
        return 1
    failed = 0
    for b in boards:
        try:
            st = b.status()
            report = b.selftest()
        except BoardError as e:
            print(f"{b.name:16} {b.profile.name:8} NO ANSWER: {e}")
            failed += 1
            continue
        failed += not report.passed
        print(f"{b.name:16} {b.profile.name:8} firmware {st.firmware} on MicroPython {st.micropython}: "
              f"{report.summary}")
    print(f"{len(boards) - failed} of {len(boards)} boards passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
