"""Issue 10: peers on plain `ssl` (stock OpenSSL, no 512-byte fragment limit).

A "stock" peer here is CPython's ssl.SSLSocket with the ASM context (TLS 1.0, AES128-SHA,
mutual authentication) but none of TLSChannel's record handling: OpenSSL then sends its
certificate flight in records of 1-3 KB. By default Tessera refuses them (clause 6.1: 512);
with the opt-in large handshake records setting the handshake completes, and application
data above 512 bytes is still refused.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading

import pytest

from tessera.asm import codec
from tessera.asm.codec import LEKey
from tessera.asm.initiator import Initiator
from tessera.asm.tls import TLSProfileError, make_context
from tessera.cli import main


def stock_client(port: int, creds) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return make_context(creds, server=False).wrap_socket(raw)  # handshake on connect


def read_klv(s: ssl.SSLSocket) -> bytes:
    buf = b""
    while len(buf) < 20 or len(buf) < 20 + int.from_bytes(buf[17:20], "big"):
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def _handshake_records(responder) -> list[bytes]:
    ev = responder.responder.log.events()
    return [responder.responder.log.get(e[0]) for e in ev if e[3] in ("LinkException", "LinkOpened")]


def test_strict_responder_refuses_a_stock_initiator(pki, start_responder):
    r = start_responder()
    with pytest.raises((ssl.SSLError, OSError)):
        s = stock_client(r.port, pki.creds("initiator"))
        s.sendall(codec.GetTimeRequest(1).encode())
        read_klv(s)  # TLS 1.0 client: its handshake "completes" before the server's verdict
    recs = b"".join(r.call(_handshake_records, r))
    assert b"exceeds the 512-byte record size" in recs


def test_lenient_responder_accepts_a_stock_initiator_but_not_large_app_records(pki, start_responder, caplog):
    caplog.set_level(logging.INFO, logger="tessera.asm")
    r = start_responder(large_handshake_records=True)
    assert any("above 512 bytes" in m.getMessage() for m in caplog.records)  # logged at start
    s = stock_client(r.port, pki.creds("initiator"))
    s.sendall(codec.GetTimeRequest(7).encode())
    resp = codec.decode(read_klv(s))
    assert isinstance(resp, codec.GetTimeResponse) and resp.request_id == 7 and resp.response == 0
    opened = b"".join(r.call(_handshake_records, r))
    assert b"LargeHandshakeRecords" in opened  # the security log says it was used
    # application data keeps the 512-byte limit: one 672-byte record is refused
    keys = tuple(LEKey(i, bytes(16), 60, i) for i in range(1, 21))
    s.sendall(codec.LEKeyLoadRequest(8, keys).encode())
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        read_klv(s)
    s.close()
    assert r.call(r.responder.keys.ids) == []
    assert b"672 bytes of plaintext (limit 512)" in b"".join(r.call(_handshake_records, r))


class StockResponder(threading.Thread):
    """A responder on plain ssl: answers one GetTime per connection."""

    def __init__(self, creds) -> None:
        super().__init__(daemon=True)
        self.ctx = make_context(creds, server=True)
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.lsock.settimeout(20)
        self.handshakes = 0
        self.start()

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.lsock.accept()
            except OSError:
                return
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as s:
                    self.handshakes += 1
                    req = codec.decode(read_klv(s))
                    s.sendall(codec.GetTimeResponse(req.request_id, 1234, 0).encode())
                    s.recv(1)
            except (OSError, ssl.SSLError, ConnectionError, codec.CodecError):
                pass

    def stop(self) -> None:
        self.lsock.close()


@pytest.fixture
def stock_responder(pki):
    s = StockResponder(pki.creds("responder"))
    yield s
    s.stop()


def test_initiator_strict_by_default_lenient_on_request(pki, stock_responder):
    async def get(large: bool):
        ini = Initiator("127.0.0.1", stock_responder.port, creds=pki.creds("initiator"), connect_timeout=5,
                        large_handshake_records=large)
        async with ini:
            return await ini.get_time()

    with pytest.raises(TLSProfileError, match="exceeds the 512-byte record size"):
        asyncio.run(get(False))
    assert asyncio.run(get(True)).time == 1234


def test_cli_flag(pki, stock_responder, caplog):
    common = ["--pki", str(pki.dir), "--port", str(stock_responder.port)]
    assert main(["asm", "get-time", *common]) == 2
    assert main(["asm", "get-time", "--large-handshake-records", *common]) == 0
    assert any("accepted because large handshake records are enabled" in m.getMessage() for m in caplog.records)
