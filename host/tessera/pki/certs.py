"""SMPTE 430-2 style D-cinema certificates: create a chain, validate against the profile.

The profile checked here is the one public D-cinema tools check (see docs/asm.md); the
SMPTE 430-2 text itself is not in this repository, so rules are cited by name, not clause.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtensionOID, NameOID, SignatureAlgorithmOID

from tessera.errors import TesseraError

UTC = dt.timezone.utc
ROLES = ("SM", "LD", "LE", "MB", "PR", "CS", "RES")  # role prefixes used in leaf CNs


def leaf_roles(cert: x509.Certificate) -> frozenset[str]:
    """The roles of a leaf whose CN is "<ROLE>.<name>".

    Our reading of 430-2 (not in this repository): the part before the first "." names the
    role; several roles are separated by spaces ("SM LS.name"). No CN or no "." -> no role.
    """
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cn) != 1:
        return frozenset()
    role, sep, rest = str(cn[0].value).partition(".")
    if not sep or not rest:
        return frozenset()
    return frozenset(r for r in role.split(" ") if r)


def dn_qualifier(public_key: rsa.RSAPublicKey) -> str:
    """base64(SHA-1(DER PKCS#1 RSAPublicKey))."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    return base64.b64encode(hashlib.sha1(der).digest()).decode()


def thumbprint(cert: x509.Certificate) -> str:
    """D-cinema certificate thumbprint: base64(SHA-1(DER TBSCertificate))."""
    return base64.b64encode(hashlib.sha1(cert.tbs_certificate_bytes).digest()).decode()


def _name(org: str, ou: str, cn: str, dnq: str) -> x509.Name:
    ps = x509.name._ASN1Type.PrintableString
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, org, ps),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou, ps),
        x509.NameAttribute(NameOID.COMMON_NAME, cn, ps),
        x509.NameAttribute(NameOID.DN_QUALIFIER, dnq, ps),
    ])


@dataclass
class Issued:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey = field(repr=False)

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self, passphrase: bytes | None = None) -> bytes:
        """PKCS#8 PEM, encrypted with `passphrase` (cryptography's best available scheme) if given."""
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption())
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


class PKIError(TesseraError):
    """A PKI directory or key cannot be used (missing, encrypted without a passphrase, mismatched)."""


def write_secret(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (mode 0600, also when the file existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def issue(cn: str, *, org: str, ou: str = "tessera", ca: bool, path_len: int | None = None,
          parent: Issued | None = None, days: int = 365, not_before: dt.datetime | None = None,
          key_size: int = 2048, dnq_override: str | None = None) -> Issued:
    """Issue one certificate; `parent=None` makes a self-signed root.

    `key_size` and `dnq_override` exist so tests and the demo can mint rogue certificates.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    dnq = dnq_override or dn_qualifier(key.public_key())
    subject = _name(org, ou, cn, dnq)
    start = not_before or (dt.datetime.now(UTC) - dt.timedelta(minutes=5))
    end = start + dt.timedelta(days=days)
    if parent is not None:  # a child's validity lies inside its parent's
        start = max(start, parent.cert.not_valid_before_utc)
        end = min(end, parent.cert.not_valid_after_utc)
    issuer_key = parent.key if parent else key
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
    ku = x509.KeyUsage(
        digital_signature=not ca, content_commitment=False, key_encipherment=not ca, data_encipherment=False,
        key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False)
    b = (x509.CertificateBuilder()
         .subject_name(subject)
         .issuer_name(parent.cert.subject if parent else subject)
         .public_key(key.public_key())
         .serial_number(int.from_bytes(os.urandom(8), "big") >> 1 | 1)
         .not_valid_before(start).not_valid_after(end)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=path_len if ca else None), critical=True)
         .add_extension(ku, critical=True)
         .add_extension(ski, critical=False)
         .add_extension(aki, critical=False))
    return Issued(b.sign(issuer_key, hashes.SHA256()), key)


@dataclass
class Chain:
    root: Issued
    intermediate: Issued
    leaves: dict[str, Issued]


def create_chain(org: str, leaves: list[tuple[str, str]], days: int = 365) -> Chain:
    """Root -> intermediate -> one leaf per (role, name), CN = "<ROLE>.<name>"."""
    root = issue(f"root.{org}", org=org, ca=True, path_len=1, days=days)
    inter = issue(f"intermediate.{org}", org=org, ca=True, path_len=0, parent=root, days=days)
    out = {}
    for role, name in leaves:
        out[name] = issue(f"{role}.{name}", org=org, ca=False, parent=inter, days=days)
    return Chain(root, inter, out)


def write_leaf(d: Path, name: str, leaf: Issued, intermediate: Issued | x509.Certificate) -> dict[str, Path]:
    """<name>.pem (leaf + intermediate) and <name>.key (unencrypted: TLS peers load it unattended)."""
    inter = intermediate.cert if isinstance(intermediate, Issued) else intermediate
    p, k = d / f"{name}.pem", d / f"{name}.key"
    p.write_bytes(leaf.cert_pem() + inter.public_bytes(serialization.Encoding.PEM))
    write_secret(k, leaf.key_pem())
    return {name: p, name + ".key": k}


def write_chain(chain: Chain, d: Path, passphrase: bytes | None = None) -> dict[str, Path]:
    """Files: root.pem/.key, intermediate.pem/.key, <name>.pem (leaf + intermediate), <name>.key.

    The CA keys are kept (mode 0600, encrypted with `passphrase` if given) so that
    `issue_leaf` can extend the chain later; leaf keys are never encrypted.
    """
    d.mkdir(parents=True, exist_ok=True)
    paths = {"root": d / "root.pem", "intermediate": d / "intermediate.pem",
             "root.key": d / "root.key", "intermediate.key": d / "intermediate.key"}
    paths["root"].write_bytes(chain.root.cert_pem())
    paths["intermediate"].write_bytes(chain.intermediate.cert_pem())
    write_secret(paths["root.key"], chain.root.key_pem(passphrase))
    write_secret(paths["intermediate.key"], chain.intermediate.key_pem(passphrase))
    for name, leaf in chain.leaves.items():
        paths.update(write_leaf(d, name, leaf, chain.intermediate))
    return paths


def key_is_encrypted(path: Path) -> bool:
    return b"ENCRYPTED" in Path(path).read_bytes().split(b"\n", 1)[0]


def load_ca(d: Path, which: str = "intermediate", passphrase: bytes | None = None) -> Issued:
    """A CA certificate and its private key from a `write_chain` directory."""
    cert_p, key_p = d / f"{which}.pem", d / f"{which}.key"
    if not cert_p.exists():
        raise PKIError(f"no {cert_p}: not a directory made by `tessera pki create`")
    if not key_p.exists():
        raise PKIError(f"no {key_p}: the {which} key was not kept (chains made before CA keys were "
                       "kept cannot be extended; create a new one)")
    cert = x509.load_pem_x509_certificate(cert_p.read_bytes())
    encrypted = key_is_encrypted(key_p)
    if encrypted and not passphrase:
        raise PKIError(f"{key_p} is encrypted: give --passphrase-env VAR or --passphrase-prompt")
    try:
        key = serialization.load_pem_private_key(key_p.read_bytes(), passphrase if encrypted else None)
    except (ValueError, TypeError):
        # never repeat the passphrase or library detail that might echo key material
        raise PKIError(f"cannot load {key_p}: wrong passphrase or damaged key") from None
    if not isinstance(key, rsa.RSAPrivateKey) or key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise PKIError(f"{key_p} does not belong to {cert_p}")
    return Issued(cert, key)


def issue_leaf(d: Path, role: str, name: str, *, passphrase: bytes | None = None, days: int = 365,
               force: bool = False) -> tuple[Issued, dict[str, Path]]:
    """Issue one more leaf (CN "<ROLE>.<name>", dnQualifier of its key) under d's intermediate."""
    if (d / f"{name}.pem").exists() and not force:
        raise PKIError(f"{d / (name + '.pem')} exists (use --force to replace it)")
    inter = load_ca(d, "intermediate", passphrase)
    org = inter.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    if not inter.cert.not_valid_before_utc <= dt.datetime.now(UTC) < inter.cert.not_valid_after_utc:
        raise PKIError("the intermediate certificate is not valid now")
    leaf = issue(f"{role}.{name}", org=str(org), ca=False, parent=inter, days=days)
    return leaf, write_leaf(d, name, leaf, inter)


# --------------------------------------------------------------------------- validation
def load_pems(*paths: Path) -> list[x509.Certificate]:
    certs: list[x509.Certificate] = []
    for p in paths:
        certs.extend(x509.load_pem_x509_certificates(Path(p).read_bytes()))
    return certs


def _attr(name: x509.Name, oid: x509.ObjectIdentifier) -> list[x509.NameAttribute]:
    return list(name.get_attributes_for_oid(oid))


def check_certificate(cert: x509.Certificate, *, leaf: bool, now: dt.datetime | None = None) -> list[str]:
    """Per-certificate 430-2 profile checks; returns readable violations (empty = passes)."""
    v: list[str] = []
    now = now or dt.datetime.now(UTC)
    if cert.version != x509.Version.v3:
        v.append("not an X.509 v3 certificate")
    pub = cert.public_key()
    if not isinstance(pub, rsa.RSAPublicKey):
        v.append("public key is not RSA")
    else:
        if pub.key_size != 2048:
            v.append(f"RSA key is {pub.key_size} bits, the profile requires 2048")
        if pub.public_numbers().e != 65537:
            v.append(f"public exponent is {pub.public_numbers().e}, the profile requires 65537")
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.RSA_WITH_SHA256:
        v.append(f"signature algorithm is {cert.signature_algorithm_oid._name}, not sha256WithRSAEncryption")
    if cert.serial_number <= 0:
        v.append("serial number is not positive")
    exts = {e.oid: e for e in cert.extensions}
    for oid, label in ((ExtensionOID.BASIC_CONSTRAINTS, "basicConstraints"), (ExtensionOID.KEY_USAGE, "keyUsage"),
                       (ExtensionOID.SUBJECT_KEY_IDENTIFIER, "subjectKeyIdentifier"),
                       (ExtensionOID.AUTHORITY_KEY_IDENTIFIER, "authorityKeyIdentifier")):
        if oid not in exts:
            v.append(f"{label} extension missing")
    for oid, e in exts.items():
        if e.critical and oid not in (ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE):
            v.append(f"unexpected critical extension {oid.dotted_string}")
    for which, name in (("subject", cert.subject), ("issuer", cert.issuer)):
        for oid, label in ((NameOID.ORGANIZATION_NAME, "O"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "OU"),
                           (NameOID.COMMON_NAME, "CN"), (NameOID.DN_QUALIFIER, "dnQualifier")):
            attrs = _attr(name, oid)
            if len(attrs) != 1:
                v.append(f"{which} has {len(attrs)} {label} attributes, expected exactly 1")
            elif attrs[0]._type != x509.name._ASN1Type.PrintableString:
                v.append(f"{which} {label} is not a PrintableString")
    so, io = _attr(cert.subject, NameOID.ORGANIZATION_NAME), _attr(cert.issuer, NameOID.ORGANIZATION_NAME)
    if so and io and so[0].value != io[0].value:
        v.append("subject O differs from issuer O")
    dnq = _attr(cert.subject, NameOID.DN_QUALIFIER)
    if dnq and isinstance(pub, rsa.RSAPublicKey) and dnq[0].value != dn_qualifier(pub):
        v.append("subject dnQualifier is not base64(SHA-1(public key))")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        v.append("certificate is not valid at the current time")
    bc = exts.get(ExtensionOID.BASIC_CONSTRAINTS)
    ku = exts.get(ExtensionOID.KEY_USAGE)
    if leaf:
        if bc is not None and bc.value.ca:
            v.append("leaf certificate has CA true")
        if ku is not None:
            k = ku.value
            if not (k.digital_signature and k.key_encipherment):
                v.append("leaf keyUsage lacks digitalSignature or keyEncipherment")
            if k.key_cert_sign or k.crl_sign or k.content_commitment or k.data_encipherment or k.key_agreement:
                v.append("leaf keyUsage has bits beyond digitalSignature and keyEncipherment")
        cn = _attr(cert.subject, NameOID.COMMON_NAME)
        if cn:
            role, _, rest = str(cn[0].value).partition(".")
            if not role or not rest or not role.isupper():
                v.append(f"leaf CN {cn[0].value!r} is not of the form ROLE.name")
    else:
        if bc is None or not bc.value.ca:
            v.append("CA certificate lacks basicConstraints CA true")
        elif bc.value.path_length is None:
            v.append("CA certificate has no pathLenConstraint")
        if ku is not None:
            k = ku.value
            if not k.key_cert_sign:
                v.append("CA keyUsage lacks keyCertSign")
            if k.digital_signature or k.key_encipherment or k.content_commitment or k.data_encipherment or k.key_agreement:
                v.append("CA keyUsage has bits beyond keyCertSign and cRLSign")
    return v


def order_chain(certs: list[x509.Certificate]) -> list[x509.Certificate]:
    """Order leaf first, following issuer names; unknown links are left for the checks."""
    if not certs:
        return []
    issuers_of_others = {c.issuer for c in certs if c.issuer != c.subject}
    leaves = [c for c in certs if c.subject not in issuers_of_others] or [certs[0]]
    chain = [leaves[0]]
    pool = [c for c in certs if c is not leaves[0]]
    while pool:
        nxt = next((c for c in pool if c.subject == chain[-1].issuer), None)
        if nxt is None or chain[-1].issuer == chain[-1].subject:
            break
        chain.append(nxt)
        pool.remove(nxt)
    return chain + pool


def validate_chain(certs: list[x509.Certificate], *, now: dt.datetime | None = None,
                   require_root: bool = True) -> list[str]:
    """430-2 profile validation of a chain (any order); returns violations with positions."""
    if not certs:
        return ["no certificates"]
    chain = order_chain(certs)
    v: list[str] = []
    for i, c in enumerate(chain):
        label = f"[{i}] {c.subject.rfc4514_string()[:80]}"
        v += [f"{label}: {m}" for m in check_certificate(c, leaf=(i == 0), now=now)]
        parent = chain[i + 1] if i + 1 < len(chain) else (c if c.issuer == c.subject else None)
        if parent is None:
            if require_root:
                v.append(f"{label}: chain does not end in a self-signed root")
            continue
        if c.issuer != parent.subject:
            v.append(f"{label}: issuer does not match the next certificate's subject")
            continue
        try:
            pk = parent.public_key()
            assert isinstance(pk, rsa.RSAPublicKey)
            pk.verify(c.signature, c.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA256())
        except (InvalidSignature, AssertionError, TypeError, ValueError):
            v.append(f"{label}: signature does not verify with the issuer's key")
        if parent is not c:
            if not (parent.not_valid_before_utc <= c.not_valid_before_utc and c.not_valid_after_utc <= parent.not_valid_after_utc):
                v.append(f"{label}: validity period is not inside the issuer's")
            try:
                pbc = parent.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value
                cas_below = i  # CA certificates between the parent and the leaf
                if pbc.path_length is not None and cas_below > pbc.path_length:
                    v.append(f"{label}: exceeds the issuer's pathLenConstraint")
            except x509.ExtensionNotFound:
                pass
            try:
                aki = c.extensions.get_extension_for_oid(ExtensionOID.AUTHORITY_KEY_IDENTIFIER).value
                ski = parent.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_KEY_IDENTIFIER).value
                if aki.key_identifier is not None and aki.key_identifier != ski.digest:
                    v.append(f"{label}: authorityKeyIdentifier does not match the issuer's subjectKeyIdentifier")
            except x509.ExtensionNotFound:
                pass
    return v


def peer_chain(leaf_der: bytes, trusted: list[x509.Certificate]) -> list[x509.Certificate]:
    """The peer's chain: its leaf (from TLS) completed from our trust bundle by issuer name."""
    chain = [x509.load_der_x509_certificate(leaf_der)]
    by_subject = {c.subject: c for c in trusted}
    while chain[-1].issuer != chain[-1].subject and chain[-1].issuer in by_subject and len(chain) < 8:
        chain.append(by_subject[chain[-1].issuer])
    return chain
