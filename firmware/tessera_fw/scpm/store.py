# Device key store (docs/scpm-profile.md section 10): two slot files, each
#   seq(4) | len(2) | record | SHA-256(seq | len | record)[0:8]
# A write goes to the slot not holding the current state with seq + 1 (mod 2^32); on load
# the valid slot with the newer seq wins (serial-number order, RFC 1982, so 0 follows
# 0xFFFFFFFF), and a power cut at any instant leaves the old or the new state. The record
# itself is JSON (device.py decides its fields).
import hashlib
import json

from micropython import const

_SLOTS = ("scpm_a.bin", "scpm_b.bin")
_TAG = const(8)


class FileFS:
    """Slot files in a directory of the board filesystem."""

    def __init__(self, root=""):
        self.root = root

    def _p(self, name):
        return self.root + "/" + name if self.root else name

    def read(self, name):
        try:
            with open(self._p(name), "rb") as f:
                return f.read()
        except OSError:
            return None

    def write(self, name, data):
        with open(self._p(name), "wb") as f:
            f.write(data)
            try:
                f.flush()
            except AttributeError:
                pass
        try:
            import os

            os.sync()
        except (ImportError, AttributeError, OSError):
            pass

    def remove(self, name):
        import os

        try:
            os.remove(self._p(name))
        except OSError:
            pass


class MemFS:
    """In-memory files (tests and host-side fleet simulation)."""

    def __init__(self):
        self.files = {}
        self.writes = 0

    def read(self, name):
        return self.files.get(name)

    def write(self, name, data):
        self.files[name] = data  # Store.save hands over a fresh image it never touches again
        self.writes += 1

    def remove(self, name):
        self.files.pop(name, None)


def newer(a, b):
    """Serial-number order on 32 bits: a follows b (within half the circle)."""
    return 0 < ((a - b) & 0xFFFFFFFF) < 0x80000000


def pack(seq, record):
    # built in one buffer: no intermediate concatenations (a slot image is about 900 bytes,
    # and the heap of a small board is fragmented by then)
    n = len(record)
    out = bytearray(6 + n + _TAG)
    out[0] = (seq >> 24) & 0xFF
    out[1] = (seq >> 16) & 0xFF
    out[2] = (seq >> 8) & 0xFF
    out[3] = seq & 0xFF
    out[4] = n >> 8
    out[5] = n & 0xFF
    out[6:6 + n] = record
    mv = memoryview(out)
    out[6 + n:] = hashlib.sha256(mv[:6 + n]).digest()[:_TAG]
    return out


def unpack(blob):
    """(seq, record) of a valid slot image, or None."""
    if blob is None or len(blob) < 6 + _TAG:
        return None
    n = (blob[4] << 8) | blob[5]
    if len(blob) != 6 + n + _TAG:
        return None
    h = hashlib.sha256(blob[:6 + n]).digest()
    if h[:_TAG] != blob[6 + n:]:
        return None
    seq = (blob[0] << 24) | (blob[1] << 16) | (blob[2] << 8) | blob[3]
    return seq, blob[6:6 + n]


class Store:
    def __init__(self, fs=None):
        self.fs = fs if fs is not None else FileFS()
        self.seq = 0
        self.slot = -1  # index of the slot holding the current state
        self.writes = 0

    def load(self):
        """The current record (dict) or None when no slot is valid."""
        best = None
        for i in range(2):
            r = unpack(self.fs.read(_SLOTS[i]))
            if r is not None and (best is None or newer(r[0], best[0])):
                best = (r[0], r[1], i)
        if best is None:
            self.seq, self.slot = 0, -1
            return None
        self.seq, self.slot = best[0], best[2]
        return json.loads(best[1])

    def save(self, rec):
        data = json.dumps(rec)
        if not isinstance(data, bytes):
            data = data.encode()
        target = 1 if self.slot == 0 else 0
        seq = (self.seq + 1) & 0xFFFFFFFF
        self.fs.write(_SLOTS[target], pack(seq, data))
        self.seq, self.slot = seq, target
        self.writes += 1

    def erase(self):
        for s in _SLOTS:
            self.fs.remove(s)
        self.seq, self.slot = 0, -1
