"""`tessera ksn ...`: the SCPM key setting node.

Every command except `serve` and `list` runs against a running `tessera ksn serve` (through
its control socket next to the database) when there is one, else it opens the database,
binds the KSN's UDP port for the duration of the command, and exits.
"""
from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tessera.api.ksn import AsyncKsn, KsnEndpoint, format_addr, list_devices, parse_addr, serve_ksn
from tessera.errors import TesseraError
from tessera.scpm import codec as C
from tessera.scpm.control import control_path
from tessera.scpm.ksn import Timing
from tessera.scpm.server import _hex_key
from tessera.scpm.store import default_db

log = logging.getLogger("tessera.scpm")


def _db(args: argparse.Namespace, create: bool = False) -> Path:
    """The KSN database. Only `serve` and `enrol` may create it: every other command on a
    path that holds none is a typo, and must not leave an empty database (and a new
    storage key) behind."""
    db = Path(args.db) if args.db else default_db()
    if not create and not db.exists():
        raise TesseraError(f"no KSN database at {db} (`tessera ksn enrol` or `tessera ksn serve` creates one; "
                           "--db chooses another)")
    return db


def _endpoint(s: str) -> tuple[str, int]:
    host, sep, port = s.rpartition(":")
    if not sep or not host:
        raise TesseraError(f"bad endpoint {s!r}: use HOST:PORT, e.g. 127.0.0.1:24767")
    try:
        return host, int(port)
    except ValueError:
        raise TesseraError(f"bad port in {s!r}") from None


def run_op(args: argparse.Namespace, op: Callable[[AsyncKsn], Awaitable[Any]], create: bool = False) -> Any:
    """Run one operation of the public API (tessera.api.ksn) on the serving KSN if there is
    one, else in this process; progress lines go to standard output."""
    db = _db(args, create)

    async def main():
        async with await AsyncKsn.open(db, create=create, host=args.host, port=args.port,
                                       address=parse_addr(args.address), timing=_timing(args)) as ksn:
            return await op(ksn)

    return asyncio.run(main())


SETUP_KEY_ENV = "TESSERA_KSN_SETUP_KEY"


def secret_options(p: argparse.ArgumentParser, dest: str, what: str, tail: str) -> None:
    """--X-file FILE, --X-env VAR and the deprecated --X HEX for a secret (issue 11 #13: a
    key in argv is readable by every local user in /proc/PID/cmdline)."""
    flag = "--" + dest.replace("_", "-")
    g = p.add_argument_group(f"{flag[2:]} ({what})", f"Where to read it from. {tail}")
    g.add_argument(f"{flag}-file", dest=f"{dest}_file", metavar="FILE",
                   help="read it from this file (first line); '-' reads standard input (a prompt on a terminal)")
    g.add_argument(f"{flag}-env", dest=f"{dest}_env", metavar="VAR", help="read it from this environment variable")
    g.add_argument(flag, dest=dest, metavar="HEX",
                   help="DEPRECATED: on the command line the key is visible to every local user (ps, /proc)")


def read_secret(args: argparse.Namespace, dest: str, what: str, default_env: str | None = None,
                required: bool = True) -> str | None:
    """The secret named `dest` from its file, environment variable, deprecated flag, the
    default environment variable, or a prompt on a terminal; never logged."""
    flag = "--" + dest.replace("_", "-")
    given = [n for n in (f"{dest}_file", f"{dest}_env", dest) if getattr(args, n, None) is not None]
    if len(given) > 1:
        raise TesseraError(f"give {what} one way only ({flag}-file, {flag}-env or {flag})")
    if getattr(args, dest, None) is not None:
        log.warning("warning: %s puts the key on the command line, where every local user can read it "
                    "(/proc/PID/cmdline); use %s-file, %s-env%s", flag, flag, flag,
                    " or the prompt" if required else "")
        return args.__dict__[dest].strip()
    path = getattr(args, f"{dest}_file", None)
    if path is not None:
        return _secret_from_file(path, what)
    var = getattr(args, f"{dest}_env", None) or default_env
    if var is not None and var in os.environ:
        return os.environ[var].strip()
    if getattr(args, f"{dest}_env", None):
        raise TesseraError(f"the environment variable {var} (named by {flag}-env) is not set")
    if not required:
        return None
    if sys.stdin.isatty():
        return getpass.getpass(f"{what[0].upper()}{what[1:]}: ").strip()
    raise TesseraError(f"{what} is needed: give {flag}-file FILE, {flag}-env VAR"
                       + (f", set ${default_env}" if default_env else "") + ", or run on a terminal to be asked")


def _secret_from_file(path: str, what: str) -> str:
    if path == "-":
        if sys.stdin.isatty():
            return getpass.getpass(f"{what[0].upper()}{what[1:]}: ").strip()
        return sys.stdin.readline().strip()
    try:
        st = os.stat(path)
        with open(path, encoding="ascii", errors="replace") as f:
            line = f.readline(256).strip()
    except OSError as e:
        raise TesseraError(f"cannot read {what} from {path}: {e.strerror}") from None
    if st.st_mode & 0o077:
        log.warning("warning: %s is readable by group or others; keep key files mode 0600", path)
    return line


def _timing(args: argparse.Namespace) -> Timing:
    for name in ("timeout", "dh_timeout"):
        v = getattr(args, name, None)
        if v is not None and not 0 < v <= 3600:
            raise TesseraError(f"--{name.replace('_', '-')} must be between 0 and 3600 seconds")
    if args.retries is not None and not 1 <= args.retries <= 100:
        raise TesseraError("--retries must be between 1 and 100")
    return Timing.configured(args.timeout, args.retries, args.dh_timeout)


def _targets(args: argparse.Namespace) -> list[int] | None:
    if getattr(args, "all", False):
        return None
    if not args.devices:
        raise TesseraError("name the devices (addresses) or use --all")
    return [parse_addr(a) for a in args.devices]


def cmd_serve(args: argparse.Namespace) -> int:
    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def ready(ep: KsnEndpoint) -> None:
            print(f"KSN {format_addr(ep.address)} serving on udp {ep.host}:{ep.port}, "
                  f"database {ep.db}" + (f", rotating every {args.every:g} s" if args.every else ""), flush=True)

        await serve_ksn(_db(args, create=True), args.host, args.port, address=parse_addr(args.address),
                        every=args.every, timing=_timing(args), ready=ready, stop=stop)

    asyncio.run(main())
    return 0


def cmd_enrol(args: argparse.Namespace) -> int:
    host, port = _endpoint(args.device)
    addr = parse_addr(args.addr)
    setup_key = _hex_key(read_secret(args, "setup_key", "the setup key (32 hex digits from the device label)",
                                       default_env=SETUP_KEY_ENV), "the setup key (from the device label)")
    run_op(args, lambda ksn: ksn.enrol(addr, setup_key, host, port, args.name or "", progress=print), create=True)
    return 0


def cmd_provision(kind: str):
    def run(args: argparse.Namespace) -> int:
        targets = _targets(args)
        text = read_secret(args, "key", f"the {kind} key (32 hex digits)", required=False)
        key = _hex_key(text, f"the {kind} key") if text else None
        run_op(args, lambda ksn: ksn.install_key(kind, targets, getattr(args, "index", 0), args.new, key,
                                                 progress=print))
        return 0

    return run


def cmd_rotate(args: argparse.Namespace) -> int:
    targets = _targets(args)

    def rotate(ksn: AsyncKsn):
        return ksn.rotate(targets, args.parallel, progress=print)

    if args.every:
        db = _db(args)
        if control_path(db).exists():
            raise TesseraError("a KSN server is running on this database: use `tessera ksn serve --every` there")
        args.every = float(args.every)
        print(f"rotating master keys every {args.every:g} s (Ctrl-C to stop)")
        rounds = 0
        import time

        while args.count is None or rounds < args.count:
            run_op(args, rotate)
            rounds += 1
            if args.count is None or rounds < args.count:
                time.sleep(args.every)
        return 0
    run_op(args, rotate)
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    targets = _targets(args)
    run_op(args, lambda ksn: ksn.sync(targets, progress=print))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    devs = list_devices(_db(args))
    if args.json:
        print(json.dumps([d.raw for d in devs], indent=1))
        return 0
    if not devs:
        print("no devices (enrol one with `tessera ksn enrol`)")
        return 0
    print(f"{'address':10}  {'name':12} {'endpoint':21} {'state':9} {'master':>6} {'pending':>7}  keys")
    for d in devs:
        held = ", ".join(f"{k} g{g}" for k, g in d.keys.items())
        pend = str(d.pending_gen) if d.pending_gen else "-"
        flag = "  (needs sync)" if d.needs_sync else ""
        print(f"{d.address}  {d.name[:12]:12} {f'{d.host}:{d.port}':21} {d.state:9} {d.master_gen:>6} "
              f"{pend:>7}  {held}{flag}")
    return 0


def _value(args: argparse.Namespace) -> bytes:
    if args.hex:
        try:
            return bytes.fromhex(args.value)
        except ValueError:
            raise TesseraError("--hex value must be hex digits") from None
    return args.value.encode()


def cmd_app(args: argparse.Namespace) -> int:
    addr = parse_addr(args.addr)
    kw = {"kind": args.key_kind, "index": args.index, "service": args.service, "progress": print}
    if args.app_op == "set":
        value = _value(args)
        run_op(args, lambda ksn: ksn.set(addr, args.prop, value, **kw))
    else:
        run_op(args, lambda ksn: ksn.get(addr, args.prop, **kw))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ksn", help="SCPM key setting node: enrol devices, distribute and rotate keys",
                       description="SCPM (ISO/IEC 24767-2) key setting node. Keys live encrypted in a SQLite "
                       "registry (default var/scpm-ksn.sqlite); commands use a running `tessera ksn serve` "
                       "when there is one. Wire format: docs/scpm-profile.md; design: docs/scpm.md.")
    ks = p.add_subparsers(dest="ksn_command", metavar="COMMAND", required=True)

    def common(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--db", help="KSN database (default: var/scpm-ksn.sqlite; its key file is <db>.key "
                        "unless TESSERA_KSN_KEY is set)")
        sp.add_argument("--host", default="127.0.0.1", help="local UDP address to bind (default 127.0.0.1)")
        sp.add_argument("--port", type=int, default=C.PORT, help=f"KSN UDP port (default {C.PORT})")
        sp.add_argument("--address", default=f"0x{C.KSN_ADDRESS:08X}", help="the KSN's SCPM node address")
        d = Timing()
        sp.add_argument("--timeout", type=float, metavar="SECONDS",
                        help=f"first wait for an answer to a quick request (default {d.quick.first:g} s, "
                        f"then doubling up to {d.quick.cap:g} s)")
        sp.add_argument("--dh-timeout", type=float, metavar="SECONDS",
                        help=f"first wait for the answer to MKU_START, which costs the device two DH "
                        f"exponentiations (default {d.dh.first:g} s: a Pico W needs about 5.3 s, 11 s "
                        f"just after a reboot)")
        sp.add_argument("--retries", type=int, metavar="N",
                        help=f"transmissions of each request before giving up (default {d.quick.attempts}, "
                        f"MKU_START {d.dh.attempts})")
        return sp

    s = common(ks.add_parser("serve", help="run the KSN UDP service", description="Serve devices on UDP; runs a "
                             "SYNC for every device left mid-update by a crash, answers device-requested master "
                             "key updates, and accepts the other commands through a control socket."))
    s.add_argument("--every", type=float, metavar="SECONDS", help="also rotate every device's master key this often")
    s.set_defaults(func=cmd_serve)

    s = common(ks.add_parser("enrol", help="enrol a device with the setup key from its label",
                             description="User key initialisation (profile 6.1): ENROL_HELLO, the device's "
                             "challenge, USER_KEY_INIT under the setup key; the device gets its master key."))
    s.add_argument("addr", metavar="ADDRESS", help="device node address, e.g. 0x0A000002")
    secret_options(s, "setup_key", "the setup key: 32 hex digits from the device label",
                   f"Without any of these: ${SETUP_KEY_ENV} if set, else a prompt on the terminal.")
    s.add_argument("--device", required=True, metavar="HOST:PORT", help="the device's UDP endpoint")
    s.add_argument("--name", help="a name for the listing")
    s.set_defaults(func=cmd_enrol)

    for name, kind, helptext in (("sp-key", "sp", "install a service provider key"),
                                 ("maker-key", "maker", "install the maker key"),
                                 ("user-key", "user", "install the home's user key (a later generation)")):
        s = common(ks.add_parser(name, help=helptext, description=f"{helptext.capitalize()} on devices "
                                 "(profile 6.2). The home key is created on first use; --new makes the next "
                                 "generation."))
        s.add_argument("devices", nargs="*", metavar="ADDRESS", help="device node addresses, e.g. 0x0A000002")
        s.add_argument("--all", action="store_true", help="every enrolled device")
        if kind == "sp":
            s.add_argument("--index", type=int, default=0, choices=range(16), metavar="0-15", help="provider index")
        s.add_argument("--new", action="store_true", help="make a new generation first")
        secret_options(s, "key", "use this key value (32 hex digits) for the new generation",
                       "Without any of these, the KSN makes a random key.")
        s.set_defaults(func=cmd_provision(kind))

    s = common(ks.add_parser("rotate", help="update master keys (DH, profile 6.3)",
                             description="Master key update controlled by the KSN, one device, several, or all; "
                             "with --every, repeatedly."))
    s.add_argument("devices", nargs="*", metavar="ADDRESS", help="device node addresses, e.g. 0x0A000002")
    s.add_argument("--all", action="store_true", help="every enrolled device")
    s.add_argument("--parallel", type=int, default=16, help="updates in flight at once (default 16)")
    s.add_argument("--every", type=float, metavar="SECONDS", help="repeat on this schedule")
    s.add_argument("--count", type=int, help="with --every: stop after this many rounds")
    s.set_defaults(func=cmd_rotate)

    s = common(ks.add_parser("sync", help="key synchronisation (profile 6.4)",
                             description="Ask devices which master key they hold and resolve any unfinished update."))
    s.add_argument("devices", nargs="*", metavar="ADDRESS", help="device node addresses, e.g. 0x0A000002")
    s.add_argument("--all", action="store_true", help="every device with a master key")
    s.set_defaults(func=cmd_sync)

    s = ks.add_parser("list", help="devices and their key state")
    s.add_argument("--db", help="KSN database")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_list)

    s = ks.add_parser("app", help="application frames as a controller (get/set a property)",
                      description="Send APP_GET / APP_SET (profile section 7) under a home key; the device "
                      "checks the key's authority against the property.")
    aps = s.add_subparsers(dest="app_op", metavar="OP", required=True)
    for op in ("get", "set"):
        a = common(aps.add_parser(op, help=f"{op} a property"))
        a.add_argument("addr", metavar="ADDRESS", help="device node address, e.g. 0x0A000002")
        a.add_argument("prop", type=int, metavar="PROP", help="property number (1 power, 2 tariff, 3 firmware)")
        if op == "set":
            a.add_argument("value", metavar="VALUE", help="value (text, or hex with --hex)")
            a.add_argument("--hex", action="store_true", help="VALUE is hex")
        a.add_argument("--key-kind", choices=("user", "sp", "maker"), default="user", help="key (authority) to use")
        a.add_argument("--index", type=int, default=0, help="SP key index")
        a.add_argument("--service", type=int, choices=(1, 2, 3), default=3,
                       help="1 authentication, 2 confidentiality, 3 both (default)")
        a.set_defaults(func=cmd_app)
