"""`tessera sm ...`, `tessera sma`, `tessera dma`, `tessera rma`: the secure RMCP-2 session
manager and the agents' control planes (docs/rmcp2.md)."""
from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from tessera import cliargs
from tessera.api import rmcp2 as api
from tessera.errors import TesseraError
from tessera.paths import var_dir
from tessera.rmcp2 import codec as C
from tessera.rmcp2.store import default_db

log = logging.getLogger("tessera.rmcp2")
TLS_PORT, PLAIN_PORT, TREE_PORT = api.TLS_PORT, api.PLAIN_PORT, api.TREE_PORT  # profile B.10


def _hex_int(s: str) -> int:
    try:
        v = int(s, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a hexadecimal session ID: {s!r}") from None
    if not 1 <= v <= 0xFFFFFFFFFFFFFFFF:
        raise argparse.ArgumentTypeError("a session ID is 64 bits, not 0")
    return v


def _open(args, session_required: bool = True) -> api.SessionManager:
    return api.SessionManager.open(Path(args.db) if args.db else None, session_required=session_required)


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
    paths = api.make_sm_pki(args.dir, args.names, days=args.days)
    for n, p in paths.items():
        print(f"{n}: {p}" + ("" if n == "ca" else f" (key {p.with_suffix('.key')}, mode 0600)"))
    return 0


def cmd_serve(args) -> int:
    create = None
    if args.session_id is not None:
        create = api.SmSettings(args.session_id, args.host, args.tls_port or TLS_PORT, agree_time=args.agree_time,
                                ks_period=args.ks_period, max_rmas=args.max_rmas)
    db = Path(args.db) if args.db else default_db()
    if create is None and not db.exists():
        raise TesseraError("a new session needs --session-id (64-bit hex)")

    async def main() -> None:
        try:
            sm = api.AsyncSessionManager.open(db, create)
        except api.NoSession:
            raise TesseraError("a new session needs --session-id (64-bit hex)") from None
        async with sm:
            await sm.serve(args.pki_dir, args.name, args.host, args.tls_port, args.plain_port,
                           max_conns=args.max_conns, hold=args.hold)
            await sm.serve_forever()
    asyncio.run(main())
    return 0


def cmd_su_add(args) -> int:
    with api.SessionManager.open(Path(args.db) if args.db else None, session_required=False) as sm:
        sm.add_service_user(_ident(args))
        log.info("service user identifier registered (%d in total)", len(sm.service_users()))
    return 0


def cmd_su_list(args) -> int:
    db = Path(args.db) if args.db else default_db()
    if not db.exists():
        raise TesseraError(f"no SM database at {db}")
    with _open(args, session_required=False) as sm:
        for i in sm.service_users():
            try:
                text = i.decode()
            except UnicodeDecodeError:
                text = ""
            print(i.hex() if args.hex else text if text.isprintable() and text else f"hex:{i.hex()}")
    return 0


def cmd_su_remove(args) -> int:
    db = Path(args.db) if args.db else default_db()
    if not db.exists():
        raise TesseraError(f"no SM database at {db}")
    with _open(args, session_required=False) as sm:
        if not sm.remove_service_user(_ident(args)):
            raise TesseraError("no such service user identifier")
    return 0


def cmd_status(args) -> int:
    with _open(args) as sm:
        st = sm.status()
    counts = {r: sum(m.role == r for m in st.members) for r in ("SMA", "DMA", "RMA")}
    print(f"session {st.session_id:#018x}: {len(st.members)} members, {len(st.acl)} ACL entries, "
          f"{st.service_user_ids} service user identifiers")
    p = st.policy
    pol = "not set" if p is None else (f"{p.group} group, {p.gk_mecha}/{p.gk_name}, content {p.content_alg}, "
                                       f"messages {p.gk_alg} + {p.auth}")
    print(f"policy: {pol}; {'open' if st.open_to_rmas else 'closed'} to RMAs")
    print(f"Ks generation {st.ks_gen} ({st.ks_mode}); members: {counts['SMA']} SMA, {counts['DMA']} DMA, "
          f"{counts['RMA']} RMA")
    if args.members:
        for m in st.members:
            print(f"  {m.role} {m.address} maid {m.maid.hex()} policy {m.policy}")
    return 0


def cmd_rekey(args) -> int:
    with _open(args) as sm:
        r = sm.rekey(timeout=args.timeout)
    print(f"fresh Ks: generation {r.ks_gen}, sent to {r.delivered} connected SMA/DMA(s)")
    return 0


def cmd_truncate(args) -> int:
    cert = None
    if args.name:
        if not args.pki_dir:
            raise TesseraError("--name needs --pki-dir (the directory holding NAME.pem)")
        cert = Path(args.pki_dir) / f"{args.name}.pem"
        if not cert.exists():
            raise TesseraError(f"no certificate {cert}")
    maid = None
    if args.maid:
        try:
            maid = bytes.fromhex(args.maid)
        except ValueError:
            raise TesseraError(f"--maid wants 16 hexadecimal digits, got {args.maid!r}") from None
    with _open(args) as sm:
        r = sm.truncate(maid, certificate=cert, timeout=args.timeout)
    print(f"truncated {r.role} {r.maid.hex()}; fresh Ks generation {r.ks_gen}, "
          f"sent to {r.delivered} connected SMA/DMA(s)")
    return 0


# ---------------------------------------------------------------------------- agents
def make_agent(args, role: str) -> api.AsyncMaAgent:
    sui = getattr(args, "service_user_id", None)
    kw = {}
    if role == "sma":
        kw = {"group": args.group, "gk_mecha": args.gk_mecha, "content_alg": args.content_alg}
    if role == "dma":
        if not 0.1 <= args.hrs_refresh <= 86400:
            raise TesseraError("--hrs-refresh: between 0.1 and 86400 seconds")
        kw = {"hrs_refresh": args.hrs_refresh}
    return api.AsyncMaAgent(role, args.sm, args.session_id, args.pki_dir, args.name, plain_port=args.plain_port,
                            address=args.address, port=args.port, instance=args.instance, service_user_id=sui, **kw)


def cmd_agent(role: str):
    def run(args) -> int:
        cliargs.host_port(args.sm, "--sm")
        for path in [*getattr(args, "object", []), *([args.stream] if getattr(args, "stream", None) else [])]:
            if not Path(path).is_file():  # said now, not after the admission and the DMAs' links
                raise TesseraError(f"no such file to send: {path}")
        if role == "dma" and args.sma_tree:
            cliargs.host_port(args.sma_tree, "--sma")
        if role == "dma" and args.parent:
            cliargs.parent_dma(args.parent, "--parent")
        if role == "dma" and args.mcast:
            cliargs.mcast_group(args.mcast, "--mcast")
            if args.mcast_if:
                cliargs.ipv4(args.mcast_if, "--mcast-if")
        if role == "sma":
            for path in [*args.object, *([args.stream] if args.stream else [])]:
                if not Path(path).is_file():
                    raise TesseraError(f"no such file: {path}")
            if args.rate <= 0:
                raise TesseraError("--rate must be above 0 packets per second")
        agent = make_agent(args, role)

        def show(st: api.AgentStatus) -> None:
            log.info("rmcp2 %s: state %s, SUBSANS %s, policy %s, Ks generation %d, ACL %d entries", role.upper(),
                     st.state, st.result.name if st.result else "-",
                     st.policy_result.name if st.policy_result else "-", st.ks_gen, len(st.acl))

        async def tree() -> None:
            """A DMA starts its tree service (tree, relay, upstream link) once the policy is agreed;
            the SMA its tree service and content source (docs/rmcp2.md)."""
            await agent.wait_for(lambda st: st.state == "ready", float("inf"), "the policy")
            try:
                if role == "dma":
                    port = await agent.start_tree(args.tree_host, args.tree_port, content_udp=args.content_udp,
                                                  content_tcp=args.content_tcp, sma=args.sma_tree,
                                                  mcast=args.mcast, mcast_if=args.mcast_if,
                                                  hma={"port": args.hma_port}, parent=args.parent)
                    st = agent.tree_status()
                    # its MAID too: a child DMA names its parent by it (--parent HOST:PORT:MAIDHEX)
                    log.info("rmcp2 DMA: tree port %d (RMAs and child DMAs join here; MAID %s), content UDP %d "
                             "TCP %d (%s sends here)%s", port, agent.maid.hex(), st.content_udp, st.content_tcp,
                             f"the parent DMA at {args.parent}" if args.parent else "the SMA",
                             f", upstream to the SMA at {args.sma_tree}" if args.sma_tree else ", no upstream (--sma)")
                    return
                state = args.kc_state or (var_dir() / "rmcp2" / f"sma-{args.session_id:016x}-{agent.maid.hex()}.kcgen")
                src = await agent.start_source(args.tree_host, args.tree_port, kc_state=state)
            except api.AgentError:
                agent.stop()  # no tree, no DMA/SMA: the command ends with the reason (exit 2)
                raise
            log.info("rmcp2 SMA: tree port %d (DMAs link here)", src.port)
            await send_content(src)

        async def send_content(src: api.AsyncContentSource) -> None:
            if not args.object and not args.stream:
                return
            st = await src.wait_for_dmas(args.dmas, float("inf"))
            log.info("rmcp2 SMA: %d DMA(s) linked; sending", len(st.dmas))
            for path in args.object:
                data = Path(path).read_bytes()
                n = await src.send_object(data)
                log.info("rmcp2 SMA: object %s (%d B) sent to %d DMA(s)", path, len(data), n)
            if args.stream:
                data = Path(args.stream).read_bytes()
                loop = asyncio.get_running_loop()
                t0, step = loop.time(), 1.0 / args.rate
                chunks = [data[i:i + 1024] for i in range(0, len(data), 1024)]
                for k, chunk in enumerate(chunks):
                    await asyncio.sleep(max(0.0, t0 + k * step - loop.time()))
                    src.stream(chunk)
                    if (k + 1) % max(1, int(args.rate) * 10) == 0:
                        log.info("rmcp2 SMA: stream %d/%d packets", k + 1, len(chunks))
                log.info("rmcp2 SMA: stream %s (%d B, %d packets) sent", args.stream, len(data), len(chunks))

        async def main() -> None:
            import signal
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, agent.stop)
            side = asyncio.create_task(tree()) if role in ("dma", "sma") else None

            def side_done(t: asyncio.Task) -> None:  # a failure there ends the command at once, said
                if not t.cancelled() and t.exception() is not None:
                    log.error("rmcp2 %s: %s: %s", role, type(t.exception()).__name__, t.exception())
                    agent.stop()
            if side is not None:
                side.add_done_callback(side_done)
            try:
                await agent.run(show)
            finally:
                if side is not None:
                    side.cancel()
                    await asyncio.gather(side, return_exceptions=True)
                await agent.close()
            if side is not None and side.done() and not side.cancelled() and side.exception() is not None:
                raise side.exception()  # type: ignore[misc]
        asyncio.run(main())
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

    p = ss.add_parser("status", help="what the store holds: policy, Ks generation, members, ACL")
    p.add_argument("--db", help=f"SQLite store (default {default_db()})")
    p.add_argument("--members", action="store_true", help="list every member")
    p.set_defaults(func=cmd_status)

    p = ss.add_parser("rekey", help="a fresh Ks from the running SM, sent to the SMA and every DMA",
                      description="Asks the SM serving --db for a fresh random Ks (figure 93) and waits for its "
                                  "answer (docs/rmcp2.md, Operator requests). No key is shown.")
    p.add_argument("--db", help=f"SQLite store (default {default_db()})")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the SM (default 10)")
    p.set_defaults(func=cmd_rekey)

    p = ss.add_parser("truncate", help="expel an SMA/DMA from the running SM and replace Ks",
                      description="Asks the SM serving --db to expel an SMA/DMA (LEAVREQ EXPELLED) and replace Ks "
                                  "with a fresh one, so the key it holds stops working (10.1.2.1).")
    p.add_argument("--db", help=f"SQLite store (default {default_db()})")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--maid", help="the MAID (16 hex digits, as `tessera sm status --members` shows)")
    who.add_argument("--name", help="the certificate name in --pki-dir it was admitted with, e.g. dma1")
    p.add_argument("--pki-dir", help="directory with NAME.pem (with --name)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the SM (default 10)")
    p.set_defaults(func=cmd_truncate)

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
                                       (", ACL refresh" if nt == C.NodeType.DMA else "") +
                                       ("; then its tree port (RMAs join; on SIGTERM each gets LEAVREQ), the content "
                                        "relay and, with --sma, the upstream link to the SMA"
                                        if nt == C.NodeType.DMA else "") +
                                       ("; then its tree port (DMAs link; Kc made, rotated and sent under Ks) and, "
                                        "with --object/--stream, the content to send" if nt == C.NodeType.SMA else "") +
                                       ". Runs until SIGTERM.")
        _agent_args(p, name)
        if nt == C.NodeType.SMA:
            p.add_argument("--group", choices=("open", "closed"), default="open", help="GP_ATTRIBUTE to propose")
            p.add_argument("--gk-mecha", type=int, default=int(C.GkMecha.PERIODIC), choices=range(8),
                           help="GK_MECHA to propose (Table 19)")
            p.add_argument("--content-alg", type=int, default=int(C.EnDecId.AES_CTR_128), choices=(1, 2, 3, 4),
                           help="CON_EN_DEC_ID to propose (Table 16; content runs 1 AES-CBC or 2 AES-CTR)")
            p.add_argument("--tree-port", type=cliargs.port, default=TREE_PORT,
                           help=f"tree port DMAs link to (Kc under Ks, then content), started once the policy is "
                                f"agreed (default {TREE_PORT}, 0: any free; the log names it)")
            p.add_argument("--tree-host", default="127.0.0.1", help="address of the tree port (default 127.0.0.1)")
            p.add_argument("--object", action="append", default=[], metavar="FILE",
                           help="send FILE as one object (reliable, TCP) once --dmas DMAs are linked; repeatable")
            p.add_argument("--stream", metavar="FILE",
                           help="send FILE as a stream of 1024-byte packets (UDP, loss tolerated) after the objects")
            p.add_argument("--rate", type=float, default=100.0, help="stream packets per second (default 100)")
            p.add_argument("--dmas", type=int, default=1, help="DMAs to wait for before sending (default 1)")
            p.add_argument("--kc-state", metavar="FILE",
                           help="file keeping the newest Kc generation made (a number, never a key), so that a "
                                "restarted SMA goes on after it: DMAs and RMAs refuse an older one (default "
                                "$TESSERA_VAR/rmcp2/sma-<session>-<maid>.kcgen)")
        if nt == C.NodeType.DMA:
            p.add_argument("--tree-port", type=cliargs.port, default=TREE_PORT,
                           help=f"tree port RMAs join on, started once the policy is agreed (default {TREE_PORT}, "
                                "0: any free; the log names it)")
            p.add_argument("--tree-host", default="127.0.0.1",
                           help="address of the tree port and the content ports (default 127.0.0.1)")
            p.add_argument("--sma", dest="sma_tree", metavar="HOST:PORT",
                           help="the SMA's tree port: link upstream for Kc and content (without it: no content)")
            p.add_argument("--parent", metavar="HOST:PORT:MAIDHEX",
                           help="make this DMA a child of another DMA (B.15): join that DMA's tree port under Ks "
                                "and take content from it; --sma then carries Kc only")
            p.add_argument("--content-udp", type=cliargs.port, default=0,
                           help="content UDP port the SMA streams to (default 0: any free; the log names it)")
            p.add_argument("--content-tcp", type=cliargs.port, default=0,
                           help="content TCP port the SMA sends objects to (default 0: any free)")
            p.add_argument("--hrs-refresh", type=float, default=60.0, metavar="SECONDS",
                           help="how often the DMA fetches the ACL from the SM (HRSREQ; default 60, B.10): an RMA "
                                "admitted since the last fetch is refused NOT_IN_ACL until the next")
            p.add_argument("--mcast", metavar="GROUP[:PORT]",
                           help="multicast-enabled area (B.17, B.18): with the other DMAs of GROUP, elect one HMA; "
                                "only the HMA sends each stream packet once to GROUP:PORT (default port 26033), and "
                                "a candidate takes over when it leaves or falls silent")
            p.add_argument("--mcast-if", metavar="ADDR",
                           help="IPv4 address of the interface towards the area's RMAs and DMAs (default: the "
                                "system's multicast route)")
            p.add_argument("--hma-port", type=cliargs.port, default=26034,
                           help="UDP port on GROUP of the DMAs' HMA election messages, under Ks (default 26034, B.10)")
        if nt == C.NodeType.RMA:
            p.add_argument("--service-user-id", help="identifier from the content provider (closed groups)")
        p.set_defaults(func=cmd_agent(name))
