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
from pathlib import Path

from tessera.errors import TesseraError
from tessera.scpm import codec as C
from tessera.scpm.ksn import Timing
from tessera.scpm import control
from tessera.scpm.control import control_path
from tessera.scpm.server import KsnServer, Operations, dispatch, fmt_addr, open_engine, parse_addr, serve
from tessera.scpm.store import Store, default_db

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


def run_op(args: argparse.Namespace, op: str, op_args: dict, create: bool = False):
    """Run one operation on the serving KSN if there is one, else in this process."""
    db = _db(args, create)
    ctl = control_path(db)

    async def main():
        conn = await control.connect(ctl)  # refuses a socket or listener that is not the user's
        if conn is not None:
            wire = {**op_args, "value": op_args["value"].hex()} if "value" in op_args else op_args
            return await control.request(conn, op, wire, print)
        engine, lock = open_engine(db, parse_addr(args.address), _timing(args))
        server = KsnServer(engine, args.host, args.port)
        try:
            await server.start()
            return await dispatch(Operations(server), op, op_args, print)
        finally:
            await server.stop()
            engine.store.close()
            lock.release()

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

        def ready(server: KsnServer) -> None:
            print(f"KSN {fmt_addr(server.engine.address)} serving on udp {server.host}:{server.port}, "
                  f"database {server.engine.store.path}" + (f", rotating every {args.every:g} s" if args.every else ""),
                  flush=True)

        await serve(_db(args, create=True), args.host, args.port, parse_addr(args.address), args.every, ready, stop,
                    _timing(args))

    asyncio.run(main())
    return 0


def cmd_enrol(args: argparse.Namespace) -> int:
    host, port = _endpoint(args.device)
    setup_key = read_secret(args, "setup_key", "the setup key (32 hex digits from the device label)",
                            default_env=SETUP_KEY_ENV)
    run_op(args, "enrol", {"addr": parse_addr(args.addr), "setup_key": setup_key, "host": host,
                           "port": port, "name": args.name or ""}, create=True)
    return 0


def cmd_provision(kind: str):
    def run(args: argparse.Namespace) -> int:
        run_op(args, "provision", {"addrs": _targets(args), "kind": kind, "idx": getattr(args, "index", 0),
                                   "new": args.new, "key": read_secret(args, "key", f"the {kind} key (32 hex digits)",
                                                                       required=False)})
        return 0

    return run


def cmd_rotate(args: argparse.Namespace) -> int:
    targets = _targets(args)
    if args.every:
        db = _db(args)
        if control_path(db).exists():
            raise TesseraError("a KSN server is running on this database: use `tessera ksn serve --every` there")
        args.every = float(args.every)
        print(f"rotating master keys every {args.every:g} s (Ctrl-C to stop)")
        rounds = 0
        import time

        while args.count is None or rounds < args.count:
            run_op(args, "rotate", {"addrs": targets, "parallel": args.parallel})
            rounds += 1
            if args.count is None or rounds < args.count:
                time.sleep(args.every)
        return 0
    run_op(args, "rotate", {"addrs": targets, "parallel": args.parallel})
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    run_op(args, "sync", {"addrs": _targets(args)})
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store = Store(_db(args))
    try:
        from tessera.scpm.ksn import KsnEngine

        rows = Operations.__new__(Operations)
        rows.engine = KsnEngine(store)  # read-only use: no socket, nothing sent
        devs = rows.devices()
    finally:
        store.close()
    if args.json:
        print(json.dumps(devs, indent=1))
        return 0
    if not devs:
        print("no devices (enrol one with `tessera ksn enrol`)")
        return 0
    print(f"{'address':10}  {'name':12} {'endpoint':21} {'state':9} {'master':>6} {'pending':>7}  keys")
    for d in devs:
        held = ", ".join(f"{_kind_name(k)} g{g}" for k, g in sorted(d["held"].items()))
        pend = str(d["pending_gen"]) if d["pending_gen"] else "-"
        flag = "  (needs sync)" if d["needs_sync"] else ""
        print(f"{fmt_addr(d['addr'])}  {d['name'][:12]:12} {d['endpoint']:21} {d['state']:9} {d['master_gen']:>6} "
              f"{pend:>7}  {held}{flag}")
    return 0


def _kind_name(k: str) -> str:
    kind, idx = (int(x) for x in k.split("/"))
    name = C.KeyKind(kind).name.lower()
    return f"{name}[{idx}]" if kind == C.KeyKind.SP else name


def _value(args: argparse.Namespace) -> bytes:
    if args.hex:
        try:
            return bytes.fromhex(args.value)
        except ValueError:
            raise TesseraError("--hex value must be hex digits") from None
    return args.value.encode()


def cmd_app(args: argparse.Namespace) -> int:
    op_args = {"addr": parse_addr(args.addr), "op": args.app_op, "prop": args.prop, "kind": args.key_kind,
               "idx": args.index, "service": args.service}
    if args.app_op == "set":
        op_args["value"] = _value(args)
    run_op(args, "app", op_args)
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
