# SNF rules (docs/scpm-profile.md section 4): sender counters reserved on flash in steps
# of 64, receiver replay windows of 32 below the highest accepted SNF.
from micropython import const

from tessera_fw.scpm.frame import SCPMError

_WINDOW = const(32)
_RESERVE = const(64)
_MAX = const(0xFFFFFFFF)
_ERR_SNF = const(9)  # error numbers (const.py)
_ERR_REPLAY = const(10)
_ERR_TOO_OLD = const(11)
_ERR_SNF_EXHAUSTED = const(21)


class TxCounter:
    """Sender counter for one (peer, kind, index, generation). `reserved` is the value
    recorded on flash (0: fresh key, start at 1). After take(), `dirty` says the
    reservation moved and must be persisted before the frame leaves."""

    def __init__(self, reserved=0):
        self.reserved = reserved
        self.next = reserved if reserved else 1
        self.dirty = False

    def take(self):
        n = self.next
        if n >= _MAX:
            raise SCPMError(_ERR_SNF_EXHAUSTED)
        if n >= self.reserved:
            r = n + _RESERVE
            self.reserved = r if r < _MAX else _MAX
            self.dirty = True
        self.next = n + 1
        return n


class RxWindow:
    """Receiver replay window for one (peer, kind, index, generation).

    `high` is the highest SNF accepted; SNF high-d is inside the window for d = 1..32.
    Seen flags live in a 64-entry ring indexed by SNF mod 64 (no big integers on 32-bit
    boards). `reserved` is the value recorded on flash: after a reboot every SNF up to it
    counts as seen (high = reserved, window full)."""

    def __init__(self, reserved=0):
        self.reserved = reserved
        self.high = reserved
        self.seen = bytearray(b"\x01" * 64 if reserved else 64)

    def check(self, snf):
        if snf == 0:
            raise SCPMError(_ERR_SNF)
        h = self.high
        if snf > h:
            return
        d = h - snf
        if d > _WINDOW:
            raise SCPMError(_ERR_TOO_OLD)
        if d == 0 or self.seen[snf & 63]:
            raise SCPMError(_ERR_REPLAY)

    def commit(self, snf):
        """Record an accepted SNF (already check()ed). True when `reserved` moved."""
        h = self.high
        seen = self.seen
        if snf > h:
            d = snf - h
            if d > 1:  # forget the numbers skipped over (their ring slots are reused)
                if d >= 64:
                    for i in range(64):
                        seen[i] = 0
                else:
                    for i in range(h + 1, snf):
                        seen[i & 63] = 0
            seen[snf & 63] = 1
            self.high = snf
            if snf >= self.reserved:
                r = snf + _RESERVE
                self.reserved = r if r < _MAX else _MAX
                return True
            return False
        seen[snf & 63] = 1
        return False
