"""tessera.api.simulcrypt: an STKM generator and a MUX started through the API on ephemeral
loopback ports, an SCS and an LTKM generator run against them with one call each."""
from __future__ import annotations

import asyncio

import pytest

from tessera.api.simulcrypt import (Generator, Multiplexer, SimulcryptError, StkmGenerator, add_key, list_keys,
                                    open_key_store, run_scs, send_ltkms)

CAS = 0x00010001


def test_head_end_roles(tmp_path):
    store = open_key_store(tmp_path / "keys.sqlite")
    try:
        sek = add_key(store, "SEK", CAS, 0x101)
        assert (sek.kind, sek.owner, sek.scope, sek.bits) == ("SEK", CAS, 0x101, 128)
        with pytest.raises(SimulcryptError):
            add_key(store, "LTK", 0x00020001, 1)  # an LTK belongs to a DRM client_id
        assert [k.kind for k in list_keys(store)] == ["SEK"]

        async def head_end():
            gen, mux = StkmGenerator(store, {CAS}), Multiplexer(500)
            gport, mport = await gen.start(), await mux.start()
            try:
                seen = []
                periods = await run_scs("tv1", [Generator("127.0.0.1", gport, CAS, 0x101)], 2, cp_duration=5,
                                        on_period=seen.append)
                report = await send_ltkms("127.0.0.1", mport, store, 0x00010007, CAS, 0x101, count=3, kbps=64)
                return periods, seen, report
            finally:
                await gen.close()
                await mux.close()

        periods, seen, report = asyncio.run(asyncio.wait_for(head_end(), 60))
        assert [p.cp_number for p in periods] == [p.cp_number for p in seen] and len(periods) == 2
        assert all(CAS in p.stkms and not p.missing for p in periods)
        assert periods[0].tek != periods[1].tek
        assert report.sent == 3 and report.errors == 0 and report.bytes > 0 and report.kbps >= 1

        async def nobody_listening():
            return await run_scs("tv1", [Generator("127.0.0.1", 1, CAS, 0x101)], 1)

        with pytest.raises(SimulcryptError):
            asyncio.run(nobody_listening())
    finally:
        store.close()
