"""Representative SimulCrypt flows at DEBUG: no service/program/CW-transport/LTK key, TEK or
storage key in the logs or the CLI output, and none in the key store file."""
from __future__ import annotations

import asyncio
import logging

from ..security.leaks import find_leaks
from .conftest import DRM, FAST, SC, eventually, run
from tessera.cli import main
from tessera.simulcrypt import stkm
from tessera.simulcrypt.codec import Message
from tessera.simulcrypt.ecmg import StkmGenerator
from tessera.simulcrypt.emmg import LtkmGenerator, make_ltkms
from tessera.simulcrypt.keystore import STORE_KEY_ENV, KeyStore
from tessera.simulcrypt.mux import Multiplexer
from tessera.simulcrypt.scs import GeneratorSpec, Scs
from tessera.simulcrypt.engine import EcmgConnection
from tessera.simulcrypt.tables import EP, Interface

STORAGE = bytes(range(0x90, 0xB0))


def test_simulcrypt_flows_leak_no_key_material(tmp_path, caplog, capsys, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(STORE_KEY_ENV, STORAGE.hex())
    db = tmp_path / "keys.sqlite"
    ks = KeyStore(db)
    for scid in (DRM, SC):
        ks.add("SEK", scid, 0x101)
        ks.add("CWT", scid, 0)
    ks.add("PEK", DRM, 0x101)
    ks.add("LTK", DRM, 7)
    periods = []

    async def flows():
        drm, sc = StkmGenerator(ks, {DRM}, FAST), StkmGenerator(ks, {SC}, FAST)
        await drm.start(), await sc.start()
        s = Scs("svc", [GeneratorSpec("127.0.0.1", drm.port, DRM, 1, 1, 0x101, cw_key=ks.current("CWT", DRM, 0)),
                        GeneratorSpec("127.0.0.1", sc.port, SC, 1, 1, 0x101)],
                cp_duration=2, protection=stkm.Protection.SRTP, sink=periods.append)
        await s.start()
        await s.run(3)
        await s.close()
        mux = Multiplexer(total_kbps=64)
        await mux.start()
        g = LtkmGenerator(DRM, 1, 1, 0x21)
        await g.connect("127.0.0.1", mux.port)
        await g.request_bandwidth(32)
        await g.send(make_ltkms(ks, DRM, 0x21, 7, DRM, 0x101, count=3))
        await eventually(lambda: len(mux.received) == 3)
        await g.close()
        await mux.close()
        await drm.close(), await sc.close()

    run(flows())
    assert len(periods) == 3 and all(not p.missing for p in periods)

    # an error path that carries a CW: a CW_provision before any channel is set up
    conn = EcmgConnection(StkmGenerator(ks, {DRM}, FAST).core)
    bad = Message.build(Interface.ECMG, 0x0201, 3, [(EP.ECM_CHANNEL_ID, 9), (EP.ECM_STREAM_ID, 9), (EP.CP_NUMBER, 1),
                                                   (EP.CP_CW_COMBINATION, (1).to_bytes(2, "big") + periods[0].tek)])
    conn.receive_data(bad.encode())
    assert conn.data_to_send()  # answered with an error

    ks.close()
    assert main(["-vv", "simulcrypt", "--db", str(db), "keys", "add", "--kind", "SEK", "--owner", hex(DRM),
                 "--scope", "0x102"]) == 0
    assert main(["-vv", "simulcrypt", "--db", str(db), "keys", "list"]) == 0
    out = capsys.readouterr()

    ks = KeyStore(db)
    rows = ks.list()
    secrets_ = {f"{k}/{o:x}/{i}": ks.get(k, o, i).material for k, o, _, i, _ in rows}
    ks.close()
    secrets_ |= {f"TEK {p.cp_number}": p.tek for p in periods}
    secrets_["storage"] = STORAGE
    assert len(secrets_) >= 9
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "answering" in logged and "SEK owner 0x00010001 scope 0x0102" in out.out  # the flows ran
    assert find_leaks(secrets_, logged + out.out + out.err, db.read_bytes()) == []
