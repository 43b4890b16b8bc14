"""AC_delay_start/stop and transition_delay_start/stop: advertised by the generator in
channel_status, and applied by the SCS at access-criteria changes and at the
clear/scrambled transitions."""
import pytest

from .conftest import DRM, run

from tessera.simulcrypt import engine as E
from tessera.simulcrypt import stkm
from tessera.simulcrypt.ecmg import StkmGenerator
from tessera.simulcrypt.scs import GeneratorSpec, Scs, plan_period

CAPS = E.EcmgCaps(delay_start=-50, delay_stop=20, ecm_rep_period=50, max_streams=8, min_cp_duration=1,
                  lead_cw=1, cw_per_msg=2, max_comp_time=40, ac_delay_start=-120, ac_delay_stop=60,
                  transition_delay_start=-150, transition_delay_stop=80)


def caps_seen_by_scs(caps):
    core = E.EcmgCore({DRM}, caps)
    g, s = E.EcmgConnection(core), E.ScsConnection(1, DRM)
    s.setup()
    g.receive_data(s.data_to_send())
    s.receive_data(g.data_to_send())
    return s.caps


def test_generator_advertises_the_optional_delays():
    c = caps_seen_by_scs(CAPS)
    assert (c.ac_delay_start, c.ac_delay_stop, c.transition_delay_start, c.transition_delay_stop) == (-120, 60, -150, 80)
    # not configured: the generator advertises its delay_start / delay_stop for them
    c = caps_seen_by_scs(E.EcmgCaps(delay_start=-70, delay_stop=10))
    assert (c.ac_delay_start, c.ac_delay_stop, c.transition_delay_start, c.transition_delay_stop) == (-70, 10, -70, 10)


@pytest.mark.parametrize("flags, start_rule, start_ms, stop_rule, stop_ms", [
    ({}, "delay_start", -50, "delay_stop", 20),
    ({"after_clear": True}, "transition_delay_start", -150, "delay_stop", 20),
    ({"before_clear": True}, "delay_start", -50, "transition_delay_stop", 80),
    ({"ac_changed": True}, "AC_delay_start", -120, "delay_stop", 20),
    ({"ac_changes_next": True}, "delay_start", -50, "AC_delay_stop", 60),
    ({"ac_changed": True, "ac_changes_next": True}, "AC_delay_start", -120, "AC_delay_stop", 60),
    ({"after_clear": True, "ac_changed": True, "before_clear": True, "ac_changes_next": True},
     "transition_delay_start", -150, "transition_delay_stop", 80),
])
def test_plan_period(flags, start_rule, start_ms, stop_rule, stop_ms):
    t = plan_period(CAPS, 10.0, 10.2, **flags)
    assert (t.start_delay, t.stop_delay) == (start_rule, stop_rule)
    assert t.broadcast_start == pytest.approx(10.0 + start_ms / 1000)
    assert t.broadcast_stop == pytest.approx(10.2 + stop_ms / 1000)
    assert t.provision_at == pytest.approx(t.broadcast_start - 0.040)


def test_plan_period_without_optional_delays():
    """A generator that does not send them: delay_start / delay_stop apply everywhere."""
    caps = E.EcmgCaps(delay_start=-50, delay_stop=20, max_comp_time=40)
    t = plan_period(caps, 0.0, 1.0, after_clear=True, ac_changes_next=True)
    assert (t.start_delay, t.stop_delay) == ("delay_start", "delay_stop")
    assert (t.broadcast_start, t.broadcast_stop) == pytest.approx((-0.05, 1.02))


def test_scs_schedule_over_changes_and_transitions(keystore):
    async def main():
        gen = StkmGenerator(keystore, {DRM}, CAPS)
        await gen.start()
        scs = Scs("svc", [GeneratorSpec("127.0.0.1", gen.port, DRM, 1, 1, 0x101)], cp_duration=3,
                  access_rule=b"old")
        await scs.start()
        first = await scs.run(2)                                              # clear -> scrambled
        second = await scs.run(3, access_rules={1: b"new"}, clear_after=True)  # AC change, then -> clear
        with pytest.raises(ValueError, match="outside"):
            await scs.run(2, access_rules={2: b"x"})
        await scs.close()
        await gen.close()
        return first + second

    periods = run(main())
    rules = [(p.timing[DRM].start_delay, p.timing[DRM].stop_delay) for p in periods]
    assert rules == [
        ("transition_delay_start", "delay_stop"),  # first period after clear -> scrambled
        ("delay_start", "delay_stop"),            # end of the first run: nothing known to follow
        ("delay_start", "AC_delay_stop"),          # last period before the access-criteria change
        ("AC_delay_start", "delay_stop"),          # first period after it
        ("delay_start", "transition_delay_stop"),  # last period before scrambled -> clear
    ]
    offsets = {"delay_start": -0.05, "AC_delay_start": -0.12, "transition_delay_start": -0.15,
               "delay_stop": 0.02, "AC_delay_stop": 0.06, "transition_delay_stop": 0.08}
    key = keystore.traffic_key(DRM, 0x101).material
    for p, (r_start, r_stop) in zip(periods, rules):
        t = p.timing[DRM]
        assert p.windows[DRM] == pytest.approx((p.start + offsets[r_start], p.end + offsets[r_stop]))
        assert t.provision_at == pytest.approx(t.broadcast_start - 0.04)
        # the CW_provision really went out at the planned time (not before; loop jitter after)
        assert t.provision_at - 1e-3 <= p.provisioned_at[DRM] <= t.provision_at + 0.03
        assert p.in_time[DRM] and not p.missing
        assert stkm.parse(p.stkms[DRM], key).access_rule == p.access_rule
    assert [p.access_rule for p in periods] == [b"old", b"old", b"old", b"new", b"new"]
