# Tick arithmetic with the boards' period (issue 9 #4). On MicroPython the firmware uses the
# port's own time.ticks_add / ticks_diff; these are the same functions for a period of
# 2^30 ms (ESP32, RP2040: 12.4 days), used under CPython (tessera.mpshim) and by the tests
# that drive the timers across a board's wrap on the unix port (whose period is 2^62).
from micropython import const

_TICKS_MAX = const(0x3FFFFFFF)  # the boards' ticks_ms period is 2^30 ms (12.4 days)
_TICKS_HALF = const(0x20000000)


def ticks_add30(t, delta):
    """time.ticks_add with the boards' period of 2^30."""
    return (t + delta) & _TICKS_MAX


def ticks_diff30(a, b):
    """time.ticks_diff (a - b, signed) with the boards' period of 2^30. Also right for a
    clock of any period that is a multiple of 2^30 (the unix port's 2^62) or one that
    never wraps (CPython), as long as the differences stay below 2^29 ms."""
    return ((a - b + _TICKS_HALF) & _TICKS_MAX) - _TICKS_HALF
