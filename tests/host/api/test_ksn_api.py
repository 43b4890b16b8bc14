"""tessera.AsyncKsn / Ksn against firmware device engines (mpshim) behind real loopback UDP
sockets: values for results, the specific exception for each failure, the same operations
through a serving KSN's control socket, and no key in any message."""
from __future__ import annotations

import asyncio
import os
import threading

import pytest

from tessera import (AsyncKsn, BatchFailed, DeviceError, ErrorCode, InvalidKey, Ksn, KsnBusy, KsnError,
                     NoDatabase, Rotated, Timing, UnknownDevice, list_devices, serve_ksn)
from tests.host.scpm.udpdev import UdpDevice

FAST = Timing.fixed(0.3, 3)  # loopback device engines answer in milliseconds


@pytest.fixture
def devices():
    keys = {0x0A000301 + i: os.urandom(16) for i in range(2)}
    devs = {a: UdpDevice(a, k) for a, k in keys.items()}
    yield {a: (devs[a], keys[a]) for a in keys}
    for d in devs.values():
        d.close()


def test_sync_api_values_and_errors(tmp_path, devices, caplog):
    db = tmp_path / "ksn.sqlite"
    with pytest.raises(NoDatabase):
        Ksn(db)
    assert not db.exists()  # a typo leaves no empty database behind
    with Ksn(db, create=True, port=0, timing=FAST) as ksn:
        assert not ksn.via_server and ksn.port
        with pytest.raises(KsnBusy):
            Ksn(db, port=0)
        (a1, (d1, k1)), (a2, (d2, k2)) = devices.items()
        secret = os.urandom(15)
        with pytest.raises(InvalidKey) as e:
            ksn.enrol(a1, secret, "127.0.0.1", d1.port)
        assert secret.hex() not in str(e.value)
        assert ksn.enrol(a1, k1, "127.0.0.1", d1.port, name="one").master_gen == 1
        assert ksn.enrol(a2, k2, "127.0.0.1", d2.port).master_gen == 1
        sp = ksn.install_sp_key(1)
        assert sorted((k.addr, k.kind, k.index, k.gen) for k in sp) == [(a1, "sp", 1, 1), (a2, "sp", 1, 1)]
        assert ksn.rotate() == [Rotated(a1, 1, 2), Rotated(a2, 1, 2)]
        assert ksn.get(a1, 3) == b"0.1.0"
        with pytest.raises(DeviceError) as e:
            ksn.set(a1, 2, b"\x00\x05")  # the tariff needs the SP key
        assert e.value.code == ErrorCode.AUTHORITY and e.value.addr == a1
        assert ksn.set(a1, 2, b"\x00\x05", kind="sp", index=1) == b"\x00\x05"
        with pytest.raises(UnknownDevice) as e:
            ksn.get(0x0A0003FF, 1)
        assert e.value.addr == 0x0A0003FF
        info = {d.addr: d for d in ksn.devices()}
        assert info[a1].name == "one" and info[a1].keys == {"user": 1, "sp[1]": 1} and info[a1].master_gen == 2
        d2.close()  # the second device goes silent: a batch fails on it only
        with pytest.raises(BatchFailed) as e:
            ksn.rotate()
        assert e.value.failed == [a2]
    assert {d.addr: d.master_gen for d in list_devices(db)}[a1] == 3
    for k in (k1, k2):
        assert k.hex() not in caplog.text


def test_async_api_through_a_serving_ksn(tmp_path, devices):
    """With serve_ksn running on the database, AsyncKsn in another loop (thread) goes through
    the control socket and gets the same values."""
    db = tmp_path / "ksn.sqlite"
    (a1, (d1, k1)), _ = devices.items()
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def server() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(serve_ksn(db, port=0, timing=FAST, ready=lambda ep: ready.set(), stop=stop))

    t = threading.Thread(target=server, daemon=True)
    t.start()
    try:
        assert ready.wait(20)

        async def script() -> None:
            async with await AsyncKsn.open(db) as ksn:
                assert ksn.via_server and ksn.port is None
                assert (await ksn.enrol(a1, k1, "127.0.0.1", d1.port)).master_gen == 1
                assert await ksn.rotate([a1]) == [Rotated(a1, 1, 2)]
                assert await ksn.get(a1, 1) == b"\x00"
                with pytest.raises(KsnError) as e:  # through a server only the message is known
                    await ksn.set(a1, 3, b"9.9")
                assert "ERR_AUTHORITY" in str(e.value)
                assert [d.master_gen for d in await ksn.devices()] == [2]

        asyncio.run(script())
    finally:
        loop.call_soon_threadsafe(stop.set)
        t.join(20)
