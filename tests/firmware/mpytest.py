# Helpers for firmware tests (run inside MicroPython; no unittest on the boards' interpreter).
import json
from binascii import unhexlify

ROOT = "."  # set by _runner.py
BOARD = ""


def vectors(rel):
    """Load tests/vectors/<rel> (a JSON file of hex strings)."""
    with open(ROOT + "/tests/vectors/" + rel) as f:
        return json.load(f)


def unhex(s):
    return unhexlify(s)


def raises(exc, fn, *args, **kw):
    """Assert fn(*args) raises exc (or a subclass); return the exception."""
    try:
        fn(*args, **kw)
    except exc as e:
        return e
    raise AssertionError("%s not raised by %s" % (exc.__name__, getattr(fn, "__name__", fn)))
