"""STKM generator and SCS over loopback TCP: STKMs for two services on DRM and Smartcard
generators over several crypto-periods, CW_encryption, and a peer vanishing mid-period."""
import asyncio

import pytest

from .conftest import DRM, FAST, SC, eventually, run

from tessera.simulcrypt import stkm
from tessera.simulcrypt.ecmg import StkmGenerator
from tessera.simulcrypt.scs import GeneratorSpec, Scs, ScsError


def check_period(ks, p, ecm_id):
    assert not p.missing, p.missing
    for scid, blob in p.stkms.items():
        key = ks.traffic_key(scid, ecm_id)
        rec = stkm.parse(blob, key.material)
        assert rec.teks[0] == (p.cp_number, p.tek)  # the scrambler's TEK is in the STKM
        assert len(rec.teks) == 2 and rec.teks[1][0] == (p.cp_number + 1) & 0xFFFF
        assert rec.profile == scid >> 16 and rec.ecm_id == ecm_id and rec.protection == p.protection
        assert rec.traffic_params == p.traffic_params
        assert rec.key_kind == (stkm.KeyKind.PEK if (scid, ecm_id) == (DRM, 0x102) else stkm.KeyKind.SEK)
        assert p.in_time[scid], p.latency
        start, stop = p.windows[scid]
        assert abs(start - (p.start - 0.05)) < 1e-6 and abs(stop - (p.end + 0.02)) < 1e-6
        assert p.rep_period_ms[scid] == 50


def test_two_services_several_periods(keystore):
    async def main():
        drm = StkmGenerator(keystore, {DRM}, FAST)
        sc = StkmGenerator(keystore, {SC}, FAST)
        await drm.start(), await sc.start()
        got = []
        services = []
        for n, (ecm_id, prot) in enumerate(((0x101, stkm.Protection.SRTP), (0x102, stkm.Protection.IPSEC))):
            gens = [GeneratorSpec("127.0.0.1", drm.port, DRM, 10 + n, 1, ecm_id, cw_key=keystore.current("CWT", DRM, 0)),
                    GeneratorSpec("127.0.0.1", sc.port, SC, 10 + n, 1, ecm_id)]
            s = Scs(f"svc{n}", gens, cp_duration=2, protection=prot, sink=got.append, access_rule=b"rule")
            await s.start()
            services.append((s, ecm_id))
        res = await asyncio.gather(*(s.run(4, first_cp=0xFFFE) for s, _ in services))
        assert [p.cp_number for p in res[0]] == [0xFFFE, 0xFFFF, 0, 1]  # CP_number wraps
        alive = await services[0][0].test_channels()
        assert alive == {DRM: True, SC: True}
        for s, _ in services:
            await s.close()
        await eventually(lambda: not drm.core.channels and not drm.core.ecm_ids)  # closed cleanly
        await drm.close(), await sc.close()
        return res, got, drm

    res, got, drm = run(main())
    assert len(got) == 8 and drm.stats.stkms == 8
    for periods, ecm_id in zip(res, (0x101, 0x102)):
        for p in periods:
            check_period(keystore, p, ecm_id)
        teks = {p.tek for p in periods}
        assert len(teks) == 4  # a fresh TEK per crypto-period
    # consecutive periods: CP k's STKM carries TEK k+1 that CP k+1 then uses
    p0, p1 = res[0][0], res[0][1]
    assert stkm.parse(p0.stkms[SC], keystore.traffic_key(SC, 0x101).material).teks[1][1] == p1.tek


def test_generator_rejects_unknown_stkmstream(keystore):
    async def main():
        g = StkmGenerator(keystore, {DRM}, FAST)
        await g.start()
        s = Scs("svc", [GeneratorSpec("127.0.0.1", g.port, DRM, 1, 1, 0x999)], cp_duration=2)
        with pytest.raises(ScsError) as ei:
            await s.start()
        await eventually(lambda: not g.core.channels)  # the half-open channel was dropped and freed
        await g.close()
        return ei.value

    err = run(main())
    assert "unknown_ecm_id" in str(err)


def test_peer_vanishes_mid_period(keystore):
    """One SCS's generator connection dies mid-run: that SCS keeps the other KMS's STKMs,
    reconnects at a later crypto-period; another service's channel is unaffected."""
    async def main():
        drm = StkmGenerator(keystore, {DRM}, FAST)
        sc = StkmGenerator(keystore, {SC}, FAST)
        await drm.start(), await sc.start()
        a = Scs("a", [GeneratorSpec("127.0.0.1", drm.port, DRM, 1, 1, 0x101),
                      GeneratorSpec("127.0.0.1", sc.port, SC, 1, 1, 0x101)], cp_duration=2)
        b = Scs("b", [GeneratorSpec("127.0.0.1", drm.port, DRM, 2, 1, 0x102)], cp_duration=2)
        await a.start(), await b.start()

        async def kill():
            await asyncio.sleep(0.35)
            # abrupt loss of a's DRM connection (RST, no channel_close)
            w = a.links[0].writer
            w.transport.abort()

        ra, rb, _ = await asyncio.gather(a.run(6), b.run(6), kill())
        await a.close(), await b.close()
        await drm.close(), await sc.close()
        return ra, rb

    ra, rb = run(main())
    assert all(not p.missing for p in rb), [p.missing for p in rb]
    lost = [p for p in ra if DRM in p.missing]
    assert lost, "the DRM link should have been lost"
    assert all(SC in p.stkms for p in ra)  # the other KMS kept going
    assert DRM in ra[-1].stkms  # reconnected with the same ECM_channel_id once the generator freed it


@pytest.mark.parametrize("lead, per", [(2, 3), (0, 1)])
def test_other_lead_cw_and_cw_per_msg(keystore, lead, per):
    """The SCS follows what the generator advertises: STKM k carries TEKs k+lead-per+1 .. k+lead."""
    from tessera.simulcrypt.engine import EcmgCaps

    caps = EcmgCaps(delay_start=-50, delay_stop=20, ecm_rep_period=50, max_streams=8, min_cp_duration=1,
                    lead_cw=lead, cw_per_msg=per, max_comp_time=50)

    async def main():
        g = StkmGenerator(keystore, {DRM}, caps)
        await g.start()
        s = Scs("svc", [GeneratorSpec("127.0.0.1", g.port, DRM, 1, 1, 0x101)], cp_duration=2)
        await s.start()
        periods = await s.run(3, first_cp=5)
        await s.close(), await g.close()
        return s, periods

    s, periods = run(main())
    key = keystore.traffic_key(DRM, 0x101).material
    for p in periods:
        rec = stkm.parse(p.stkms[DRM], key)
        assert [cp for cp, _ in rec.teks] == list(range(p.cp_number + lead - per + 1, p.cp_number + lead + 1))
        assert dict(rec.teks)[p.cp_number] == p.tek
    # with lead_CW >= 1 the STKM of a period already carries the next period's TEK
    assert (periods[1].tek in [t for _, t in stkm.parse(periods[0].stkms[DRM], key).teks]) == (lead >= 1)
    with pytest.raises(ValueError, match="lead_CW"):
        StkmGenerator(keystore, {DRM}, EcmgCaps(lead_cw=3, cw_per_msg=2))
