"""ECDSA P-256 certificates for RMCP-2 mutual TLS (profile B.10: ECDSA P-256 + ECDHE keep
an MCU's handshake short) and the `ssl` contexts built on them.

`make_pki(dir, names)` writes `ca.pem` (the session's trust anchor), and for each name
`<name>.pem` / `<name>.key` (PKCS#8, mode 0600). The SM verifies every MA's certificate
against the CA (CERT_REQUIRED) and MAs verify the SM's; TLS 1.2 or later only.
TLS_PSK: CPython's `ssl` has PSK callbacks only from 3.13 and MicroPython's has none, so
Tessera runs TLS_CERT only (docs/rmcp2.md).
"""
from __future__ import annotations

import datetime as dt
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tessera.errors import TesseraError

UTC = dt.timezone.utc


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer, ca: bool, days: int,
          san: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = dt.datetime.now(UTC) - dt.timedelta(minutes=5)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]),
                            critical=False)
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(signer, hashes.SHA256())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def make_pki(d: Path | str, names: list[str], days: int = 365, ca_name: str = "ca") -> dict[str, Path]:
    """A CA and one P-256 leaf per name (CN = name; SAN the name, 127.0.0.1, ::1, localhost)."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_dn = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Tessera RMCP-2 {ca_name}")])
    ca = _cert(f"Tessera RMCP-2 {ca_name}", ca_key, ca_dn, ca_key, True, days)
    (d / f"{ca_name}.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    import ipaddress
    san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1")),
           x509.DNSName("localhost")]
    out = {ca_name: d / f"{ca_name}.pem"}
    for n in names:
        k = ec.generate_private_key(ec.SECP256R1())
        c = _cert(n, k, ca_dn, ca_key, False, days, [x509.DNSName(n), *san])  # a board checks the SM by name
        (d / f"{n}.pem").write_bytes(c.public_bytes(serialization.Encoding.PEM))
        _write_key(d / f"{n}.key", k)
        out[n] = d / f"{n}.pem"
    return out


def _ctx(purpose: ssl.Purpose, cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as e:
        raise TesseraError(f"cannot load certificate {cert} / key {key}: {e}") from None
    return ctx


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """The SM: its certificate, and a client certificate from the CA required (mutual TLS)."""
    return _ctx(ssl.Purpose.CLIENT_AUTH, cert, key, ca)


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """An MA: its client certificate; the SM's certificate must chain to the CA. The SM is
    named by the CA, not by a host name (MAIDs are addresses, B.1), so no host-name check."""
    ctx = _ctx(ssl.Purpose.SERVER_AUTH, cert, key, ca)
    ctx.check_hostname = False
    return ctx


def pki_paths(d: Path | str, name: str, ca_name: str = "ca") -> tuple[Path, Path, Path]:
    d = Path(d)
    paths = (d / f"{name}.pem", d / f"{name}.key", d / f"{ca_name}.pem")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise TesseraError(f"missing {', '.join(missing)} (`tessera sm pki --dir {d} {name}` makes them)")
    return paths
