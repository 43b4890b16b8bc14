"""`tessera sm ...`, `tessera sma`, `tessera dma`, `tessera rma`: the secure RMCP-2 session
manager and the agents' control planes (docs/rmcp2.md)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tessera import cliargs
from tessera.errors import TesseraError
from tessera.rmcp2 import codec as C
from tessera.rmcp2 import sm as S
from tessera.rmcp2.agent import Agent, AgentConfig
from tessera.rmcp2.certs import client_context, make_pki, pki_paths, server_context
from tessera.rmcp2.server import AgentRunner, Limits, SmServer, serve
from tessera.rmcp2.store import SmStore, default_db, open_engine

log = logging.getLogger("tessera.rmcp2")
TLS_PORT, PLAIN_PORT, TREE_PORT = 26030, 26031, 26032  # profile B.10


def _hex_int(s: str) -> int:
    try:
        v = int(s, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a hexadecimal session ID: {s!r}") from None
    if not 1 <= v <= 0xFFFFFFFFFFFFFFFF:
        raise argparse.ArgumentTypeError("a session ID is 64 bits, not 0")
    return v


def _db(args, create: bool = False) -> Path:
    db = Path(args.db) if args.db else default_db()
    if not create and not db.exists():
        raise TesseraError(f"no SM database at {db} (`tessera sm serve --session-id ...` creates one; --db chooses)")
    return db


def _ident(args) -> bytes:
    try:
        b = bytes.fromhex(args.ident) if args.hex else args.ident.encode()
    except ValueError:
        raise TesseraError(f"--hex: {args.ident!r} is not hexadecimal") from None
    if not 1 <= len(b) <= 253:
        raise TesseraError("a service user identifier is 1..253 bytes (profile A.6)")
    return b


# ---------------------------------------------------------------------------- sm
def cmd_pki(args) -> int:
    paths = make_pki(args.dir, args.names, days=args.days)
    for n, p in paths.items():
        print(f"{n}: {p}" + ("" if n == "ca" else f" (key {p.with_suffix('.key')}, mode 0600)"))
    return 0


def cmd_serve(args) -> int:
    cert, key, ca = pki_paths(args.pki_dir, args.name)
    store = SmStore(_db(args, create=True))
    cfg = None
    if store.session() is None:
        if args.session_id is None:
            raise TesseraError("a new session needs --session-id (64-bit hex)")
        cfg = S.SmConfig(args.session_id, C.make_maid(args.host, args.tls_port or TLS_PORT, 1),
                         agree_time=args.agree_time, ks_period=args.ks_period, max_rmas=args.max_rmas)
    elif args.session_id is not None and args.session_id != store.session()["session_id"]:
        raise TesseraError(f"{store.path} holds session {store.session()['session_id']:#x}, not {args.session_id:#x}")
    engine = open_engine(store, cfg, now=time.time())
    server = SmServer(engine, store, server_context(cert, key, ca), args.host, args.tls_port, args.plain_port,
                      Limits(max_conns=args.max_conns), auto_open=not args.hold)
    asyncio.run(serve(server))
    return 0


def cmd_su_add(args) -> int:
    store = SmStore(_db(args, create=True))
    store.add_service_user_id(_ident(args))
    log.info("service user identifier registered (%d in total)", len(store.service_user_ids()))
    return 0


def cmd_su_list(args) -> int:
    for i in sorted(SmStore(_db(args)).service_user_ids()):
        try:
            text = i.decode()
        except UnicodeDecodeError:
            text = ""
        print(i.hex() if args.hex else text if text.isprintable() and text else f"hex:{i.hex()}")
    return 0


def cmd_su_remove(args) -> int:
    if not SmStore(_db(args)).remove_service_user_id(_ident(args)):
        raise TesseraError("no such service user identifier")
    return 0


def cmd_status(args) -> int:
    store = SmStore(_db(args))
    s = store.session()
    if s is None:
        raise TesseraError(f"{store.path} holds no session")
    c = store.counts()
    print(f"session {s['session_id']:#018x}: {c['members']} members, {c['acl']} ACL entries, "
          f"{c['service_user_ids']} service user identifiers")
    return 0


# ---------------------------------------------------------------------------- agents
def make_agent(args, nt: C.NodeType) -> AgentRunner:
    cert, key, ca = pki_paths(args.pki_dir, args.name)
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    propose = None
    if nt == C.NodeType.SMA:
        propose = C.SmaPropose(C.GpAttribute.CLOSED if args.group == "closed" else C.GpAttribute.OPEN,
                               C.GkMecha(args.gk_mecha), C.EnDecId(args.content_alg))
    caps: tuple = ()
    if nt != C.NodeType.RMA:
        caps = (C.GkMechCapab(C.GkName.KDC, 1), C.EnDecCapab(C.EnDecId.AES_CBC_128, 1),
                C.EnDecCapab(C.EnDecId.AES_CTR_128, 2), C.AuthAlgCapab(C.AuthId.HMAC_SHA1, 1),
                C.AuthAlgCapab(C.AuthId.HMAC_MD5, 2))
    sui = getattr(args, "service_user_id", None)
    cfg = AgentConfig(nt, args.session_id, C.make_maid(args.address, args.port, args.instance), der,
                      service_user_id=sui.encode() if sui else None, propose=propose, capabilities=caps)
    host, tls_port = cliargs.host_port(args.sm, "--sm")
    return AgentRunner(Agent(cfg), client_context(cert, key, ca), host, tls_port, args.plain_port)


def cmd_agent(nt: C.NodeType):
    def run(args) -> int:
        runner = make_agent(args, nt)
        a = runner.agent

        async def main():
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, runner.stop)
            task = asyncio.create_task(runner.run())
            seen = None
            while not task.done():
                await asyncio.sleep(0.5)
                now = (a.state, a.result, a.policy_result, a.ks_gen, len(a.acl))
                if now != seen:
                    seen = now
                    log.info("rmcp2 %s: state %s, SUBSANS %s, policy %s, Ks generation %d, ACL %d entries",
                             nt.name, a.state, a.result.name if a.result else "-",
                             a.policy_result.name if a.policy_result else "-", a.ks_gen, len(a.acl))
            await task
        try:
            asyncio.run(main())
        except OSError as e:
            raise TesseraError(f"cannot reach the SM at {args.sm}: {e}") from None
        if a.state == "refused":
            raise TesseraError(f"the SM refused the subscription: {a.result.name} ({int(a.result):#04x})")
        if a.state == "failed":
            raise TesseraError("this MA cannot run the agreed security policy (SECAGANS FAILED CONFIGURATION)")
        return 0
    return run


def _agent_args(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--sm", default=f"127.0.0.1:{TLS_PORT}", help="SM TLS admission endpoint HOST:PORT")
    p.add_argument("--plain-port", type=cliargs.port, default=PLAIN_PORT, help="SM Ks control port (B.10)")
    p.add_argument("--session-id", type=_hex_int, required=True, help="the session (64-bit hex)")
    p.add_argument("--pki-dir", required=True, help="directory with ca.pem, NAME.pem, NAME.key")
    p.add_argument("--name", default=name, help=f"certificate name in --pki-dir (default {name})")
    p.add_argument("--address", default="127.0.0.1", help="IPv4 address in this MA's MAID (B.1)")
    p.add_argument("--port", type=cliargs.port, default=TREE_PORT, help="port in this MA's MAID (B.1)")
    p.add_argument("--instance", type=int, default=1, help="instance number in this MA's MAID (B.1)")


def register(sub) -> None:
    sm = sub.add_parser("sm", help="secure RMCP-2 session manager (X.603.1 Amd.1)",
                        description="Secure RMCP-2 session manager: admission over mutual TLS, policy agreement, "
                                    "Ks and ACL (docs/rmcp2.md).")
    ss = sm.add_subparsers(dest="sm_command", metavar="SUBCOMMAND", required=True)

    p = ss.add_parser("pki", help="make a CA and ECDSA P-256 certificates for the SM and MAs")
    p.add_argument("--dir", required=True, help="directory for ca.pem, NAME.pem and NAME.key (created)")
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p.add_argument("names", nargs="+", help="certificate names, e.g. sm sma dma1 rma1")
    p.set_defaults(func=cmd_pki)

    p = ss.add_parser("serve", help="run the SM until SIGTERM (state kept in the SQLite store)")
    p.add_argument("--db", help=f"SQLite store (default {default_db()})")
    p.add_argument("--session-id", type=_hex_int, help="create the session with this ID (first run)")
    p.add_argument("--pki-dir", required=True, help="directory with ca.pem, NAME.pem, NAME.key")
    p.add_argument("--name", default="sm", help="the SM's certificate name (default sm)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--tls-port", type=cliargs.port, default=TLS_PORT, help="TLS admission port (0: any free)")
    p.add_argument("--plain-port", type=cliargs.port, default=PLAIN_PORT, help="Ks control port (0: any free)")
    p.add_argument("--agree-time", type=float, default=10.0, help="Security Agree.time in seconds (10.1.4.1)")
    p.add_argument("--ks-period", type=int, default=3600, help="seconds between Ks hash steps (B.6)")
    p.add_argument("--max-rmas", type=int, default=2000, help="RMAs admitted per session (B.8, default 2000)")
    p.add_argument("--max-conns", type=int, default=1024, help="connections on both listeners together")
    p.add_argument("--hold", action="store_true", help="do not open the session to RMAs when the policy is set")
    p.set_defaults(func=cmd_serve)

    p = ss.add_parser("status", help="what the store holds")
    p.add_argument("--db", help=f"SQLite store (default {default_db()})")
    p.set_defaults(func=cmd_status)

    su = ss.add_parser("service-user", help="service user identifiers of the content provider (10.1.1.5)")
    sus = su.add_subparsers(dest="su_command", metavar="ACTION", required=True)
    for name, func, has_id in (("add", cmd_su_add, True), ("list", cmd_su_list, False),
                               ("remove", cmd_su_remove, True)):
        q = sus.add_parser(name, help=f"{name} identifiers (a running SM picks changes up within a second)")
        q.add_argument("--db", help=f"SQLite store (default {default_db()})")
        q.add_argument("--hex", action="store_true", help="identifiers as hexadecimal bytes")
        if has_id:
            q.add_argument("ident", help="the identifier (UTF-8 text, or hex with --hex)")
        q.set_defaults(func=func)

    for nt, name, what in ((C.NodeType.SMA, "sma", "sender MA"), (C.NodeType.DMA, "dma", "dedicated MA"),
                           (C.NodeType.RMA, "rma", "receiver MA (host)")):
        p = sub.add_parser(name, help=f"run a secure RMCP-2 {what} control plane against the SM",
                           description=f"The {what}'s control plane: mutual TLS admission, subscription, policy "
                                       "agreement" + (", Ks on the plain link" if nt != C.NodeType.RMA else "") +
                                       (", ACL refresh" if nt == C.NodeType.DMA else "") + ". Runs until SIGTERM.")
        _agent_args(p, name)
        if nt == C.NodeType.SMA:
            p.add_argument("--group", choices=("open", "closed"), default="open", help="GP_ATTRIBUTE to propose")
            p.add_argument("--gk-mecha", type=int, default=int(C.GkMecha.PERIODIC), choices=range(8),
                           help="GK_MECHA to propose (Table 19)")
            p.add_argument("--content-alg", type=int, default=int(C.EnDecId.AES_CTR_128), choices=(1, 2, 3, 4),
                           help="CON_EN_DEC_ID to propose (Table 16)")
        if nt == C.NodeType.RMA:
            p.add_argument("--service-user-id", help="identifier from the content provider (closed groups)")
        p.set_defaults(func=cmd_agent(nt))
