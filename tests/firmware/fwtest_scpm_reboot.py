# SCPM device: the SNF reservation across a reboot, inside MicroPython. Its own module (a
# fresh interpreter): after the device module's other flows the esp32 test heap, which also
# holds the compiled sources, had no contiguous 1.1 KB left for the rebooted device's codec.
import gc

from tessera_fw.scpm.device import Device  # noqa: F401  first: compiling it needs the most heap

gc.collect()
from fwtest_scpm_util import enrol, new_dev, one  # noqa: E402
from tessera_fw.scpm import const as C  # noqa: E402
from tessera_fw.scpm.store import MemFS  # noqa: E402


def test_snf_reservation_survives_reboot():
    fs = MemFS()
    d = None
    d = new_dev(fs)
    ksn = enrol(d)
    m = ksn.keys[(4, 0, 1)]
    frames = [ksn.frame(m, ksn.km(C.OP_SYNC_REQ, bytes(16))) for _ in range(41)]
    sent = []
    for f in frames[:40]:
        sent.append(ksn.open(one(d.receive(f)))[1].snf)
    d = None
    d = new_dev(fs)  # reboot
    for f in frames[:40]:
        assert d.receive(f) == []  # every replay refused
    out = d.receive(frames[40])  # SNF 41 <= the reservation: refused too (at most 64 lost)
    assert out == []
    ksn.tx[(4, 0, 1)].next = 66  # the KSN skips ahead past the receiver's reservation
    p, dd = ksn.open(one(d.receive(ksn.frame(m, ksn.km(C.OP_SYNC_REQ, bytes(16))))))
    assert dd.snf > max(sent)  # the device's sender resumed at its reservation
