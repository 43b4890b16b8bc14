"""The ASM TLS profile (SMPTE 430-6-2008 clause 6.1, 6.4 item 1), enforced record by record.

Clause 6.1 fixes TLS 1.0, TLS_RSA_WITH_AES_128_CBC_SHA (0x00,0x2F), null compression,
mutual authentication with D-cinema certificates, and a TLS record size of 512 bytes.

OpenSSL 3 refuses TLS 1.0 and SHA-1 based handshakes at its default security level (and
Debian's /etc/ssl/openssl.cnf sets MinProtocol = TLSv1.2), so the contexts built here, and
only these, set `@SECLEVEL=0` in their cipher string and pin min = max = TLS 1.0 on the
context, which overrides the system MinProtocol. Nothing else in the process is affected.

CPython's ssl cannot set the record size, so the engine runs on ssl.SSLObject + MemoryBIO
and this module handles the record layer itself:
  * outgoing: application data is written in chunks of at most 512 bytes (one record per
    SSLObject.write); clear-text handshake records (before our ChangeCipherSpec) are
    re-fragmented to at most 512 bytes, which TLS allows for handshake messages;
  * incoming: clear-text records above 512 bytes are refused; after the handshake each
    record is fed to OpenSSL alone and the plaintext it yields is measured, so a record
    carrying more than 512 bytes of plaintext is refused exactly; encrypted handshake
    records (only Finished) are bounded by their largest legal ciphertext size.
"""
from __future__ import annotations

import logging
import ssl
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("tessera.asm.tls")

ASM_PORT = 1173  # clause 6.4 item 3 (IANA well-known port)
MAX_PLAINTEXT = 512  # clause 6.1: "The TLS record size shall equal 512 bytes"
# Largest TLS 1.0 AES-CBC-SHA ciphertext for 512 bytes of plaintext: 512 + 20 (MAC) +
# up to 256 padding bytes, rounded down to the 16-byte block: 784.
MAX_CIPHERTEXT = (MAX_PLAINTEXT + 20 + 256) // 16 * 16
# Issue 10, defined by this project: stock OpenSSL peers that do not set a 512-byte
# fragment limit send their certificate flight in records of 1-3 KB. With the opt-in
# `large_handshake_records` setting, clear-text *handshake* records up to the TLS maximum
# of 2^14 bytes (RFC 2246 6.2.1) are accepted before the handshake completes; every other
# record (alerts, CCS, application data, anything after the handshake) keeps the 512 limit.
MAX_TLS_PLAINTEXT = 16384
TLS10 = 0x0301
SUITE_ID = 0x002F
OPENSSL_CIPHER = "AES128-SHA"  # OpenSSL's name for TLS_RSA_WITH_AES_128_CBC_SHA
CIPHER_STRING = f"{OPENSSL_CIPHER}:@SECLEVEL=0"

OP_NO_ENCRYPT_THEN_MAC = 1 << 19  # SSL_OP_NO_ENCRYPT_THEN_MAC (OpenSSL >= 1.1.0), not exported by ssl

CT_CCS, CT_ALERT, CT_HANDSHAKE, CT_APPDATA = 20, 21, 22, 23


class TLSProfileError(Exception):
    """The peer broke the ASM TLS profile (or is not speaking TLS at all)."""


class TLSClosed(ConnectionError):
    """The peer ended the TLS session with close_notify (an orderly close)."""


@dataclass(frozen=True)
class Credentials:
    """PEM files: our leaf certificate (+ intermediates), its key, and the trusted roots."""

    cert_chain: Path
    key: Path
    trust: Path


def make_context(creds: Credentials, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    if not server:
        ctx.check_hostname = False  # D-cinema peers are named by certificate, not host name
    with warnings.catch_warnings():  # TLSv1 is deprecated in CPython; clause 6.1 requires it
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers(CIPHER_STRING)  # the lowered security level is confined to this context
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    # RFC 2246 records are MAC-then-encrypt; keep OpenSSL from negotiating RFC 7366
    # encrypt-then-MAC, which a strict 430-6 peer would not know (and which changes sizes).
    ctx.options |= OP_NO_ENCRYPT_THEN_MAC
    ctx.verify_mode = ssl.CERT_REQUIRED  # clause 6.4 item 1: mutual authentication
    ctx.load_cert_chain(str(creds.cert_chain), str(creds.key))
    ctx.load_verify_locations(str(creds.trust))
    # TLS 1.3 suites stay listed by OpenSSL but cannot be used with max_version = TLS 1.0
    names = [c["name"] for c in ctx.get_ciphers() if c.get("protocol") != "TLSv1.3"]
    if names != [OPENSSL_CIPHER]:
        raise RuntimeError(f"ASM context offers {names}, expected only {OPENSSL_CIPHER}")
    return ctx


@dataclass(frozen=True)
class Record:
    type: int
    version: int
    body: bytes

    @property
    def raw(self) -> bytes:
        return bytes([self.type]) + self.version.to_bytes(2, "big") + len(self.body).to_bytes(2, "big") + self.body


class RecordReader:
    """Splits a TLS byte stream into records (RFC 2246 clause 6.2.1)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Record]:
        self._buf += data
        out = []
        while len(self._buf) >= 5:
            t, v, n = self._buf[0], int.from_bytes(self._buf[1:3], "big"), int.from_bytes(self._buf[3:5], "big")
            if t not in (CT_CCS, CT_ALERT, CT_HANDSHAKE, CT_APPDATA) or self._buf[1] != 3:
                raise TLSProfileError("not a TLS record stream")
            if n > 16384 + 2048:
                raise TLSProfileError(f"TLS record of {n} bytes")
            if len(self._buf) < 5 + n:
                break
            out.append(Record(t, v, bytes(self._buf[5:5 + n])))
            del self._buf[:5 + n]
        return out


def parse_records(data: bytes) -> list[Record]:
    """Parse a complete captured stream (used by tests and the recording proxy)."""
    r = RecordReader()
    recs = r.feed(data)
    if r.pending:
        raise ValueError("stream ends inside a record")
    return recs


class TLSChannel:
    """Sans-IO TLS endpoint under the ASM profile.

    receive(net bytes) -> application bytes; send(app bytes); data_to_send() -> net bytes.
    """

    def __init__(self, ctx: ssl.SSLContext, server: bool, large_handshake_records: bool = False) -> None:
        """`large_handshake_records`: accept clear-text handshake records above 512 bytes
        (up to 16384) during the handshake only; off by default (clause 6.1 is strict)."""
        self.large_handshake_records = large_handshake_records
        self.largest_handshake_record = 0  # largest clear-text handshake record received
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self._in, self._out, server_side=server)
        self.server = server
        self._reader = RecordReader()
        self._out_reader = RecordReader()
        self._peer_encrypting = False
        self._we_encrypt = False
        self.handshake_done = False
        self._net_out = bytearray()
        self.records_in: list[tuple[int, int]] = []  # (type, length) of every record received
        if not server:
            self._handshake()

    # -- handshake
    def _handshake(self) -> None:
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        else:
            self.handshake_done = True
            self._check_negotiated()
        finally:
            self._collect_out()

    def _check_negotiated(self) -> None:
        name, version, _ = self.obj.cipher() or ("", "", 0)
        if self.obj.version() != "TLSv1" or name != OPENSSL_CIPHER or self.obj.compression() is not None:
            raise TLSProfileError(f"negotiated {self.obj.version()} {name}, outside the ASM profile")

    # -- outgoing
    def _collect_out(self) -> None:
        data = self._out.read()
        if not data:
            return
        for rec in self._out_reader.feed(data):
            if rec.type == CT_CCS:
                self._net_out += rec.raw
                self._we_encrypt = True
            elif not self._we_encrypt:
                for i in range(0, max(len(rec.body), 1), MAX_PLAINTEXT):  # re-fragment clear text
                    self._net_out += Record(rec.type, rec.version, rec.body[i:i + MAX_PLAINTEXT]).raw
            else:
                if len(rec.body) > MAX_CIPHERTEXT:  # cannot happen: we write <= 512-byte chunks
                    raise TLSProfileError("internal: outgoing record above the profile size")
                self._net_out += rec.raw

    def send(self, data: bytes) -> None:
        if not self.handshake_done:
            raise TLSProfileError("send before the handshake completed")
        for i in range(0, len(data), MAX_PLAINTEXT):
            self.obj.write(data[i:i + MAX_PLAINTEXT])  # one record per write
        self._collect_out()

    def data_to_send(self) -> bytes:
        out = bytes(self._net_out)
        self._net_out.clear()
        return out

    def close(self) -> None:
        try:
            self.obj.unwrap()
        except ssl.SSLError:
            pass
        self._collect_out()

    # -- incoming
    def receive(self, data: bytes) -> bytes:
        app = bytearray()
        for rec in self._reader.feed(data):
            self.records_in.append((rec.type, len(rec.body)))
            if rec.version != TLS10 and not (rec.type == CT_HANDSHAKE and not self.handshake_done):
                raise TLSProfileError(f"record version 0x{rec.version:04x}, the profile is TLS 1.0")
            limit = MAX_CIPHERTEXT if self._peer_encrypting else MAX_PLAINTEXT
            clear_handshake = rec.type == CT_HANDSHAKE and not self._peer_encrypting and not self.handshake_done
            if clear_handshake:
                self.largest_handshake_record = max(self.largest_handshake_record, len(rec.body))
                if self.large_handshake_records:
                    limit = MAX_TLS_PLAINTEXT
            if len(rec.body) > limit:
                hint = (" (a peer without a 512-byte fragment limit needs the opt-in large handshake records "
                        "setting)" if clear_handshake else "")
                raise TLSProfileError(f"incoming record of {len(rec.body)} bytes exceeds the 512-byte record size{hint}")
            if rec.type == CT_CCS:
                self._peer_encrypting = True
            self._in.write(rec.raw)
            try:
                if not self.handshake_done:
                    self._handshake()
                if self.handshake_done:
                    got = self._drain()
                    if len(got) > MAX_PLAINTEXT:
                        raise TLSProfileError(f"record carried {len(got)} bytes of plaintext (limit 512)")
                    app += got
            except ssl.SSLError as exc:
                self._collect_out()  # let an alert go out
                raise TLSProfileError(f"TLS failure: {exc.reason or exc}") from None
        return bytes(app)

    def _drain(self) -> bytes:
        got = bytearray()
        while True:
            try:
                chunk = self.obj.read(4096)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                raise TLSClosed("peer closed the TLS session") from None
            if not chunk:
                break
            got += chunk
        self._collect_out()
        return bytes(got)

    @property
    def pending_in(self) -> int:
        """Bytes of an incomplete incoming record held."""
        return self._reader.pending

    def peer_certificate(self) -> bytes | None:
        return self.obj.getpeercert(binary_form=True)


def record_sizes(records: Iterable[Record]) -> list[int]:
    return [len(r.body) for r in records]
