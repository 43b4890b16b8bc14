"""Test helpers (importable from the asm tests)."""
from __future__ import annotations

import socket
import ssl

from tessera.asm.tls import Credentials, TLSChannel, make_context


class SyncTLSClient:
    """Blocking test client on the ASM TLS channel, able to send arbitrary bytes."""

    def __init__(self, port: int, creds: Credentials, ctx: ssl.SSLContext | None = None, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.chan = TLSChannel(ctx or make_context(creds, server=False), server=False)
        self._flush()
        while not self.chan.handshake_done:
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("closed during handshake")
            self.chan.receive(data)
            self._flush()
        self.app = bytearray()

    def _flush(self) -> None:
        out = self.chan.data_to_send()
        if out:
            self.sock.sendall(out)

    def send(self, data: bytes) -> None:
        self.chan.send(data)
        self._flush()

    def recv_klv(self) -> bytes | None:
        """One complete KLV message, or None when the peer closed the connection."""
        while True:
            if len(self.app) >= 20:
                n = int.from_bytes(self.app[17:20], "big")
                if len(self.app) >= 20 + n:
                    msg = bytes(self.app[:20 + n])
                    del self.app[:20 + n]
                    return msg
            try:
                data = self.sock.recv(4096)
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not data:
                return None
            try:
                self.app += self.chan.receive(data)
            except Exception:
                return None
            self._flush()

    def close(self) -> None:
        self.sock.close()
