"""max_comp_time: the generator refuses work it knows it cannot finish in time (0x000D), and
the SCS treats an ECM_response later than max_comp_time as a failure: counted, retried
while there is time, then covered by the previous STKM when that one carries the TEK."""
import asyncio
import threading
import time

from .conftest import DRM, run

from tessera.simulcrypt import engine as E
from tessera.simulcrypt import stkm
from tessera.simulcrypt.codec import parse
from tessera.simulcrypt.ecmg import StkmGenerator
from tessera.simulcrypt.scs import GeneratorSpec, Scs
from tessera.simulcrypt.tables import EE, EM, EP, Interface

CAPS = E.EcmgCaps(delay_start=-150, delay_stop=0, ecm_rep_period=50, max_streams=8, min_cp_duration=1,
                  lead_cw=1, cw_per_msg=2, max_comp_time=50)
TEK = bytes(16)
AC = stkm.AccessCriteria(stkm.Protection.SRTP, b"p").encode()


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def wired(gen):
    """An SCS engine with an open stream on a connection of gen (sans-IO)."""
    g, s = E.EcmgConnection(gen.core), E.ScsConnection(1, DRM)
    s.setup()
    pump(s, g)
    s.stream_setup(1, 0x101, 10)
    pump(s, g)
    return g, s


def pump(a, b):
    eb = []
    while (x := a.data_to_send()) or (y := b.data_to_send()):
        if x:
            eb += b.receive_data(x)
        else:
            a.receive_data(y)
    return eb


def provision(gen, g, s, cp, received):
    s.cw_provision(1, cp, [(cp, TEK), (cp + 1, TEK)], access_criteria=AC)
    [ev] = [e for e in g.receive_data(s.data_to_send()) if isinstance(e, E.CwProvision)]
    gen._provision(g, ev, received)
    out = g.data_to_send()
    return parse(Interface.ECMG, out[:5 + int.from_bytes(out[3:5], "big")])


def test_generator_refuses_what_it_cannot_finish_in_time(keystore):
    clock = Clock()
    gen = StkmGenerator(keystore, {DRM}, CAPS, clock=clock, estimate_window=1.0)
    g, s = wired(gen)
    assert provision(gen, g, s, 1, clock.t).type == EM.ECM_RESPONSE
    # read 60 ms ago (queued behind other work): cannot make 50 ms any more
    m = provision(gen, g, s, 2, clock.t - 0.06)
    assert m.type == EM.STREAM_ERROR and m.int(EP.ERROR_STATUS) == EE.OUT_OF_COMPUTATION
    assert m.get(EP.ERROR_INFORMATION) is None  # 2-byte form (default): no faulty parameter to name
    # a recent build of 80 ms makes the estimate exceed the budget
    gen._recent.append((clock.t, 0.08))
    m = provision(gen, g, s, 3, clock.t)
    assert m.type == EM.STREAM_ERROR and m.int(EP.ERROR_STATUS) == EE.OUT_OF_COMPUTATION
    clock.t += 1.5  # the slow measurement ages out: the generator tries again
    assert provision(gen, g, s, 4, clock.t).type == EM.ECM_RESPONSE
    assert gen.stats.refused == 2 and gen.stats.stkms == 2
    # the same connection still works
    s.test()
    g.receive_data(s.data_to_send())
    assert parse(Interface.ECMG, g.data_to_send()).type == EM.CHANNEL_STATUS


class SlowGenerator(StkmGenerator):
    """Builds take 80 ms (blocking its own event loop) from CP slow_from on."""
    slow_from = 2

    def build_stkm(self, scid, ev):
        if ev.cp_number >= self.slow_from:
            time.sleep(0.08)
        return super().build_stkm(scid, ev)


class InThread:
    """Runs a generator on its own event loop in a thread, so its blocking does not stall the SCS."""

    def __init__(self, gen) -> None:
        self.gen = gen
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.gen.start(), self.loop).result(5)
        return self.gen

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.gen.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def _run_scs(port: int, retries: int, periods: int):
    """An SCS against the generator on `port` for `periods` crypto-periods of 3 s."""
    async def main():
        scs = Scs("slow", [GeneratorSpec("127.0.0.1", port, DRM, 1, 1, 0x101)], cp_duration=3, retries=retries)
        await scs.start()
        got = await scs.run(periods)
        await scs.close()
        return scs, got

    return run(main())


def test_scs_treats_late_answers_as_failures(keystore):
    with InThread(SlowGenerator(keystore, {DRM}, CAPS)) as gen:
        scs, periods = _run_scs(gen.port, retries=1, periods=4)
    p0, p1, p2, p3 = periods
    assert DRM in p0.stkms and DRM in p1.stkms and not p0.missing and not p1.missing
    # CP 2: 80 ms > 50 ms: given up at 50 ms, retried (there was time before the period),
    # the generator then refused at once; the late STKM was discarded, not used
    assert DRM not in p2.stkms and "out_of_computation" in p2.missing[DRM].lower()
    assert p2.fallback[DRM] == (1, p1.stkms[DRM])  # CP 1's STKM carries TEK 2
    rec = stkm.parse(p2.fallback[DRM][1], keystore.traffic_key(DRM, 0x101).material)
    assert (2, p2.tek) in rec.teks
    # CP 3: refused straight away (the slow build is recent); nothing carries TEK 3
    assert DRM in p3.missing and DRM not in p3.fallback
    assert scs.stats.late == {DRM: 1} and scs.stats.retries == 1 and scs.stats.discarded == 1
    assert scs.stats.fallbacks == 1
    assert gen.stats.over_time == 1 and gen.stats.refused == 2 and gen.stats.stkms == 3


def test_no_retry_when_no_time_left(keystore):
    """With delay_start -50 and max_comp_time 50 the CW_provision goes out 100 ms before the
    period; after a late answer there is no room for another try."""
    caps = E.EcmgCaps(delay_start=-50, delay_stop=0, ecm_rep_period=50, max_streams=8, min_cp_duration=1,
                      lead_cw=1, cw_per_msg=2, max_comp_time=50)
    slow = SlowGenerator(keystore, {DRM}, caps)
    slow.slow_from = 1
    with InThread(slow) as gen:
        scs, (p0, p1) = _run_scs(gen.port, retries=3, periods=2)
    assert DRM in p0.stkms
    assert p1.missing[DRM] == "ECM_response exceeded max_comp_time (50 ms)"
    assert p1.fallback[DRM][0] == 0
    assert scs.stats.late == {DRM: 1} and scs.stats.retries == 0
