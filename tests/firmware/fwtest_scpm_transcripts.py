# Key-management transcripts (tests/vectors/scpm/transcripts.json, host KSN x firmware
# device with fixed randoms): fed the KSN's delivered frames and the recorded device
# randoms, the device engine emits every device frame byte for byte.
import gc

from tessera_fw.scpm.device import Device  # first: compiling it needs the most heap

gc.collect()
from fwtest_scpm_util import iter_array  # noqa: E402
from mpytest import unhex  # noqa: E402
from tessera_fw.scpm.store import MemFS, Store  # noqa: E402


class Replay:
    def __init__(self, values):
        self.values = values
        self.i = 0

    def __call__(self, n):
        v = unhex(self.values[self.i])
        self.i += 1
        assert len(v) == n, (len(v), n)
        return v


def test_device_reproduces_every_transcript():
    names = []
    for sc in iter_array("scpm/transcripts.json", "scenarios"):
        name = sc["name"]
        gc.collect()  # the parsed scenario leaves garbage; the store's slot images need contiguous heap
        rng = Replay(sc["device_random"])
        store = Store(MemFS())
        setup = unhex(sc["setup_key"])
        dev = Device(sc["device"], setup, store=store, rand=rng)
        emitted = []
        n_dev = 0
        for ev in sc["events"]:
            kind = ev["ev"]
            if kind == "ksn":
                if ev["delivered"]:
                    frame = unhex(ev["frame"])
                    # the parsed scenario (hex strings) fragments this 64-bit heap in a way a
                    # device fed datagrams never sees; collect as between two datagrams
                    gc.collect()
                    emitted += dev.receive(frame)
            elif kind == "dev":
                assert emitted, (name, n_dev, ev.get("pdu"), "not produced")
                got = bytes(emitted.pop(0))
                assert got == unhex(ev["frame"]), (name, n_dev, ev.get("pdu"))
                n_dev += 1
            elif kind == "dev_restart":
                assert not emitted, (name, "frames left before the reboot")
                dev = None  # a reboot: the old device's RAM is gone before the new one starts
                gc.collect()
                dev = Device(sc["device"], setup, store=Store(store.fs), rand=rng)
            elif kind == "dev_call":
                a = ev["args"]
                emitted += getattr(dev, ev["call"])(a["reason"], a["now_ms"])
            elif kind == "dev_tick":
                emitted += dev.tick(ev["args"]["now_ms"])
        assert not emitted, (name, len(emitted), "extra device frames")
        assert rng.i == len(sc["device_random"]), (name, "randoms left")
        assert dev.master.gen == sc["final"]["master_gen"], name
        names.append(name)
        sc = dev = store = rng = emitted = ev = None
        gc.collect()
    assert len(names) >= 8, names
