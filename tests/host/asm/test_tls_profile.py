"""The clause 6.1 TLS profile on the wire: a recording proxy parses every TLS record."""
from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import time
import warnings

import pytest

from tessera.asm import codec
from tessera.asm.codec import LEKey
from tessera.asm.initiator import Initiator
from tessera.asm.tls import MAX_PLAINTEXT, TLSProfileError, parse_records

from .asm_helpers import SyncTLSClient


class RecordingProxy:
    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.c2s = bytearray()
        self.s2c = bytearray()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _pipe(self, r, w, buf):
        try:
            while data := await r.read(65536):
                buf += data
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    async def _conn(self, r, w):
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        await asyncio.gather(self._pipe(r, uw, self.c2s), self._pipe(ur, w, self.s2c))

    async def stop(self):
        self.server.close()


def handshake_messages(records):
    """Clear-text handshake messages (before the sender's ChangeCipherSpec), reassembled."""
    buf = bytearray()
    for r in records:
        if r.type == 20:
            break
        if r.type == 22:
            buf += r.body
    out = []
    while len(buf) >= 4:
        n = int.from_bytes(buf[1:4], "big")
        out.append((buf[0], bytes(buf[4:4 + n])))
        del buf[:4 + n]
    return out


def test_wire_profile_version_suite_and_record_sizes(pki, responder):
    proxy = RecordingProxy(responder.port)
    pport = responder.lt.run(proxy.start())
    big_keys = [LEKey(i, bytes(16), 3600, i) for i in range(1, 17)]

    async def go():
        async with Initiator("127.0.0.1", pport, creds=pki.creds("initiator")) as ini:
            await ini.get_time()
            assert (await ini.le_key_load(big_keys)).response == 0  # 544-byte message: 2 records
            lst = await ini.get_event_list(0, 2**32 - 1)
            for eid in lst.event_ids:
                rec = await ini.get_event_id(eid)  # XML records of several hundred bytes
                assert rec.log_record.startswith(b"<?xml")

    asyncio.run(go())
    time.sleep(0.1)
    responder.lt.run(proxy.stop())
    c, s = parse_records(bytes(proxy.c2s)), parse_records(bytes(proxy.s2c))
    assert c and s
    for r in c + s:
        assert r.version == 0x0301, f"record version {r.version:#06x}"
    # ClientHello: TLS 1.0, only 0x002F (plus the renegotiation SCSV 0x00FF), null compression
    ch_type, ch = handshake_messages(c)[0]
    assert ch_type == 1 and ch[:2] == b"\x03\x01"
    p = 2 + 32
    p += 1 + ch[p]
    n = struct.unpack_from(">H", ch, p)[0]
    suites = set(struct.unpack_from(f">{n // 2}H", ch, p + 2))
    assert suites - {0x00FF} == {0x002F}
    p += 2 + n
    assert ch[p + 1:p + 1 + ch[p]] == b"\x00"
    # ServerHello: TLS 1.0, 0x002F, compression 0
    sh_type, sh = handshake_messages(s)[0]
    assert sh_type == 2 and sh[:2] == b"\x03\x01"
    q = 2 + 32
    q += 1 + sh[q]
    assert struct.unpack_from(">H", sh, q)[0] == 0x002F and sh[q + 2] == 0
    # Mutual authentication: the server asked for a certificate (CertificateRequest = 13)
    assert 13 in [t for t, _ in handshake_messages(s)]
    # Record sizes: clear text <= 512; AES-CBC-SHA ciphertext for <= 512 bytes plaintext <= 544
    for side in (c, s):
        seen_ccs = False
        for r in side:
            if r.type == 20:
                seen_ccs = True
                continue
            assert len(r.body) <= (MAX_PLAINTEXT + 20 + 16 if seen_ccs else MAX_PLAINTEXT), (r.type, len(r.body))
    # the certificate flight really was split, and full-size application records occur
    assert sum(1 for r in s if r.type == 22) > 2
    assert max(len(r.body) for r in c if r.type == 23) == 544
    assert max(len(r.body) for r in s if r.type == 23) == 544


def _raw_client(port, ctx):
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return ctx.wrap_socket(sock, server_hostname=None)


def test_tls12_client_refused(pki, responder):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    c = pki.creds("initiator")
    ctx.load_cert_chain(str(c.cert_chain), str(c.key))
    ctx.load_verify_locations(str(c.trust))
    proxy = RecordingProxy(responder.port)
    pport = responder.lt.run(proxy.start())
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _raw_client(pport, ctx).recv(1)
    time.sleep(0.1)
    responder.lt.run(proxy.stop())
    s = parse_records(bytes(proxy.s2c))
    # The responder never agrees to TLS 1.2: its ServerHello (if any) says TLS 1.0, which a
    # 1.2-only client then rejects; no application data ever flows.
    hello = [m for t, m in handshake_messages(s) if t == 2]
    assert all(m[:2] == b"\x03\x01" for m in hello)
    assert not [r for r in s if r.type == 23]
    assert not any(e[3] == "LinkOpened" for e in responder.responder.log.events())
    assert SyncTLSClient(responder.port, pki.creds("initiator")).chan.handshake_done  # others still served


def test_other_cipher_suite_refused(pki, responder):
    c = pki.creds("initiator")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("AES256-SHA:DES-CBC3-SHA:@SECLEVEL=0")
    ctx.load_cert_chain(str(c.cert_chain), str(c.key))
    ctx.load_verify_locations(str(c.trust))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _raw_client(responder.port, ctx).recv(1)
    time.sleep(0.1)
    logged = b"".join(responder.responder.log.get(e[0]) for e in responder.responder.log.events())
    assert b"NO_SHARED_CIPHER" in logged


def test_initiator_refuses_tls12_server(pki, tmp_path):
    """The initiator side of the profile: a server that only speaks TLS 1.2 is refused."""
    c = pki.creds("responder")
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.minimum_version = ssl.TLSVersion.TLSv1_2
    sctx.load_cert_chain(str(c.cert_chain), str(c.key))

    async def go():
        async def handle(r, w):
            try:
                await asyncio.wait_for(r.read(100), 2)
            except Exception:
                pass
            w.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=sctx)
        port = srv.sockets[0].getsockname()[1]
        try:
            with pytest.raises(TLSProfileError):
                await Initiator("127.0.0.1", port, creds=pki.creds("initiator")).connect()
        finally:
            srv.close()

    asyncio.run(go())


@pytest.mark.parametrize("size", [600, 1000])
def test_oversized_incoming_record_refused(pki, responder, size):
    """A record carrying more than 512 bytes of plaintext closes the connection, even when its
    ciphertext (600 bytes -> 624) is within the largest legal size for 512."""
    cl = SyncTLSClient(responder.port, pki.creds("initiator"))
    req = codec.GetEventIDResponse(1, b"x" * (size - 25)).encode()  # any bytes; size is what matters
    req = codec.klv(codec.GetEventIDRequest.KEY, req[20:])[:size]
    cl.chan.obj.write(req)  # bypasses the channel's 512-byte chunking
    cl.sock.sendall(cl.chan._out.read())
    assert cl.recv_klv() is None
    ok = SyncTLSClient(responder.port, pki.creds("initiator"))
    ok.send(codec.GetTimeRequest(1).encode())
    assert codec.decode(ok.recv_klv()).request_id == 1
    time.sleep(0.1)
    exc = [e for e in responder.responder.log.events() if e[3] == "LinkException"]
    assert exc


def test_non_tls_client_dropped(responder):
    s = socket.create_connection(("127.0.0.1", responder.port), timeout=3)
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    t = time.monotonic()
    assert s.recv(100) == b""
    assert time.monotonic() - t < 1.0


@pytest.mark.parametrize("partial", [b"", b"\x16\x03\x01\x00\x40\x01"])
def test_stalled_handshake_dropped(pki, responder, partial):
    s = socket.create_connection(("127.0.0.1", responder.port), timeout=4)
    s.sendall(partial)
    ok = SyncTLSClient(responder.port, pki.creds("initiator"))  # served meanwhile
    ok.send(codec.QuerySPBRequest(3).encode())
    assert codec.decode(ok.recv_klv()).request_id == 3
    t = time.monotonic()
    assert s.recv(100) == b""
    assert time.monotonic() - t < 2.0  # handshake_timeout is 0.8 s in this fixture


def test_stalled_mid_request_dropped(pki, responder):
    cl = SyncTLSClient(responder.port, pki.creds("initiator"))
    cl.send(codec.GetTimeRequest(1).encode()[:10])
    t = time.monotonic()
    assert cl.recv_klv() is None
    assert 0.3 < time.monotonic() - t < 2.0  # request_timeout is 0.5 s in this fixture
