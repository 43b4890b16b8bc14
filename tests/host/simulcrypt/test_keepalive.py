"""Keep-alive: an STKM generator that stops answering channel_test is dropped by the SCS's
keep-alive, while a healthy one stays up; the engines never raise on arbitrary valid-format
traffic (hypothesis)."""
import asyncio

from .conftest import DRM, FAST, SC, eventually, run
from hypothesis import given, settings
from hypothesis import strategies as st
from .test_codec import valid_messages

from tessera.simulcrypt import engine as E
from tessera.simulcrypt.aio import read_loop
from tessera.simulcrypt.ecmg import StkmGenerator
from tessera.simulcrypt.scs import GeneratorSpec, Scs
from tessera.simulcrypt.tables import EM, Interface


class MuteAfterSetup(E.EcmgConnection):
    def handle(self, msg):
        if msg.type in (EM.CHANNEL_TEST, EM.STREAM_TEST):
            return []  # a hung generator: TCP up, protocol dead
        return super().handle(msg)


def test_keepalive_drops_hung_generator(keystore):
    async def main():
        core = E.EcmgCore({SC}, FAST)
        writers = []

        async def serve(r, w):
            writers.append(w)
            await read_loop(MuteAfterSetup(core), r, w, lambda evs: None)

        hung = await asyncio.start_server(serve, "127.0.0.1", 0)
        good = StkmGenerator(keystore, {DRM}, FAST)
        await good.start()
        scs = Scs("svc", [GeneratorSpec("127.0.0.1", good.port, DRM, 1, 1, 0x101),
                          GeneratorSpec("127.0.0.1", hung.sockets[0].getsockname()[1], SC, 1, 1, 0x101)],
                  cp_duration=2, timeout=0.3, keepalive=0.1)
        await scs.start()
        assert all(l.up for l in scs.links)
        await eventually(lambda: not scs.links[1].up, timeout=3)
        await asyncio.sleep(0.3)
        assert scs.links[0].up  # the healthy generator answered every round
        await scs.close()
        for w in writers:
            w.close()
        hung.close()
        await good.close()

    run(main())


@settings(max_examples=150, deadline=None)
@given(st.lists(valid_messages(), max_size=8))
def test_engines_never_raise(msgs):
    """Any sequence of well-formed messages of either interface, fed to each role: only
    events and error replies, never an exception."""
    ecmg = E.EcmgConnection(E.EcmgCore({DRM, SC}))
    scs = E.ScsConnection(1, DRM)
    scs.setup()
    ecmg.receive_data(scs.data_to_send())  # both sides open before the random traffic
    scs.receive_data(ecmg.data_to_send())
    mux = E.MuxConnection(E.MuxCore())
    emmg = E.EmmgConnection(0x00010001, 1)
    emmg.setup()
    mux.receive_data(emmg.data_to_send())
    emmg.receive_data(mux.data_to_send())
    assert ecmg.state is scs.state is mux.state is emmg.state is E.State.OPEN
    for m in msgs:
        for conn in (ecmg, scs) if m.itf is Interface.ECMG else (mux, emmg):
            evs = conn.receive_data(m.encode())
            assert all(isinstance(e, E.Event) for e in evs)
            conn.data_to_send()
