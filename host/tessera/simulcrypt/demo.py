"""Demo: a BCAST head-end over SimulCrypt. Two SCS instances (one per service) drive a DRM
and a Smartcard STKM generator over several crypto-periods; each STKM is checked as a
terminal would (decrypt with the service/program key, find the crypto-period's TEK).
An LTKM generator then feeds a MUX within its allocated bandwidth."""
from __future__ import annotations

import asyncio

from tessera.simulcrypt import ltkm, stkm
from tessera.simulcrypt.ecmg import StkmGenerator
from tessera.simulcrypt.emmg import LtkmGenerator, make_ltkms
from tessera.simulcrypt.engine import EcmgCaps
from tessera.simulcrypt.keystore import KeyStore
from tessera.simulcrypt.mux import Multiplexer
from tessera.simulcrypt.scs import CryptoPeriod, GeneratorSpec, Scs

TITLE = "OMA BCAST SP-4 over DVB SimulCrypt: STKM generators, SCS, LTKM generator and MUX"
ORDER = 40

DRM, SMARTCARD, CLIENT = 0x00010001, 0x00020001, 0x00010001
SERVICES = [("news", 0x0101, stkm.Protection.SRTP), ("sport", 0x0102, stkm.Protection.IPSEC)]
PERIODS = 4
CP_DURATION = 3  # 100 ms units


async def _headend(ctx, ks: KeyStore) -> None:
    caps = EcmgCaps(delay_start=-100, delay_stop=50, ecm_rep_period=100, max_streams=16, min_cp_duration=2,
                    lead_cw=1, cw_per_msg=2, max_comp_time=50)
    gens = {DRM: StkmGenerator(ks, {DRM}, caps), SMARTCARD: StkmGenerator(ks, {SMARTCARD}, caps)}
    for scid, g in gens.items():
        await g.start()
        ctx.step(f"STKM generator 0x{scid:08x} on 127.0.0.1:{g.port}")
    checked: list[str] = []

    def scrambler(p: CryptoPeriod) -> None:
        if p.missing:
            raise RuntimeError(f"{p.service} CP {p.cp_number}: STKM missing from {p.missing}")
        for scid, blob in p.stkms.items():
            ecm_id = next(e for n, e, _ in SERVICES if n == p.service)
            rec = stkm.parse(blob, ks.traffic_key(scid, ecm_id).material)  # what a terminal does
            if rec.teks[0] != (p.cp_number, p.tek) or not p.in_time[scid]:
                raise RuntimeError(f"{p.service} CP {p.cp_number}: STKM out of step with the TEK")
        checked.append(p.service)

    scss = []
    try:
        for n, (name, ecm_id, prot) in enumerate(SERVICES):
            specs = [GeneratorSpec("127.0.0.1", gens[DRM].port, DRM, 10 + n, 1, ecm_id,
                                   cw_key=ks.current("CWT", DRM, 0)),
                     GeneratorSpec("127.0.0.1", gens[SMARTCARD].port, SMARTCARD, 10 + n, 1, ecm_id)]
            scs = Scs(name, specs, cp_duration=CP_DURATION, protection=prot, sink=scrambler)
            await scs.start()
            scss.append(scs)
        ctx.step(f"2 SCS (news: SRTP, sport: IPsec) x 2 generators; {PERIODS} crypto-periods of {CP_DURATION * 100} ms")
        results = await asyncio.gather(*(s.run(PERIODS) for s in scss))
        lat = [x for periods in results for p in periods for x in p.latency.values()]
        sizes = {len(b) for periods in results for p in periods for b in p.stkms.values()}
        ctx.fact(f"SimulCrypt: 2 services x {PERIODS} crypto-periods x 2 KMS -> {2 * len(checked)} STKMs, all decrypt to "
                 f"their TEK and arrived before delay_start ({min(sizes)}-{max(sizes)} B, "
                 f"CW_provision->ECM_response max {max(lat) * 1000:.1f} ms vs max_comp_time {caps.max_comp_time} ms)")
        alive = await scss[0].test_channels()
        if not all(alive.values()):
            raise RuntimeError("channel_test unanswered")
    finally:
        for s in scss:
            await s.close()
        for g in gens.values():
            await g.close()
    if len(checked) != PERIODS * len(SERVICES):
        raise RuntimeError("not every crypto-period was delivered")

    # LTKMs: EMMG <-> MUX within the allocated bandwidth
    mux = Multiplexer(total_kbps=64)
    await mux.start()
    g = LtkmGenerator(CLIENT, 1, 1, 0x0201)
    try:
        await g.connect("127.0.0.1", mux.port)
        kbps = await g.request_bandwidth(8)  # 1000 bytes/s
        ltkms = make_ltkms(ks, CLIENT, 0x0201, 1, DRM, 0x0101, count=24)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await g.send(ltkms[:12])
        await g.open_udp("127.0.0.1", mux.udp_port)
        await g.send(ltkms[12:], via="udp")
        for _ in range(200):
            if len(mux.received) == len(ltkms):
                break
            await asyncio.sleep(0.01)
        took = loop.time() - t0
        if len(mux.received) != len(ltkms) or g.errors:
            raise RuntimeError(f"MUX got {len(mux.received)} of {len(ltkms)} LTKMs, errors {g.errors}")
        ltk = ks.current("LTK", CLIENT, 1)
        if ltkm.parse(mux.received[0].datagram, ltk.material).key != ks.current("SEK", DRM, 0x0101).material:
            raise RuntimeError("LTKM does not carry the service key")
        rate = g.sent_bytes * 8 / 1000 / took
        ctx.fact(f"SimulCrypt: LTKM generator -> MUX: {len(ltkms)} LTKMs ({g.sent_bytes} B, TCP and UDP) in "
                 f"{took:.2f} s = {rate:.1f} kbit/s within the {kbps} kbit/s allocation, 0 'exceeded bandwidth'")
    finally:
        await g.close()
        await mux.close()


def run(ctx) -> None:
    ks = KeyStore(ctx.workdir / "simulcrypt-keys.sqlite")
    try:
        for scid in (DRM, SMARTCARD):
            for _, ecm_id, _ in SERVICES:
                ks.add("SEK", scid, ecm_id)
            ks.add("CWT", scid, 0)
        ks.add("PEK", SMARTCARD, 0x0102)  # one program key for the sport event
        ctx.step(f"key store {ctx.workdir / 'simulcrypt-keys.sqlite'}: service keys for 2 stkmstreams per KMS")
        asyncio.run(asyncio.wait_for(_headend(ctx, ks), 60))
    finally:
        ks.close()
