# Device key store (docs/scpm-profile.md section 10; docs/scpm-firmware.md "Flash wear").
# Two A/B pairs of slot files; every slot image is
#   seq(4) | len(2) | body | SHA-256(seq | len | body)[0:8]
# A write goes to the slot not holding the current state with seq + 1 (mod 2^32); on load
# the valid slot with the newer seq wins (serial-number order, RFC 1982, so 0 follows
# 0xFFFFFFFF), and a power cut at any instant leaves the old or the new state.
#   keys pair     scpm_a.bin / scpm_b.bin: KSN address, keys, pending update and a snapshot
#                 of the SNF reservations; written only when one of those changes.
#   counters pair scpm_c.bin / scpm_d.bin: the SNF reservations alone, behind the seq of the
#                 keys image they extend (keys_seq(4) | entries); the frequent write (one
#                 per 64 frames per key, peer and direction), kept small so that LittleFS
#                 stores it inline in its metadata log instead of erasing a block per write.
# persist.py makes the device's records. A keys body starting
# with "{" is a JSON record: the format of the firmware before the binary store, read so
# that deployed devices keep their keys (and written by save(dict): the self-test).
# Read errors other than "no such file" raise OSError: an unreadable store is never taken for
# an empty one (an unenrolled device would then overwrite its keys).
import hashlib

from micropython import const

_SLOTS = ("scpm_a.bin", "scpm_b.bin", "scpm_c.bin", "scpm_d.bin")
_TAG = const(8)
_HDR = const(6)
_ENOENT = const(2)
COFF = const(10)  # entries of a counters image start here (seq, len, keys seq)


class FileFS:
    """Slot files in a directory of the board filesystem."""

    def __init__(self, root=""):
        self.root = root

    def _p(self, name):
        return self.root + "/" + name if self.root else name

    def read(self, name):
        """The file's bytes, None when it does not exist; other errors raise OSError."""
        try:
            with open(self._p(name), "rb") as f:
                return f.read()
        except OSError as e:
            if e.args[0] == _ENOENT:
                return None
            raise

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
        except OSError as e:
            if e.args[0] != _ENOENT:
                raise


class MemFS:
    """In-memory files (tests and host-side fleet simulation)."""

    def __init__(self):
        self.files = {}
        self.writes = 0

    def read(self, name):
        return self.files.get(name)

    def write(self, name, data):
        # Store hands over a fresh keys image, or the counters buffer of that very slot,
        # which it rewrites only to replace this slot's content again
        self.files[name] = data
        self.writes += 1

    def remove(self, name):
        self.files.pop(name, None)


def newer(a, b):
    """Serial-number order on 32 bits: a follows b (within half the circle)."""
    return 0 < ((a - b) & 0xFFFFFFFF) < 0x80000000


def put32(b, o, v):
    b[o] = (v >> 24) & 0xFF
    b[o + 1] = (v >> 16) & 0xFF
    b[o + 2] = (v >> 8) & 0xFF
    b[o + 3] = v & 0xFF


def get32(b, o):
    return (b[o] << 24) | (b[o + 1] << 16) | (b[o + 2] << 8) | b[o + 3]


def _seal(out, seq, n):
    """Fill seq | len and the tag of an image whose body (n bytes) is at out[6:6 + n]."""
    put32(out, 0, seq)
    out[4] = n >> 8
    out[5] = n & 0xFF
    d = hashlib.sha256(memoryview(out)[:_HDR + n]).digest()
    for i in range(_TAG):
        out[_HDR + n + i] = d[i]


def pack(seq, record):
    # built in one buffer: no intermediate concatenations
    n = len(record)
    out = bytearray(_HDR + n + _TAG)
    out[_HDR:_HDR + n] = record
    _seal(out, seq, n)
    return out


def _check(blob):
    """Body length of a valid slot image, or -1."""
    if blob is None or len(blob) < _HDR + _TAG:
        return -1
    n = (blob[4] << 8) | blob[5]
    if len(blob) != _HDR + n + _TAG:
        return -1
    h = hashlib.sha256(blob[:_HDR + n]).digest()
    bad = 0
    for i in range(_TAG):
        bad |= h[i] ^ blob[_HDR + n + i]
    return -1 if bad else n


def unpack(blob):
    """(seq, record) of a valid slot image, or None."""
    n = _check(blob)
    if n < 0:
        return None
    return get32(blob, 0), bytes(blob[_HDR:_HDR + n])


class Store:
    def __init__(self, fs=None):
        self.fs = fs if fs is not None else FileFS()
        self.writes = 0  # keys and counters writes
        self.kwrites = 0  # keys writes
        self._forget()

    def _forget(self):
        self.seq = self.cseq = 0  # seq of the current keys / counters image
        self.slot = self.cslot = -1  # its slot (0, 1; -1: none)
        self._kimg = self._cimg = None  # images of the durable state (rollback without reads)
        self._cbuf = [None, None]  # counters image of slot c / d, reused

    def _best(self, base):
        img, seq, slot = None, 0, -1
        for i in range(2):
            blob = self.fs.read(_SLOTS[base + i])
            if _check(blob) >= 0:
                s = get32(blob, 0)
                if img is None or newer(s, seq):
                    img, seq, slot = blob, s, i
        return img, seq, slot

    def load(self):
        """The current record or None when no keys slot is valid: a dict (JSON keys body),
        else (keys body, counters body or None) as memoryviews. Raises OSError when a slot
        cannot be read."""
        self._kimg, self.seq, self.slot = self._best(0)
        self._cimg, self.cseq, self.cslot = self._best(2)
        self._cbuf = [None, None]
        return self.current()

    def current(self):
        """The record of the durable state, from RAM (what load() read or the last
        successful save wrote)."""
        k = self._kimg
        if k is None:
            return None
        body = memoryview(k)[_HDR:_HDR + ((k[4] << 8) | k[5])]
        if body[0] == 0x7B:  # "{": JSON record (format 1)
            import json

            return json.loads(bytes(body))
        c = self._cimg
        if c is not None and get32(c, _HDR) == self.seq:  # extends this keys image
            return body, memoryview(c)[COFF:_HDR + ((c[4] << 8) | c[5])]
        return body, None

    def save(self, rec):
        """Write a keys record: bytes (the device's binary body) or a dict (JSON)."""
        if isinstance(rec, dict):
            import json

            rec = json.dumps(rec).encode()
        target = 1 if self.slot == 0 else 0
        seq = (self.seq + 1) & 0xFFFFFFFF
        img = pack(seq, rec)
        self.fs.write(_SLOTS[target], img)
        self.seq, self.slot, self._kimg = seq, target, img
        self.writes += 1
        self.kwrites += 1

    def counters_buf(self, nbytes):
        """The buffer for the next counters image, with room for nbytes of entries at
        COFF; fill the entries, then call save_counters(nbytes)."""
        t = 1 if self.cslot == 0 else 0
        b = self._cbuf[t]
        if b is None or len(b) != COFF + nbytes + _TAG:  # steady traffic: same size
            b = self._cbuf[t] = bytearray(COFF + nbytes + _TAG)
        return b

    def save_counters(self, nbytes):
        """Write the counters image built in counters_buf(nbytes), behind the current keys
        image (a store without one takes a keys write first: device.py)."""
        t = 1 if self.cslot == 0 else 0
        b = self._cbuf[t]
        seq = (self.cseq + 1) & 0xFFFFFFFF
        put32(b, _HDR, self.seq)
        _seal(b, seq, 4 + nbytes)
        self.fs.write(_SLOTS[2 + t], b)
        self.cseq, self.cslot, self._cimg = seq, t, b
        self.writes += 1

    def erase(self):
        """Remove every slot file: counters first, then the older keys slot, then the
        current one, so a failure part-way (raised) never brings back an older state."""
        o = self.slot if self.slot > 0 else 0
        for i in (2, 3, 1 - o, o):
            self.fs.remove(_SLOTS[i])
        self._forget()
