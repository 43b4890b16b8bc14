"""Test certificates for the SimulCrypt mutual-TLS option, made with `cryptography`: one CA,
and leaves for 127.0.0.1 (server and client auth); a second, untrusted CA for outsiders."""
import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, key, issuer, issuer_key, *, ca):
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        b = (b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                             critical=False)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                            critical=False))
    return b.sign(issuer_key, hashes.SHA256())


def _write(d: Path, name, cert, key=None):
    (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        p = d / f"{name}.key"
        p.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
        p.chmod(0o600)


def make(d: Path) -> dict[str, Path]:
    """ca.pem; server/client leaves of ca; rogue.pem/.key: a leaf of an untrusted CA."""
    out = {}
    for ca_name, leaves in (("ca", ("server", "client")), ("rogue-ca", ("rogue",))):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
        _write(d, ca_name, ca)
        for leaf in leaves:
            k = ec.generate_private_key(ec.SECP256R1())
            _write(d, leaf, _cert(leaf, k, ca_name, ca_key, ca=False), k)
            out[leaf] = d / f"{leaf}.pem"
            out[leaf + "_key"] = d / f"{leaf}.key"
        out[ca_name] = d / f"{ca_name}.pem"
    return out
