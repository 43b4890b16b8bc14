"""Issue 9 #3 (host part): the KSN times each request by what it costs the device. Against a
simulated board-speed device (sim.TimedFleet: the firmware engine, busy for as long as the
board would be, with lwIP's bounded queue), the old fixed timers (1.0 s x 4) fail every
master-key update on a Pico W; the per-operation defaults succeed, on a Pico W and an ESP32,
also just after a reboot, with no retransmitted MKU_START."""
from dataclasses import replace

import pytest

from tessera.scpm.codec import KeyKind
from tessera.scpm.ksn import KsnEngine, Schedule, Timing
from tessera.scpm.sim import ESP32, PICO_W, Clock, DetRng, TimedFleet
from tessera.scpm.store import Store

from .conftest import SKEY, setup_key

DEV = 0x0A000020


def fleet(tmp_path, model, timing, label):
    clock = Clock()
    eng = KsnEngine(Store(tmp_path / f"{label}.sqlite", storage_key=SKEY, durable=False),
                    rng=DetRng(f"ksn:{label}"), clock=clock, timing=timing)
    f = TimedFleet(eng, clock)
    dev = f.add(DEV, setup_key(DEV), model, rand=DetRng(f"dev:{label}"))
    return f, eng, dev


def mku_starts(eng):
    """Count the MKU_STARTs the KSN transmits (first sends and retransmissions)."""
    n = [0]
    real = eng._seal

    def seal(p, kid, pdu, *a, **kw):
        n[0] += type(pdu).__name__ == "MkuStart"
        return real(p, kid, pdu, *a, **kw)

    eng._seal = seal
    return n


def test_old_fixed_timers_fail_every_update_on_a_pico_w(tmp_path):
    f, eng, dev = fleet(tmp_path, PICO_W, Timing.fixed(1.0, 4), "old")
    assert f.run(eng.enrol(DEV, setup_key(DEV))).status == "done"  # cheap requests are fine
    t = f.run(eng.rotate(DEV))
    assert t.status == "failed", "1.0 s x 4 gives up after 4 s; the device needs 5.3 s"
    assert dev.master.gen == 1  # no update happened


@pytest.mark.parametrize("model", [PICO_W, ESP32], ids=["pico_w", "esp32"])
@pytest.mark.parametrize("rebooted", [False, True], ids=["running", "just-rebooted"])
def test_default_timers_succeed_at_board_speed(tmp_path, model, rebooted):
    f, eng, dev = fleet(tmp_path, model, Timing(), "new")
    assert f.run(eng.enrol(DEV, setup_key(DEV))).status == "done"
    assert f.run(eng.provision(DEV, KeyKind.SP, 1)).status == "done"
    starts = mku_starts(eng)
    for gen in (2, 3, 4):
        if rebooted:  # busy with the boot self-test's DH when the request arrives
            dev = f.reboot(DEV, rand=DetRng(f"dev:new:{gen}"))
            f.busy(DEV, model.mku_s)
        t0 = f.clock.t
        t = f.run(eng.rotate(DEV))
        assert t.status == "done", (gen, t.error)
        assert dev.master.gen == gen == eng.peer(DEV).master
        # the update took board time, not a timeout's worth of retries
        assert f.clock.t - t0 < 2 * model.mku_s + 2
    assert starts[0] == 3  # one MKU_START per update: no retransmission cost the device anything
    assert f.boards[DEV].dropped == 0
    t = f.run(eng.app_get(DEV, 3))
    assert t.result == (0, b"0.1.0")


def test_retransmitted_mku_start_costs_no_second_dh(tmp_path):
    """A first wait shorter than the device's DH (e.g. --dh-timeout 2): the retransmission
    queues behind the DH and is answered from the stored MKU_RESPONSE."""
    timing = replace(Timing(), dh=Schedule(2.0, 2.0, 8.0, 4))
    f, eng, dev = fleet(tmp_path, PICO_W, timing, "short")
    assert f.run(eng.enrol(DEV, setup_key(DEV))).status == "done"
    starts = mku_starts(eng)
    t = f.run(eng.rotate(DEV))
    assert t.status == "done" and dev.master.gen == 2
    assert starts[0] >= 2  # it did retransmit...
    assert f.boards[DEV].received["dh"] == 1  # ...and the device computed one DH only


def test_schedules():
    d = Timing()
    assert [d.quick.wait(i) for i in range(1, 6)] == [1, 2, 4, 8, 8] and d.quick.total() == 23
    assert [d.dh.wait(i) for i in range(1, 4)] == [15, 20, 20]
    # the first wait after MKU_START covers a just-rebooted Pico W: boot self-test DH + MKU
    assert d.dh.wait(1) > 2 * PICO_W.mku_s + 0.5
    old = Timing.fixed(1.0, 4)
    assert old.dh.total() == 4 < PICO_W.mku_s
    c = Timing.configured(timeout=0.3, retries=2, dh_timeout=5)
    assert (c.quick.first, c.quick.attempts, c.dh.first, c.dh.attempts) == (0.3, 2, 5, 2)
