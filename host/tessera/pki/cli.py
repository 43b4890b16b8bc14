"""`tessera pki`: create a SMPTE 430-2 style chain, validate certificates against the profile."""
from __future__ import annotations

import argparse
from pathlib import Path

from cryptography.x509.oid import NameOID

from tessera.errors import TesseraError
from tessera.pki import certs


def _leaf(spec: str) -> tuple[str, str]:
    role, sep, name = spec.partition(":")
    if not sep or not role.isupper() or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"expected ROLE:name (e.g. SM:initiator), got {spec!r}")
    return role, name


def cmd_create(args: argparse.Namespace) -> int:
    d = Path(args.dir)
    if d.exists() and any(d.iterdir()) and not args.force:
        raise TesseraError(f"{d} is not empty (use --force to overwrite)")
    chain = certs.create_chain(args.org, args.leaf or [("SM", "initiator"), ("LD", "responder")], days=args.days)
    paths = certs.write_chain(chain, d)
    for name, leaf in chain.leaves.items():
        cn = leaf.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        print(f"{name}: CN={cn} thumbprint={certs.thumbprint(leaf.cert)} -> {paths[name]}, {paths[name + '.key']}")
    print(f"root: {paths['root']}  intermediate: {paths['intermediate']}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        chain = certs.load_pems(*[Path(p) for p in args.cert])
    except (OSError, ValueError) as exc:
        raise TesseraError(f"cannot read certificates: {exc}") from None
    if args.trust:
        chain = certs.peer_chain(chain[0].public_bytes(certs.serialization.Encoding.DER),
                                 chain + certs.load_pems(Path(args.trust)))
    violations = certs.validate_chain(chain, require_root=not args.partial)
    for i, c in enumerate(certs.order_chain(chain)):
        print(f"[{i}] {c.subject.rfc4514_string()}")
    if violations:
        print(f"{len(violations)} violation(s) of the SMPTE 430-2 profile:")
        for v in violations:
            print(f"  - {v}")
        return 1
    print("OK: the chain conforms to the SMPTE 430-2 profile")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    for c in certs.load_pems(Path(args.cert)):
        print(f"subject:    {c.subject.rfc4514_string()}")
        print(f"issuer:     {c.issuer.rfc4514_string()}")
        print(f"thumbprint: {certs.thumbprint(c)}")
        print(f"validity:   {c.not_valid_before_utc.isoformat()} .. {c.not_valid_after_utc.isoformat()}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pki", help="D-cinema (SMPTE 430-2 style) certificates",
                       description="Create a root/intermediate/leaf chain and validate certificates "
                       "against the SMPTE 430-2 profile.")
    s = p.add_subparsers(dest="pki_command", metavar="ACTION", required=True)
    c = s.add_parser("create", help="create root, intermediate and role-named leaves")
    c.add_argument("--dir", required=True, help="output directory")
    c.add_argument("--org", default="Tessera", help="organisation (O) of every certificate")
    c.add_argument("--leaf", type=_leaf, action="append", metavar="ROLE:NAME",
                   help="a leaf with CN ROLE.NAME (repeatable; default SM:initiator and LD:responder)")
    c.add_argument("--days", type=int, default=365)
    c.add_argument("--force", action="store_true")
    c.set_defaults(func=cmd_create)
    v = s.add_parser("validate", help="check a certificate or chain against the 430-2 profile")
    v.add_argument("cert", nargs="+", help="PEM files (leaf and its chain, any order)")
    v.add_argument("--trust", help="PEM bundle used to complete the chain up to its root")
    v.add_argument("--partial", action="store_true", help="do not require the chain to end in a root")
    v.set_defaults(func=cmd_validate)
    sh = s.add_parser("show", help="print subject, issuer and thumbprint")
    sh.add_argument("cert")
    sh.set_defaults(func=cmd_show)
