"""Representative ASM flows at DEBUG: no LE key, storage key or private key in the logs, the
CLI output, the security log or the database files."""
from __future__ import annotations

import asyncio
import json
import logging
import struct

from ..security.leaks import find_leaks
from .asm_helpers import SyncTLSClient
from tessera.asm import codec
from tessera.asm.codec import LEKey
from tessera.asm.initiator import Initiator, LogCollector
from tessera.asm.store import STORE_KEY_ENV
from tessera.cli import main

LE = {f"le{i}": bytes([0xC0 + i]) + bytes(range(0x31, 0x40)) for i in range(1, 5)}
STORAGE = bytes(range(0xE0, 0x100))


def test_asm_flows_leak_no_key_material(pki, start_responder, tmp_path, caplog, capsys, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(STORE_KEY_ENV, STORAGE.hex())
    r = start_responder(persist_keys=tmp_path / "keys.db", request_timeout=0.5, handshake_timeout=0.8)
    keys = [LEKey(i, LE[f"le{i}"], 3600, 7000 + i) for i in (1, 2)]

    async def api() -> None:
        async with Initiator("127.0.0.1", r.port, creds=pki.creds("initiator")) as ini:
            assert (await ini.le_key_load(keys)).response == 0
            assert (await ini.le_key_query_id(1)).present
            assert (await ini.le_key_purge_id(2)).response == 0
            col = LogCollector(tmp_path / "ini.db", "r")
            try:
                await col.collect(ini)
            finally:
                col.close()

    asyncio.run(asyncio.wait_for(api(), 30))

    # malformed and repeated key loads carrying a key: BadRequest copy, invalid parameter, repeat
    c = SyncTLSClient(r.port, pki.creds("initiator"))
    item = LEKey(3, LE["le3"], 60, 1).pack()
    good = codec.LEKeyLoadRequest(request_id=9, keys=(LEKey(3, LE["le3"], 60, 1),)).encode()
    c.send(good[:-32] + item + b"\x00")  # a trailing byte the length does not cover: unframeable
    c.close()
    c = SyncTLSClient(r.port, pki.creds("initiator"))
    value = struct.pack(">III", 11, 1, 31) + item[:31]  # batch item length 31: invalid parameter
    c.send(codec.klv(codec.LEKeyLoadRequest.KEY, value))
    assert c.recv_klv() is not None
    c.send(good)
    c.send(good)  # repeated Request_ID
    assert c.recv_klv() is not None and c.recv_klv() is not None
    c.close()

    # the CLI: key-load from a file, then key-query-all, at -vv
    f = tmp_path / "keys.json"
    f.write_text(json.dumps([{"id": 4, "key": LE["le4"].hex(), "expire": 60, "attribute": 1}]))
    creds = ["--pki", str(pki.dir), "--port", str(r.port)]
    assert main(["-vv", "asm", "key-load", *creds, "--keys-file", str(f)]) == 0
    assert main(["-vv", "asm", "key-query-all", *creds]) == 0
    assert main(["-vv", "asm", "key-load", *creds, "--random", "2", "--first-id", "20"]) == 0

    out = capsys.readouterr()
    logged = "\n".join(f"{rec.getMessage()} {rec.args!r} {rec.exc_text or ''}" for rec in caplog.records)
    assert "Request_ID 9 repeated" in logged and "loaded 1 key(s)" in out.out  # the flows ran
    events = r.call(lambda: [row for row in r.responder.log._db.execute("SELECT * FROM events")])
    secrets_ = {**LE, "storage": STORAGE, "initiator.key": _der_private(pki.paths["initiator.key"])}
    disk = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.suffix == ".db")
    assert find_leaks(secrets_, logged + out.out + out.err + repr(events), disk) == []
    assert "LEKeyLoad" in repr(events)  # the flows did run and were recorded


def _der_private(path) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(path.read_bytes(), None)
    return key.private_numbers().d.to_bytes(256, "big")[:32]  # a slice of the private exponent
