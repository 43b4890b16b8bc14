"""`tessera asm`: the ASM responder and initiator (SMPTE 430-6) from the command line."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import sqlite3
import ssl
import stat
from pathlib import Path

from tessera.asm.codec import LEKey
from tessera.asm.net import INITIATOR_ROLES, RESPONDER_ROLES
from tessera.asm.tls import ASM_PORT, Credentials
from tessera.cliargs import port as port_arg
from tessera.errors import TesseraError
from tessera.paths import var_dir

log = logging.getLogger("tessera.asm")


def _creds(args: argparse.Namespace, default_name: str) -> Credentials:
    if args.pki:
        d = Path(args.pki)
        name = args.name or default_name
        cert, key, trust = d / f"{name}.pem", d / f"{name}.key", d / "root.pem"
    else:
        if not (args.cert and args.key and args.trust):
            raise TesseraError("give --pki DIR [--name NAME], or --cert, --key and --trust")
        cert, key, trust = Path(args.cert), Path(args.key), Path(args.trust)
    for p in (cert, key, trust):
        if not p.exists():
            raise TesseraError(f"missing file: {p}")
    return Credentials(cert, key, trust)


def _positive(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"a positive integer, got {s!r}")
    return n


def _role(s: str) -> str:
    if not s or not s.isupper() or not s.isalnum():
        raise argparse.ArgumentTypeError(f"a role is upper-case letters/digits, e.g. SM or LD; got {s!r}")
    return s


def _add_large_records(p: argparse.ArgumentParser, peer: str) -> None:
    p.add_argument("--large-handshake-records", action="store_true",
                   help=f"accept TLS handshake records above 512 bytes (up to 16384) from {peer} without a "
                   "512-byte fragment limit, e.g. stock OpenSSL; application data keeps the 512-byte limit. "
                   "Off by default: clause 6.1 fixes the record size at 512 (a warning is logged when used)")


def _add_creds(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("credentials")
    g.add_argument("--pki", metavar="DIR", help="a directory made by `tessera pki create`")
    g.add_argument("--name", help="leaf name inside --pki (default: initiator / responder)")
    g.add_argument("--cert", help="PEM: our certificate followed by its intermediates")
    g.add_argument("--key", help="PEM private key")
    g.add_argument("--trust", help="PEM trusted root(s)")


# --------------------------------------------------------------------------- responder
def cmd_responder(args: argparse.Namespace) -> int:
    from tessera.api.asm import AsmResponder

    db = Path(args.db or var_dir() / "asm-responder.db")

    async def main() -> None:
        r = AsmResponder(_creds(args, "responder"), db, args.host, args.port, key_capacity=args.capacity,
                         persist_keys=Path(args.persist_keys) if args.persist_keys else None, budget=args.budget,
                         initiator_roles=frozenset(args.initiator_role or INITIATOR_ROLES),
                         large_handshake_records=args.large_handshake_records,
                         max_connections=args.max_connections,
                         max_connections_per_source=args.max_connections_per_source)
        try:
            port = await r.start()
            print(f"ASM responder on {args.host}:{port}, security log {db}", flush=True)
            await r.serve_forever()
        finally:
            await r.stop()

    try:
        asyncio.run(main())
    except (OSError, ssl.SSLError, ValueError, sqlite3.Error) as exc:
        raise TesseraError(f"responder: {exc}") from None
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Drive the responder's QuerySPB status (clause 7.5) through its database."""
    from tessera.api.asm import set_spb_status

    print(set_spb_status(Path(args.db or var_dir() / "asm-responder.db"), args.state, args.reason))
    return 0


# --------------------------------------------------------------------------- initiator
def _keys_from(args: argparse.Namespace) -> list[LEKey]:
    keys: list[LEKey] = []
    if args.keys_file:
        try:
            mode = stat.S_IMODE(os.stat(args.keys_file).st_mode)
        except OSError:
            mode = 0
        if mode & 0o077:  # issue 11 #13: LE keys in clear belong in a private file
            log.warning("security: keys file %s is readable by group or others (mode %o); it holds LE keys in "
                        "clear: chmod 600 it", args.keys_file, mode)
        try:
            for k in json.loads(Path(args.keys_file).read_text()):
                keys.append(LEKey(int(k["id"]), bytes.fromhex(k["key"]), int(k.get("expire", args.expire)),
                                  int(k["attribute"]) if "attribute" in k else int.from_bytes(secrets.token_bytes(8), "big")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TesseraError(f"bad keys file {args.keys_file}: {type(exc).__name__}") from None
    for i in range(args.random):
        # attribute data: the AES counter-mode seed, unique random per key (clause 8.1)
        keys.append(LEKey(args.first_id + i, secrets.token_bytes(16), args.expire,
                          int.from_bytes(secrets.token_bytes(8), "big")))
    if not keys:
        raise TesseraError("no keys: give --random N or --keys-file FILE")
    return keys


async def _client(args: argparse.Namespace) -> int:
    from tessera.api.asm import AsmClient, AsmRefused

    keys = _keys_from(args) if args.asm_command == "key-load" else []  # a bad file fails before connecting
    async with AsmClient(args.host, args.port, creds=_creds(args, "initiator"), timeout=args.timeout,
                         responder_roles=frozenset(args.responder_role or RESPONDER_ROLES),
                         large_handshake_records=args.large_handshake_records) as asm:
        c = args.asm_command
        if c == "get-time":
            print(f"time {await asm.get_time()} response successful")
        elif c == "clock-offset":
            o = await asm.clock_offset()
            print(f"responder clock offset {o.offset:+.1f} s (+/- {o.uncertainty:.1f} s), responder time {o.responder_time}")
        elif c == "event-list":
            ids = await asm.event_ids(args.start, args.stop)
            print(f"{len(ids)} event(s) in [{args.start}, {args.stop}]: {' '.join(map(str, ids))}")
        elif c == "event-id":
            try:
                print((await asm.event(args.event_id)).decode("utf-8", "replace"))
            except AsmRefused as exc:
                print(f"response {exc.response}")
                return 1
        elif c == "query-spb":
            r = await asm.query_spb()
            print(f"protocol {r.protocol_version} status {r.status} response {r.response}")
        elif c == "key-load":
            try:
                overflow = await asm.load_keys(keys)
            except AsmRefused as exc:
                print(f"loaded {len(keys)} key(s) (IDs {keys[0].key_id}..{keys[-1].key_id}): response {exc.response}")
                return 1
            print(f"loaded {len(keys)} key(s) (IDs {keys[0].key_id}..{keys[-1].key_id}): overflow {overflow} "
                  "response successful")
        elif c == "key-query":
            print(f"key {args.key_id} {'present' if await asm.has_key(args.key_id) else 'absent'}")
        elif c == "key-query-all":
            ids = await asm.key_ids()
            print(f"{len(ids)} key(s): {' '.join(map(str, ids))}")
        elif c == "key-purge":
            print(f"key {args.key_id} {'purged' if await asm.purge_key(args.key_id) else 'was not there'}")
        elif c == "key-purge-all":
            await asm.purge_all_keys()
            print("all keys purged: response successful")
        elif c == "collect":
            def progress(stored: int, listed: int, window: tuple[int, int]) -> None:
                log.info("collect: page [%d, %d] done; %d listed, %d stored so far", *window, listed, stored)

            res = await asm.collect(Path(args.db or var_dir() / "asm-initiator.db"),
                                    args.responder or f"{args.host}:{args.port}", progress)
            print(f"window {res.window}: {res.listed} listed, {res.stored} stored, {res.duplicates} already held")
            if res.clock_offset:
                o = res.clock_offset
                print(f"responder clock offset {o.offset:+.1f} s (+/- {o.uncertainty:.1f} s): stored records carry "
                      f"raw and corrected times")
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    return asyncio.run(_client(args))  # failures are tessera.api.asm.AsmError: TesseraError, exit 2


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("asm", help="Auditorium Security Messages (SMPTE 430-6) responder and initiator",
                       description="ASM over the constrained TLS 1.0 profile: run a responder, or send "
                       "requests to one as the initiator (Security Manager).")
    s = p.add_subparsers(dest="asm_command", metavar="ACTION", required=True)
    r = s.add_parser("responder", help="run a responder (remote SPB with an LE key store)")
    _add_creds(r)
    r.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    r.add_argument("--port", type=port_arg, default=ASM_PORT, help="default 1173 (clause 6.4)")
    r.add_argument("--db", help="security log database (default var/asm-responder.db)")
    r.add_argument("--capacity", type=int, default=16, help="LE key slots (at least 16)")
    r.add_argument("--persist-keys", metavar="FILE", help="keep LE keys in this SQLite file, sealed with AES-256-GCM under the key "
                   "in $TESSERA_ASM_STORE_KEY (64 hex digits) or FILE.key (made 0600 if absent); "
                   "default: memory only")
    r.add_argument("--budget", type=float, default=2.0, help="request-to-response limit in seconds")
    r.add_argument("--initiator-role", type=_role, action="append", metavar="ROLE",
                   help=f"leaf CN role accepted from initiators (repeatable; default {','.join(sorted(INITIATOR_ROLES))})")
    r.add_argument("--max-connections", type=_positive, default=64, metavar="N",
                   help="connections held at once (default 64); at the cap the oldest handshake of the busiest "
                   "source is dropped, and a new connection is refused if all are authenticated")
    r.add_argument("--max-connections-per-source", type=_positive, default=8, metavar="N",
                   help="connections held at once per source address (default 8)")
    _add_large_records(r, "initiators")
    r.set_defaults(func=cmd_responder)

    st = s.add_parser("status", help="set or show the responder's QuerySPB status (via its database)")
    st.add_argument("state", nargs="?", choices=("not-playing", "playing", "alert"),
                    help="the new status; without it, show the current one")
    st.add_argument("--reason", help="logged with an alert")
    st.add_argument("--db", help="responder database (default var/asm-responder.db)")
    st.set_defaults(func=cmd_status)

    def client(name: str, help: str) -> argparse.ArgumentParser:
        c = s.add_parser(name, help=help)
        _add_creds(c)
        c.add_argument("--host", default="127.0.0.1", help="responder address (default 127.0.0.1)")
        c.add_argument("--port", type=port_arg, default=ASM_PORT, help="responder port (default 1173, clause 6.4)")
        c.add_argument("--timeout", type=float, default=2.0, help="seconds before a link failure")
        c.add_argument("--responder-role", type=_role, action="append", metavar="ROLE",
                       help=f"leaf CN role accepted from the responder (repeatable; default {','.join(sorted(RESPONDER_ROLES))})")
        _add_large_records(c, "a responder")
        c.set_defaults(func=cmd_client)
        return c

    client("get-time", "GetTime (clause 7.2)")
    client("clock-offset", "measure the responder clock against ours with GetTime")
    c = client("event-list", "GetEventList over an inclusive UTC window (clause 7.3)")
    c.add_argument("--start", type=int, default=0, help="window start, UTC seconds since 1970 (default 0)")
    c.add_argument("--stop", type=int, default=0xFFFFFFFF, help="window end, inclusive (default: the largest UInt32)")
    client("event-id", "GetEventID: print one log record (clause 7.4)").add_argument("event_id", type=int, help="an Event ID from event-list")
    client("query-spb", "QuerySPB (clause 7.5)")
    c = client("key-load", "LEKeyLoad (clause 8.1)")
    c.add_argument("--random", type=int, default=0, metavar="N", help="load N fresh random keys")
    c.add_argument("--first-id", type=int, default=1, help="key ID of the first --random key (default 1)")
    c.add_argument("--expire", type=int, default=3600, help="seconds of validity")
    c.add_argument("--keys-file", help='JSON list of {"id", "key" (hex), "expire", "attribute"}')
    client("key-query", "LEKeyQueryID (clause 8.2)").add_argument("key_id", type=int, help="the LE key ID to look for")
    client("key-query-all", "LEKeyQueryAll (clause 8.3)")
    client("key-purge", "LEKeyPurgeID (clause 8.4)").add_argument("key_id", type=int, help="the LE key ID to purge")
    client("key-purge-all", "LEKeyPurgeAll (clause 8.5)")
    c = client("collect", "pull the responder's security log into the initiator database")
    c.add_argument("--db", help="initiator database (default var/asm-initiator.db)")
    c.add_argument("--responder", help="label of this responder in the database (default host:port)")
