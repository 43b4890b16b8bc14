# Tessera firmware for MicroPython boards: the SCPM device stack (the secure RMCP-2 receiver is planned, not built).
VERSION = "0.1.0"


def acquire(name):
    """Import module `name` for one use: (module, fresh). When `fresh` (this call loaded it,
    nobody else holds it) the caller releases it after use, so that the heap its code holds
    is collected (issue 9 #9: key management and DH are loaded only while a request needs
    them, from .mpy or frozen). A module that was already loaded (the self-test, a test, an
    application) stays."""
    import sys

    fresh = name not in sys.modules
    m = __import__(name, None, None, ("_",))
    # a module compiled from source (mip --no-mpy, the tests) stays: compiling it again for
    # every request would cost a parse-tree peak larger than the module itself; a frozen
    # one (its __file__ ends in .py too) has its code in flash and stays as well
    return m, fresh and not getattr(m, "__file__", ".py").endswith(".py")


def release(name):
    """Forget module `name` so that its code can be collected once nothing refers to it
    (a later import loads it again). Only on MicroPython: under CPython (the host's fleet
    simulation, tests that patch firmware functions) the modules stay."""
    import sys

    if sys.implementation.name != "micropython":
        return
    sys.modules.pop(name, None)
    parent, _, child = name.rpartition(".")
    p = sys.modules.get(parent)
    if p is not None:
        try:
            delattr(p, child)
        except (AttributeError, KeyError, TypeError):  # MicroPython: KeyError when not there
            pass


def ct_equal(a, b):
    """Constant-time comparison for MACs and confirmations: time depends only on the
    lengths. Here, not in crypto/hmac.py, so that the SCPM device's key management uses it
    without loading HMAC's module (issue 9 #9)."""
    if len(a) != len(b):
        return False
    r = 0
    for i in range(len(a)):
        r |= a[i] ^ b[i]
    return r == 0
