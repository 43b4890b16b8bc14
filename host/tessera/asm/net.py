"""asyncio glue shared by both peers: a TCP stream driven through a TLSChannel."""
from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from tessera.asm.tls import Credentials, TLSChannel, TLSProfileError, make_context
from tessera.pki import certs

log = logging.getLogger("tessera.asm.net")


class PeerRejected(Exception):
    """The peer's certificate chain fails the SMPTE 430-2 profile."""

    def __init__(self, violations: list[str]) -> None:
        super().__init__("peer certificate chain violates the 430-2 profile: " + "; ".join(violations[:4]))
        self.violations = violations


@dataclass
class Profile:
    """Credentials plus the parsed trust bundle used for the 430-2 chain check."""

    creds: Credentials
    server: bool
    ctx: ssl.SSLContext = field(init=False)
    trusted: list[x509.Certificate] = field(init=False)

    def __post_init__(self) -> None:
        self.ctx = make_context(self.creds, self.server)
        self.trusted = certs.load_pems(Path(self.creds.trust), Path(self.creds.cert_chain))

    def check_peer(self, leaf_der: bytes | None) -> tuple[str, list[x509.Certificate]]:
        """Both roles: the peer chain must pass 430-2 validation, not only OpenSSL's check."""
        if not leaf_der:
            raise PeerRejected(["peer sent no certificate"])
        chain = certs.peer_chain(leaf_der, self.trusted)
        violations = certs.validate_chain(chain)
        if violations:
            raise PeerRejected(violations)
        return certs.thumbprint(chain[0]), chain


class TLSStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, chan: TLSChannel) -> None:
        self.reader, self.writer, self.chan = reader, writer, chan

    async def flush(self) -> None:
        out = self.chan.data_to_send()
        if out:
            self.writer.write(out)
            await self.writer.drain()

    async def handshake(self) -> None:
        await self.flush()
        while not self.chan.handshake_done:
            data = await self.reader.read(4096)
            if not data:
                raise TLSProfileError("connection closed during the handshake")
            self.chan.receive(data)
            await self.flush()

    async def send(self, data: bytes) -> None:
        self.chan.send(data)
        await self.flush()

    async def recv(self) -> bytes:
        """Application bytes (maybe empty if only TLS records arrived); EOF -> ConnectionError."""
        data = await self.reader.read(4096)
        if not data:
            raise ConnectionResetError("peer closed the connection")
        app = self.chan.receive(data)
        await self.flush()
        return app

    async def aclose(self) -> None:
        try:
            if self.chan.handshake_done:
                self.chan.close()
                out = self.chan.data_to_send()
                if out and not self.writer.is_closing():
                    self.writer.write(out)
        except Exception:  # closing must not raise
            pass
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        except (Exception, asyncio.TimeoutError):
            pass
