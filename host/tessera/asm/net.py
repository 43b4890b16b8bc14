"""asyncio glue shared by both peers: a TCP stream driven through a TLSChannel."""
from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from tessera.asm.tls import Credentials, TLSChannel, TLSProfileError, make_context
from tessera.pki import certs

log = logging.getLogger("tessera.asm.net")

# Roles (leaf CN prefix, SMPTE 430-2) each side accepts from its peer by default. Project
# choices, configurable: ASM initiators are Security Managers (clause 6.1 "the Initiator
# (which contains the Security Manager)"); responders are remote SPBs -- link decryptor,
# link encryptor, projector.
INITIATOR_ROLES: frozenset[str] = frozenset({"SM"})
RESPONDER_ROLES: frozenset[str] = frozenset({"LD", "LE", "PR"})


class PeerRejected(Exception):
    """The peer's certificate chain fails the SMPTE 430-2 profile."""

    def __init__(self, violations: list[str], thumbprint: str | None = None) -> None:
        super().__init__("peer certificate chain violates the 430-2 profile: " + "; ".join(violations[:4]))
        self.violations = violations
        self.thumbprint = thumbprint


class RoleRefused(PeerRejected):
    """The peer's chain is valid but its leaf role is not one accepted for that peer."""

    def __init__(self, cn: str, roles: frozenset[str], allowed: frozenset[str], peer: str, thumbprint: str) -> None:
        why = (f"{peer} certificate CN {cn!r} has role(s) {','.join(sorted(roles)) or 'none'}; "
               f"accepted for the {peer}: {','.join(sorted(allowed))}")
        Exception.__init__(self, "peer certificate role refused: " + why)
        self.violations = [why]
        self.thumbprint = thumbprint
        self.roles = roles


@dataclass
class Profile:
    """Credentials plus the parsed trust bundle used for the 430-2 chain check."""

    creds: Credentials
    server: bool
    peer_roles: frozenset[str] | None = None  # None: INITIATOR_ROLES on a server, else RESPONDER_ROLES
    ctx: ssl.SSLContext = field(init=False)
    trusted: list[x509.Certificate] = field(init=False)

    def __post_init__(self) -> None:
        self.ctx = make_context(self.creds, self.server)
        self.trusted = certs.load_pems(Path(self.creds.trust), Path(self.creds.cert_chain))
        if self.peer_roles is None:
            self.peer_roles = INITIATOR_ROLES if self.server else RESPONDER_ROLES
        self.peer_roles = frozenset(self.peer_roles)
        if not self.peer_roles:
            raise ValueError("at least one peer role must be accepted")

    def check_peer(self, leaf_der: bytes | None) -> tuple[str, list[x509.Certificate]]:
        """Both sides: the peer chain must pass 430-2 validation, not only OpenSSL's check,
        and the leaf must carry a role accepted for that peer (RoleRefused otherwise)."""
        if not leaf_der:
            raise PeerRejected(["peer sent no certificate"])
        chain = certs.peer_chain(leaf_der, self.trusted)
        thumb = certs.thumbprint(chain[0])
        violations = certs.validate_chain(chain)
        if violations:
            raise PeerRejected(violations, thumb)
        roles = certs.leaf_roles(chain[0])
        assert self.peer_roles is not None
        if not roles & self.peer_roles:
            cn = chain[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            raise RoleRefused(str(cn[0].value) if cn else "", roles, self.peer_roles,
                              "initiator" if self.server else "responder", thumb)
        return thumb, chain


WRITE_CHUNK = 16 * 1024  # project choice: bytes handed to the transport between drains


class TLSStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, chan: TLSChannel) -> None:
        self.reader, self.writer, self.chan = reader, writer, chan

    async def flush(self) -> None:
        """Write pending TLS bytes in WRITE_CHUNK pieces, waiting for each to drain, so the
        transport never buffers much more than its high-water mark for a slow reader."""
        out = self.chan.data_to_send()
        for i in range(0, len(out), WRITE_CHUNK):
            self.writer.write(out[i:i + WRITE_CHUNK])
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
        except asyncio.TimeoutError:
            self.abort()  # a peer that never reads cannot hold the socket open
        except Exception:
            pass

    def abort(self) -> None:
        self.writer.transport.abort()
