#!/usr/bin/env python3
"""Collect an ASM security log: pull every new record from a responder (a projector's or a
link decryptor's secure processing block) into a local SQLite database, then list what was
collected, with the times corrected for the responder's clock.

    python examples/asm_log.py --host 192.0.2.9 --pki pki --name sm1 --db sm-log.db

--pki is a directory made by `tessera pki create` (the initiator's leaf <name>.pem/.key and
root.pem). Running it again collects only what is new.
"""
from __future__ import annotations

import argparse
import sys
import time
import xml.etree.ElementTree as ET

from tessera import Asm, AsmError, collected_records, pki_credentials


def describe(xml: bytes) -> str:
    """EventType/EventSubType of a log record (SMPTE 430-4 style XML), namespaces ignored."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return "(not XML)"
    found = {el.tag.rsplit("}", 1)[-1]: (el.text or "").strip() for el in root.iter()}
    return "/".join(x for x in (found.get("EventType"), found.get("EventSubType")) if x) or "(no event type)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1", help="the responder's address")
    ap.add_argument("--port", type=int, default=1173, help="the responder's port (default 1173)")
    ap.add_argument("--pki", required=True, help="PKI directory (tessera pki create)")
    ap.add_argument("--name", default="initiator", help="our leaf in --pki (default initiator)")
    ap.add_argument("--db", required=True, help="the collection database (created when missing)")
    args = ap.parse_args()

    label = f"{args.host}:{args.port}"
    try:
        with Asm(args.host, args.port, creds=pki_credentials(args.pki, args.name)) as asm:
            spb = asm.query_spb()
            res = asm.collect(args.db, label)
    except AsmError as e:
        print(f"{label}: {e}")
        return 1
    print(f"{label}: status {spb.status}; window {res.window}: {res.listed} listed, {res.stored} new, "
          f"{res.duplicates} already held")
    if res.clock_offset:
        print(f"responder clock offset {res.clock_offset.offset:+.1f} s (+/- {res.clock_offset.uncertainty:.1f} s)")
    records = collected_records(args.db, label)
    for r in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.ts_corrected)) if r.ts_corrected else "?"
        print(f"  event {r.event_id:>5}  {when} UTC  {describe(r.xml)}")
    print(f"{len(records)} record(s) held for {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
