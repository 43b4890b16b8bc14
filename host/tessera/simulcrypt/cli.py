"""`tessera simulcrypt`: the four SP-4 roles and the key store.

    tessera simulcrypt keys add --kind SEK --owner 0x00010001 --scope 0x101
    tessera simulcrypt keys list
    tessera simulcrypt stkm-generator --super-cas-id 0x00010001 --port 2001
    tessera simulcrypt scs --service tv1 --generator 127.0.0.1:2001:0x00010001:0x101 --periods 5
    tessera simulcrypt mux --port 2002 --kbps 500
    tessera simulcrypt ltkm-generator --mux 127.0.0.1:2002 --client-id 0x00010007 --data-id 1 \
        --group 1 --key-owner 0x00010001 --key-scope 0x101 --kbps 16 --count 10
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import ssl

from tessera.cliargs import host_port, port as port_arg
from tessera.errors import TesseraError

log = logging.getLogger("tessera.simulcrypt")


def _int(s: str) -> int:
    try:
        return int(s, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None


def _byte(s: str) -> int:
    v = _int(s)
    if not 0 <= v <= 255:
        raise argparse.ArgumentTypeError(f"{v} does not fit the one-byte parameter")
    return v


def _signed_ms(s: str) -> int:
    """A signed 16-bit millisecond delay (delay_start, AC_delay_*, transition_delay_*)."""
    v = _int(s)
    if not -0x8000 <= v <= 0x7FFF:
        raise argparse.ArgumentTypeError(f"{v} does not fit a signed 16-bit ms value")
    return v


def _db(args: argparse.Namespace):
    from tessera.api.simulcrypt import open_key_store

    return open_key_store(args.db)


def _caps(args: argparse.Namespace):
    from tessera.simulcrypt.engine import EcmgCaps

    caps = EcmgCaps(delay_start=args.delay_start, delay_stop=args.delay_stop, ecm_rep_period=args.rep_period,
                    max_streams=args.max_streams, min_cp_duration=args.min_cp, lead_cw=args.lead_cw,
                    cw_per_msg=args.cw_per_msg,
                    max_comp_time=args.max_comp_time, ac_delay_start=args.ac_delay_start,
                    ac_delay_stop=args.ac_delay_stop, transition_delay_start=args.transition_delay_start,
                    transition_delay_stop=args.transition_delay_stop)
    try:
        caps.check()
    except ValueError as exc:
        raise TesseraError(str(exc)) from None
    return caps


def _allow(specs: list[str] | None) -> dict[str, set[int] | None] | None:
    """--allow ADDR or ADDR=ID,ID: the peer addresses admitted (and the ids each may use)."""
    if not specs:
        return None
    out: dict[str, set[int] | None] = {}
    for spec in specs:
        host, _, ids = spec.partition("=")
        try:
            ipaddress.ip_address(host)
            ints = {int(x, 0) for x in ids.split(",")} if ids else None
        except ValueError:
            raise TesseraError(f"--allow wants ADDRESS or ADDRESS=ID[,ID...], got {spec!r}") from None
        if ints is None or (host in out and out[host] is None):
            out[host] = None  # any id from this address
        else:
            out[host] = (out.get(host) or set()) | ints
    return out


def _udp_sources(specs: list[str] | None) -> dict[int, set[str]] | None:
    """--udp-source CLIENT_ID=ADDR[,ADDR...]: where that client's UDP data_provision may come from."""
    if not specs:
        return None
    out: dict[int, set[str]] = {}
    for spec in specs:
        client, _, addrs = spec.partition("=")
        try:
            hosts = {str(ipaddress.ip_address(a)) for a in addrs.split(",")}
            out.setdefault(int(client, 0), set()).update(hosts)
        except ValueError:
            raise TesseraError(f"--udp-source wants CLIENT_ID=ADDRESS[,ADDRESS...], got {spec!r}") from None
    return out


def _tls(args: argparse.Namespace, server: bool):
    """The mutual-TLS context of --tls-cert/--tls-key/--tls-ca (all three, or none)."""
    given = [args.tls_cert, args.tls_key, args.tls_ca]
    if not any(given):
        return None
    if not all(given):
        raise TesseraError("mutual TLS needs all of --tls-cert, --tls-key and --tls-ca")
    from tessera.simulcrypt.aio import tls_context

    try:
        return tls_context(args.tls_cert, args.tls_key, args.tls_ca, server=server)
    except (OSError, ssl.SSLError) as exc:
        raise TesseraError(f"cannot load the TLS credentials: {exc}") from None


def _limits(args: argparse.Namespace):
    from tessera.simulcrypt.aio import Limits

    for name in ("max_connections", "max_per_peer"):
        if getattr(args, name) < 1:
            raise TesseraError(f"--{name.replace('_', '-')} must be at least 1")
    return Limits(idle_timeout=args.idle_timeout or None, max_connections=args.max_connections,
                  max_per_peer=args.max_per_peer)


def _exposure(args: argparse.Namespace, allow, tls) -> None:
    """Say so when a server listens beyond loopback with neither an allow-list nor TLS:
    TS 103 197 links are unauthenticated, anyone who can connect is served."""
    try:
        local = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        local = args.host == "localhost"
    if not local and allow is None and tls is None:
        log.warning("listening on %s with no --allow list and no TLS: any host that reaches this port is served",
                    args.host)


def _server_options(p: argparse.ArgumentParser, ids: str) -> None:
    p.add_argument("--allow", action="append", metavar="ADDR[=ID,...]",
                   help=f"admit only these peer addresses (repeatable), each optionally limited to the {ids} "
                   "listed; default: any address (the default --host is loopback)")
    p.add_argument("--max-connections", type=int, default=96, help="open connections in total (default 96)")
    p.add_argument("--max-per-peer", type=int, default=32,
                   help="open connections (= channels) per peer address (default 32)")
    p.add_argument("--idle-timeout", type=float, default=300.0,
                   help="seconds a channel may stay silent before it is closed (default 300; 0: never)")
    p.add_argument("--error-info", choices=["param", "text"], default="param",
                   help="error_information: the 2-byte id of the faulty parameter (default, what head-end "
                   "tools expect) or ASCII text")
    _tls_options(p)


def _tls_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", metavar="PEM", help="mutual TLS (a Tessera option, not part of DVB "
                   "SimulCrypt): our certificate chain")
    p.add_argument("--tls-key", metavar="PEM", help="mutual TLS: our private key (a file; never on the command line)")
    p.add_argument("--tls-ca", metavar="PEM", help="mutual TLS: the CA the peer's certificate must chain to")


def cmd_keys(args: argparse.Namespace) -> int:
    from tessera.api.simulcrypt import add_key, list_keys

    ks = _db(args)
    try:
        if args.keys_cmd == "add":
            k = add_key(ks, args.kind, args.owner, args.scope, size=args.size)
            print(f"added {k.kind} id {k.key_id} owner 0x{k.owner:08x} scope 0x{k.scope:x}")
        else:
            for k in list_keys(ks):
                print(f"{k.kind} owner 0x{k.owner:08x} scope 0x{k.scope:04x} id {k.key_id} ({k.bits} bits)")
    finally:
        ks.close()
    return 0


def _serve(start, close) -> None:
    """Run a server until Ctrl-C; a port that cannot be bound is a clean CLI error."""

    async def forever() -> None:
        await start()
        try:
            await asyncio.Event().wait()
        finally:
            await close()

    try:
        asyncio.run(forever())
    except OSError as exc:
        raise TesseraError(f"cannot listen: {exc}") from None


def cmd_stkm_generator(args: argparse.Namespace) -> int:
    from tessera.api.simulcrypt import StkmGenerator

    from tessera.simulcrypt.tables import ErrorInfo

    caps = _caps(args)  # validated before anything is opened
    allow, tls, limits = _allow(args.allow), _tls(args, server=True), _limits(args)
    _exposure(args, allow, tls)
    ks = _db(args)
    try:
        gen = StkmGenerator(ks, set(args.super_cas_id), caps, host=args.host, port=args.port, allow=allow,
                            ssl=tls, limits=limits, error_info=ErrorInfo(args.error_info))
    except ValueError as exc:
        ks.close()
        raise TesseraError(str(exc)) from None

    async def start():
        port = await gen.start()
        print(f"STKM generator on {args.host}:{port}", flush=True)

    try:
        _serve(start, gen.close)
    finally:
        ks.close()
    return 0


def _parse_generator(text: str):
    from tessera.api.simulcrypt import Generator

    parts = text.split(":")
    if len(parts) != 4:
        raise TesseraError(f"--generator wants HOST:PORT:SUPER_CAS_ID:ECM_ID, got {text!r}")
    host, gport = host_port(":".join(parts[:2]), "--generator")
    try:
        return Generator(host, gport, int(parts[2], 0), int(parts[3], 0))
    except ValueError:
        raise TesseraError(f"bad --generator {text!r}") from None


def cmd_scs(args: argparse.Namespace) -> int:
    from tessera.api.simulcrypt import run_scs

    generators = [_parse_generator(g) for g in args.generator]

    def show(p) -> None:
        kms = ", ".join(f"0x{s:08x}: {len(b)} B STKM in {p.latency[s] * 1000:.1f} ms"
                        f"{'' if p.in_time[s] else ' (late)'}" for s, b in p.stkms.items())
        miss = "".join(f"; 0x{s:08x} missing ({why})" for s, why in p.missing.items())
        print(f"{args.service} CP {p.cp_number}: TEK ready, {kms}{miss}", flush=True)

    asyncio.run(run_scs(args.service, generators, args.periods, cp_duration=args.cp_duration,
                        protection=args.protection, first_channel_id=args.channel_id, on_period=show,
                        ssl=_tls(args, server=False)))
    return 0


def cmd_mux(args: argparse.Namespace) -> int:
    from tessera.api.simulcrypt import Multiplexer
    from tessera.simulcrypt.tables import ErrorInfo

    if args.channels_per_client is not None and args.channels_per_client < 1:
        raise TesseraError("--channels-per-client must be at least 1")
    allow, tls, limits = _allow(args.allow), _tls(args, server=True), _limits(args)
    _exposure(args, allow, tls)
    mux = Multiplexer(args.kbps, host=args.host, port=args.port, udp=not args.no_udp,
                      channels_per_client=args.channels_per_client, allow=allow, ssl=tls, limits=limits,
                      udp_sources=_udp_sources(args.udp_source), error_info=ErrorInfo(args.error_info))

    async def start():
        port = await mux.start()
        print(f"MUX on {args.host}:{port} (UDP {mux.udp_port}), {args.kbps} kbit/s", flush=True)

    _serve(start, mux.close)
    return 0


def cmd_ltkm_generator(args: argparse.Namespace) -> int:
    from tessera.api.simulcrypt import send_ltkms

    host, mux_port = host_port(args.mux, "--mux")
    if args.udp and not args.udp_port:
        raise TesseraError("--udp needs --udp-port")
    tls = _tls(args, server=False)
    ks = _db(args)
    try:
        r = asyncio.run(send_ltkms(host, mux_port, ks, args.client_id, args.key_owner, args.key_scope,
                                   count=args.count, group=args.group, data_id=args.data_id,
                                   channel_id=args.channel_id, kbps=args.kbps,
                                   udp_port=args.udp_port if args.udp else None, ssl=tls))
    finally:
        ks.close()
    print(f"sent {r.sent} LTKMs ({r.bytes} bytes) within {r.kbps} kbit/s; {r.errors} errors from the MUX")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulcrypt", help="OMA BCAST SP-4 over DVB SimulCrypt (STKM/LTKM generators, SCS, MUX)",
                       description="OMA BCAST SP-4 over DVB SimulCrypt (ETSI TS 103 197): ECMG<->SCS for STKMs, "
                       "EMMG<->MUX for LTKMs. Layouts of STKM/LTKM are Tessera's own (docs/bcast-profile.md).")
    p.add_argument("--db", help="key store (SQLite); default var/simulcrypt-keys.sqlite")
    s = p.add_subparsers(dest="sc_cmd", metavar="ROLE", required=True)

    k = s.add_parser("keys", help="manage the key store (material is never printed)")
    ks = k.add_subparsers(dest="keys_cmd", required=True)
    a = ks.add_parser("add", help="add a random key")
    a.add_argument("--kind", required=True, choices=["SEK", "PEK", "CWT", "LTK"],
                   help="service, program, CW transport or LTKM delivery key")
    a.add_argument("--owner", type=_int, required=True, help="Super_CAS_id (SEK/PEK/CWT) or client_id (LTK)")
    a.add_argument("--scope", type=_int, default=0, help="ECM_id / stkmstream (SEK/PEK) or group id (LTK)")
    a.add_argument("--size", type=int, default=16, choices=[16, 32], help="key length in bytes (default 16)")
    ks.add_parser("list", help="list keys")
    k.set_defaults(func=cmd_keys)

    g = s.add_parser("stkm-generator", help="run an STKM generator (ECMG role, TCP server)")
    g.add_argument("--super-cas-id", type=_int, action="append", required=True,
                   help="0x0001xxxx (DRM) or 0x0002xxxx (Smartcard); repeatable")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=port_arg, default=0, help="TCP port (default 0: any free port, printed)")
    g.add_argument("--delay-start", type=_signed_ms, default=-200, help="ms (channel_status)")
    g.add_argument("--delay-stop", type=_signed_ms, default=0, help="ms")
    g.add_argument("--ac-delay-start", type=_signed_ms, help="AC_delay_start, ms; default: --delay-start")
    g.add_argument("--ac-delay-stop", type=_signed_ms, help="AC_delay_stop, ms; default: --delay-stop")
    g.add_argument("--transition-delay-start", type=_signed_ms,
                   help="transition_delay_start, ms; default: --delay-start")
    g.add_argument("--transition-delay-stop", type=_signed_ms, help="transition_delay_stop, ms; default: --delay-stop")
    g.add_argument("--rep-period", type=int, default=100, help="ECM_rep_period, ms")
    g.add_argument("--max-streams", type=int, default=128, help="max_streams advertised and enforced")
    g.add_argument("--min-cp", type=int, default=1, help="min_CP_duration, 100 ms units")
    g.add_argument("--max-comp-time", type=int, default=100, help="ms")
    g.add_argument("--lead-cw", type=_byte, default=1,
                   help="lead_CW: CWs after the current crypto-period in each CW_provision (0..CW_per_msg)")
    g.add_argument("--cw-per-msg", type=_byte, default=2, help="CW_per_msg: CWs in each CW_provision (1..255)")
    _server_options(g, "Super_CAS_ids")
    g.set_defaults(func=cmd_stkm_generator)

    c = s.add_parser("scs", help="run an SCS for one service against STKM generators")
    c.add_argument("--service", required=True, help="name of the encrypted service (labels output)")
    c.add_argument("--generator", action="append", required=True, metavar="HOST:PORT:SUPER_CAS_ID:ECM_ID",
                   help="an STKM generator to use (repeatable)")
    c.add_argument("--channel-id", type=int, default=1, help="first ECM_channel_id (one per generator)")
    c.add_argument("--cp-duration", type=int, default=10, help="nominal_CP_duration, 100 ms units")
    c.add_argument("--periods", type=int, default=5, help="crypto-periods to run (default 5)")
    c.add_argument("--protection", choices=["ipsec", "srtp", "ismacryp"], default="srtp",
                   help="traffic protection named in the STKMs (default srtp)")
    _tls_options(c)
    c.set_defaults(func=cmd_scs)

    m = s.add_parser("mux", help="run a multiplexer for LTKM streams (EMMG<->MUX server)")
    m.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    m.add_argument("--port", type=port_arg, default=0, help="TCP port (default 0: any free port, printed)")
    m.add_argument("--kbps", type=int, default=2000, help="bandwidth pool for LTKM streams")
    m.add_argument("--no-udp", action="store_true", help="do not open the UDP data_provision port")
    m.add_argument("--channels-per-client", type=int, metavar="N",
                   help="refuse more than N open channels per client_id with 'client_id already in use' "
                   "(0x0014); default: no limit")
    m.add_argument("--udp-source", action="append", metavar="CLIENT_ID=ADDR[,ADDR...]",
                   help="accept that client's UDP data_provision only from these addresses (repeatable); "
                   "default: the address its TCP channel came from")
    _server_options(m, "client_ids")
    m.set_defaults(func=cmd_mux)

    e = s.add_parser("ltkm-generator", help="send LTKMs to a MUX (EMMG role, DRM profile)")
    e.add_argument("--mux", required=True, metavar="HOST:PORT", help="the MUX to connect to")
    e.add_argument("--client-id", type=_int, required=True, help="0x0001xxxx (DRM profile)")
    e.add_argument("--channel-id", type=int, default=1, help="data_channel_id (default 1)")
    e.add_argument("--data-id", type=_int, default=1, help="data_id of the LTKM stream (default 1)")
    e.add_argument("--group", type=_int, default=1, help="terminal group whose LTK encrypts the LTKMs")
    e.add_argument("--key-owner", type=_int, required=True, help="Super_CAS_id of the delivered service key")
    e.add_argument("--key-scope", type=_int, required=True, help="ECM_id of the delivered service key")
    e.add_argument("--kbps", type=int, default=16, help="bandwidth to request, kbit/s (default 16)")
    e.add_argument("--count", type=int, default=10, help="number of LTKMs to send (default 10)")
    e.add_argument("--udp", action="store_true", help="data_provision over UDP")
    e.add_argument("--udp-port", type=port_arg, help="the MUX's UDP port (with --udp)")
    _tls_options(e)
    e.set_defaults(func=cmd_ltkm_generator)
