"""`tessera pki`: create a SMPTE 430-2 style chain, extend it, validate certificates against the profile."""
from __future__ import annotations

import argparse
import getpass
import os
from pathlib import Path

from cryptography.x509.oid import NameOID

from tessera.errors import TesseraError
from tessera.pki import certs


def _leaf(spec: str) -> tuple[str, str]:
    role, sep, name = spec.partition(":")
    if not sep or not role.isupper() or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"expected ROLE:name (e.g. SM:initiator), got {spec!r}")
    if name in ("root", "intermediate") or name.startswith("."):
        raise argparse.ArgumentTypeError(f"leaf name {name!r} would clash with the CA files")
    return role, name


def _passphrase(args: argparse.Namespace, *, confirm: bool) -> bytes | None:
    """From the environment variable named by --passphrase-env, or a prompt; never argv."""
    if args.passphrase_env:
        value = os.environ.get(args.passphrase_env)
        if not value:
            raise TesseraError(f"environment variable {args.passphrase_env} is not set or empty")
        return value.encode()
    if args.passphrase_prompt:
        first = getpass.getpass("CA key passphrase: ")
        if not first:
            raise TesseraError("empty passphrase")
        if confirm and getpass.getpass("again: ") != first:
            raise TesseraError("the passphrases differ")
        return first.encode()
    return None


def _print_leaf(name: str, leaf: certs.Issued, paths: dict[str, Path]) -> None:
    cn = leaf.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    print(f"{name}: CN={cn} thumbprint={certs.thumbprint(leaf.cert)} -> {paths[name]}, {paths[name + '.key']}")


def cmd_create(args: argparse.Namespace) -> int:
    d = Path(args.dir)
    if d.exists() and any(d.iterdir()) and not args.force:
        raise TesseraError(f"{d} is not empty (use --force to overwrite)")
    passphrase = _passphrase(args, confirm=True)  # before the keys exist, so a typo costs nothing
    chain = certs.create_chain(args.org, args.leaf or [("SM", "initiator"), ("LD", "responder")], days=args.days)
    paths = certs.write_chain(chain, d, passphrase)
    for name, leaf in chain.leaves.items():
        _print_leaf(name, leaf, paths)
    print(f"root: {paths['root']}  intermediate: {paths['intermediate']}")
    print(f"CA keys ({'encrypted' if passphrase else 'NOT encrypted'}, mode 0600): "
          f"{paths['root.key']}, {paths['intermediate.key']}")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    d = Path(args.dir)
    passphrase = _passphrase(args, confirm=False)
    role, name = args.leaf
    try:
        leaf, paths = certs.issue_leaf(d, role, name, passphrase=passphrase, days=args.days, force=args.force)
    except OSError as exc:
        raise TesseraError(f"cannot issue under {d}: {exc.strerror or exc}") from None
    _print_leaf(name, leaf, paths)
    return 0


def _add_passphrase(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--passphrase-env", metavar="VAR",
                   help="read the CA key passphrase from environment variable VAR")
    g.add_argument("--passphrase-prompt", action="store_true", help="prompt for the CA key passphrase")


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        chain = certs.load_pems(*[Path(p) for p in args.cert])
    except (OSError, ValueError) as exc:
        raise TesseraError(f"cannot read certificates: {_why(exc)}") from None
    if args.trust:
        try:
            trust = certs.load_pems(Path(args.trust))
        except (OSError, ValueError) as exc:
            raise TesseraError(f"cannot read {args.trust}: {_why(exc)}") from None
        chain = certs.peer_chain(chain[0].public_bytes(certs.serialization.Encoding.DER), chain + trust)
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


def _why(exc: Exception) -> str:
    """One line: the OS reason with its file, or the first line of a parse error."""
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def cmd_show(args: argparse.Namespace) -> int:
    try:
        loaded = certs.load_pems(Path(args.cert))
    except (OSError, ValueError) as exc:
        raise TesseraError(f"cannot read {args.cert}: {_why(exc)}") from None
    for c in loaded:
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
    c.add_argument("--days", type=int, default=365, help="validity of the leaves in days (default 365)")
    c.add_argument("--force", action="store_true", help="write into a directory that is not empty")
    _add_passphrase(c)
    c.set_defaults(func=cmd_create)
    i = s.add_parser("issue", help="issue another leaf under an existing intermediate",
                     description="Issue a leaf (CN ROLE.NAME, dnQualifier of its new key) signed by the "
                     "intermediate of a directory made by `tessera pki create`.")
    i.add_argument("--dir", required=True, help="directory made by `tessera pki create`")
    i.add_argument("--leaf", type=_leaf, required=True, metavar="ROLE:NAME", help="e.g. SM:sm2")
    i.add_argument("--days", type=int, default=365, help="validity (clipped to the intermediate's)")
    i.add_argument("--force", action="store_true", help="replace an existing leaf of that name")
    _add_passphrase(i)
    i.set_defaults(func=cmd_issue)
    v = s.add_parser("validate", help="check a certificate or chain against the 430-2 profile")
    v.add_argument("cert", nargs="+", help="PEM files (leaf and its chain, any order)")
    v.add_argument("--trust", help="PEM bundle used to complete the chain up to its root")
    v.add_argument("--partial", action="store_true", help="do not require the chain to end in a root")
    v.set_defaults(func=cmd_validate)
    sh = s.add_parser("show", help="print subject, issuer and thumbprint")
    sh.add_argument("cert", help="PEM file with one or more certificates")
    sh.set_defaults(func=cmd_show)
