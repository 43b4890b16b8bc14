"""Issue 10: a responder that answers wrongly is a protocol error, not a link failure.

The fake responder below speaks the real TLS profile (TLSChannel, responder credentials)
and answers every request with a well-framed KLV that does not decode (a GetTime response
whose value is 5 bytes instead of 13). Before the fix the initiator took that for a link
failure, opened a second TLS session, and the CLI said "cannot talk to HOST:PORT".
"""
from __future__ import annotations

import asyncio

import pytest

from .conftest import LoopThread
from tessera.asm import codec
from tessera.asm import initiator as ini_mod
from tessera.asm.initiator import Initiator
from tessera.asm.net import TLSStream
from tessera.asm.tls import TLSChannel, make_context
from tessera.cli import main

BAD_GETTIME = codec.klv(codec.ul(0x02, 0x11), b"\x00\x00\x00\x01\x00")  # value too short to decode


class FakeResponder:
    def __init__(self, creds, reply: bytes = BAD_GETTIME) -> None:
        self.ctx = make_context(creds, server=True)
        self.reply = reply
        self.sessions = 0  # TLS handshakes completed
        self.requests = 0
        self.lt = LoopThread()
        self.port = self.lt.run(self._start())

    async def _start(self) -> int:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _conn(self, reader, writer) -> None:
        stream = TLSStream(reader, writer, TLSChannel(self.ctx, server=True))
        try:
            await asyncio.wait_for(stream.handshake(), 5)
            self.sessions += 1
            while True:
                if await stream.recv():
                    self.requests += 1
                    await stream.send(self.reply)
        except Exception:
            pass
        finally:
            await stream.aclose()

    def stop(self) -> None:
        async def _s():
            self.server.close()
            await self.server.wait_closed()
        self.lt.run(_s())
        self.lt.stop()


@pytest.fixture
def fake(pki):
    f = FakeResponder(pki.creds("responder"))
    yield f
    f.stop()


def test_undecodable_reply_is_a_protocol_error_without_reconnect(pki, fake):
    async def go():
        ini = Initiator("127.0.0.1", fake.port, creds=pki.creds("initiator"), timeout=2.0)
        await ini.connect()
        with pytest.raises(ini_mod.PeerProtocolError, match="undecodable response"):
            await ini.get_time()
        assert ini.link_restarts == 0 and ini.protocol_errors == 1
        await asyncio.sleep(0.3)  # a reconnect, if any, would have completed its handshake
        await ini.close()

    asyncio.run(asyncio.wait_for(go(), 20))
    assert fake.requests == 1
    assert fake.sessions == 1  # no second TLS session was opened


def test_cli_reports_protocol_error_and_opens_one_session(pki, fake, caplog):
    rc = main(["asm", "get-time", "--pki", str(pki.dir), "--port", str(fake.port)])
    err = "\n".join(r.getMessage() for r in caplog.records if r.name == "tessera")
    assert rc == 2
    assert "protocol error" in err and "undecodable response" in err
    assert "cannot talk to" not in err
    assert fake.sessions == 1 and fake.requests == 1
