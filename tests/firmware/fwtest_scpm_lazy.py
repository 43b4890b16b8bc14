# What the device keeps loaded (issue 9 #9), inside MicroPython: key management released
# after each request, application frames served without it, and the module-private copies
# of const.py's numbers equal to const.py.
import gc
import os
import sys

import tessera_fw
from tessera_fw.scpm import device

gc.collect()
from fwtest_scpm_util import enrol, new_dev, one  # noqa: E402
from mpytest import ROOT  # noqa: E402
from tessera_fw.scpm import const as C  # noqa: E402

KM = "tessera_fw.scpm.km"
_KM_MODULE = sys.modules[KM]  # compiled once (device.py imports it when compiled from source)
loads = []


def _as_from_mpy(name):
    # tessera_fw.acquire() keeps a module compiled from source (as these tests run): here the
    # device sees what it sees on a board with .mpy files, a module loaded fresh for it. The
    # "load" hands back the module compiled once: compiling km.py again per request would
    # fragment the esp32 test heap, which is why acquire() keeps modules from source.
    if name != KM:
        return tessera_fw.acquire(name)
    fresh = KM not in sys.modules
    if fresh:
        loads.append(name)
        sys.modules[KM] = _KM_MODULE
        sys.modules["tessera_fw.scpm"].km = _KM_MODULE  # as an import does
    return _KM_MODULE, fresh


def test_key_management_released_after_each_request():
    real = device.acquire
    device.acquire = _as_from_mpy
    try:
        tessera_fw.release(KM)
        assert KM not in sys.modules and not hasattr(sys.modules["tessera_fw.scpm"], "km")
        d = new_dev()
        ksn = enrol(d)  # ENROL_HELLO, USER_KEY_INIT: km loaded for each, released after
        assert d.enrolled and KM not in sys.modules and len(loads) == 2
        user = ksn.keys[(C.KIND_USER, 0, 1)]
        p, _ = ksn.open(one(d.receive(ksn.frame(user, ksn.km(C.OP_APP_GET, b"\x03")))))
        assert p[0] == C.OP_APP_RESULT and p[4:] == b"\x000.1.0"
        assert KM not in sys.modules and len(loads) == 2  # an application frame never loads it
        m = ksn.keys[(C.KIND_MASTER, 0, 1)]
        body = bytes((1, 1)) + bytes(range(16))
        p, _ = ksn.open(one(d.receive(ksn.frame(m, ksn.km(C.OP_SP_KEY_INIT, body)))))
        assert p[0] == C.OP_SP_KEY_INIT_ACK and d.keys[2 * 16 + 1] is not None
        assert KM not in sys.modules and len(loads) == 3  # loaded for the request, released
    finally:
        device.acquire = real
        sys.modules[KM] = _KM_MODULE


def test_release_forgets_module_and_package_attribute():
    import tessera_fw.scpm.ticks  # noqa: F401

    assert hasattr(sys.modules["tessera_fw.scpm"], "ticks")
    tessera_fw.release("tessera_fw.scpm.ticks")
    assert "tessera_fw.scpm.ticks" not in sys.modules
    assert not hasattr(sys.modules["tessera_fw.scpm"], "ticks")
    # a module loaded from source stays with acquire() (compiling it again per request
    # would cost more heap than it holds)
    m, fresh = tessera_fw.acquire("tessera_fw.scpm.ticks")
    assert m.ticks_add30(0x3FFFFFFF, 1) == 0 and not fresh


_FAMILIES = ("ERR", "OP", "KIND", "SVC", "REASON", "HD", "MAX", "SNF", "PORT")  # store's _HDR is its own


def test_private_constants_equal_const_py():
    # each firmware module keeps the numbers it needs as `_NAME = const(v)` (folded away by
    # the compiler); every one named like a const.py number must have its value
    d = ROOT + "/firmware/tessera_fw/scpm/"
    checked = 0
    for fn in os.listdir(d):
        if not fn.endswith(".py") or fn == "const.py":
            continue
        with open(d + fn) as f:
            for line in f:
                if not line.startswith("_") or " = const(" not in line:
                    continue
                name, rest = line.split(" = const(", 1)
                pub = name[1:]
                if pub.split("_")[0] in _FAMILIES and hasattr(C, pub):
                    v = int(rest.split(")", 1)[0], 0)
                    assert v == getattr(C, pub), (fn, name, v, getattr(C, pub))
                    checked += 1
    assert checked >= 60, checked  # frame, snf, device, km, udp, selftest
