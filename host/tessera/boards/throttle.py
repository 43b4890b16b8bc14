"""Board-speed virtual boards: calibrate this machine against a board, then duty-cycle the
board's interpreter so that it runs about as fast as the real MCU.

Calibration (once per process, cached): the unix-port interpreter times the same two
2048-bit modular exponentiations a board profile was measured with (pow(2, x, p) and
pow(y, x, p), the two halves of the firmware's DH; boards/<name>/board.json "speed"), in CPU
time, itself throttled CAL_SLOWDOWN times in the same windows as a board (a window starts
with cold caches: unthrottled, the calibration came out 25-40% too fast). The slow-down is
the board's seconds over this machine's CPU seconds.

Throttling: a thread in the bridge reads the interpreter's consumed CPU time (the kernel's
per-process CPU clock, nanoseconds; /proc/<pid>/stat as a fallback) and stops and continues
the process with SIGSTOP/SIGCONT so that wall time ~= slow-down x CPU time, paying for each
window of work before it runs. It self-corrects: on a loaded machine the interpreter gets
less CPU per window, so it waits less. Defined by this project (docs/boards.md).
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass

from tessera.boards.interp import micropython_path
from tessera.boards.profile import BoardProfile
from tessera.errors import TesseraError
from tessera.paths import firmware_dir

log = logging.getLogger(__name__)

SPEEDS = ("fast", "board")

# The calibration program, run by the unix port: the firmware's own modulus (group 14) and a
# fixed 256-bit exponent with 128 one bits, as a random exponent has on average (binary
# exponentiation costs one multiplication per one bit on top of the 256 squarings). CPU time of this thread from /proc/self/schedstat (ns); where that
# file is missing, wall time stands in.
_CAL_SCRIPT = """\
import time
from tessera_fw.crypto import dh
def cpu():
    try:
        f = open('/proc/self/schedstat')
        v = int(f.read().split()[0])
        f.close()
        return v
    except (OSError, ValueError):
        return -1
x = int.from_bytes(bytes((0xA5, 0x5A)) * 16, 'big')
for _ in range(REPS):
    c0 = cpu(); t0 = time.ticks_us()
    y = pow(2, x, dh.P)
    c1 = cpu(); t1 = time.ticks_us()
    z = pow(y, x, dh.P)
    c2 = cpu(); t2 = time.ticks_us()
    print(c0, c1, c2, time.ticks_diff(t1, t0), time.ticks_diff(t2, t1))
"""


@dataclass(frozen=True)
class Calibration:
    """This machine's unix-port CPU seconds (throttled as a board runs) for pow(2, x, p) and pow(y, x, p)."""

    pow_g_s: float
    pow_y_s: float
    clock: str  # "cpu" (schedstat) or "wall" (fallback)


CAL_SLOWDOWN = 10.0  # the calibration runs throttled by this much (docs/boards.md)


@functools.cache
def calibrate(heap_bytes: int | None = None, reps: int = 5) -> Calibration:
    """Time the calibration pow()s under the unix port, in CPU time, throttled by
    CAL_SLOWDOWN (once per process). The median of `reps` runs: on a shared machine the CPU time of one pow() varies by
    about +-20% with the load of the other core, and the throttled board meets the same
    load later, so the typical run is the right reference (docs/boards.md). `heap_bytes`:
    the board's heap, so that the garbage collection inside pow() costs what it costs on
    the board's virtual twin."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICROPY")}
    env["MICROPYPATH"] = str(firmware_dir())
    heap = ["-X", f"heapsize={heap_bytes}"] if heap_bytes else []
    thr = None
    try:
        proc = subprocess.Popen([micropython_path(), *heap, "-c", _CAL_SCRIPT.replace("REPS", str(reps))],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        if CAL_SLOWDOWN:  # in windows, as the board will run: a window starts with cold caches
            thr = Throttle()
            thr.start()
            thr.set_target(proc.pid, CAL_SLOWDOWN, marker="micropython_run")
        out, err = proc.communicate(timeout=120)
        if proc.returncode:
            raise subprocess.SubprocessError(err.strip()[-300:])
        rows = [[int(v) for v in ln.split()] for ln in out.splitlines() if ln.strip()]
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise TesseraError(f"could not calibrate this machine against the boards: {exc}") from None
    finally:
        if thr is not None:
            thr.close()
    if len(rows) != reps:
        raise TesseraError(f"calibration printed {out!r}")
    if all(r[0] >= 0 for r in rows):
        g = statistics.median(r[1] - r[0] for r in rows) / 1e9
        y = statistics.median(r[2] - r[1] for r in rows) / 1e9
        clock = "cpu"
    else:  # wall time: the fastest run is the one least disturbed by the load
        g = min(r[3] for r in rows) / 1e6
        y = min(r[4] for r in rows) / 1e6
        clock = "wall"
    if g <= 0 or y <= 0:
        raise TesseraError(f"calibration measured no time ({rows})")
    cal = Calibration(g, y, clock)
    log.info("calibration: pow(2,x,p) %.1f ms, pow(y,x,p) %.1f ms of %s time on this machine",
             g * 1e3, y * 1e3, clock)
    return cal


def slowdown(prof: BoardProfile, cal: Calibration | None = None) -> float:
    """How many times slower than this machine the board is (board s / host CPU s)."""
    board = prof.speed
    if board is None:
        raise TesseraError(f"board {prof.name!r} has no speed calibration in its board.json")
    cal = cal or calibrate(prof.heap_bytes)
    return (board.pow_g_s + board.pow_y_s) / (cal.pow_g_s + cal.pow_y_s)


# ------------------------------------------------------------------ CPU clock of a process


def _cpu_clock_id(pid: int) -> int:
    # The kernel's per-process CPU clock (clock_getcpuclockid(3)): ((~pid) << 3) | CPUCLOCK_SCHED
    return ((~pid) << 3) | 2


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) the process has consumed, or None if it is gone."""
    try:
        return time.clock_gettime(_cpu_clock_id(pid))
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


def _runnable(pid: int) -> bool:
    """Whether the process is running or waiting for a CPU (not sleeping in a system call)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"R"
    except (OSError, IndexError):
        return False


def _maps_contain(pid: int, marker: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            return marker.encode() in f.read()
    except OSError:
        return True  # gone, or maps not readable: throttle from now on


# ------------------------------------------------------------------ the throttler thread


class Throttle(threading.Thread):
    """Duty-cycle one process so that its wall time ~= slowdown x its CPU time.

    The process runs in windows of QUANTUM (wall) and is stopped in between until it has
    earned, at the board's speed, the next window's CPU: work is paid for before it is done,
    so a short job (one frame) is answered as late as on the board, within one period
    (slowdown x QUANTUM, about 0.2 s for a Pico W here). CPU a window left unused while the
    process slept is forfeited (an idle MCU banks nothing); CPU it could not get because
    the machine was busy is kept, so the throttle corrects itself under load."""

    QUANTUM = 0.002  # CPU s (and wall s) of one run window
    MAX_STOP = 0.05  # longest single wait while stopped (re-reads the target)

    def __init__(self) -> None:
        super().__init__(name="throttle", daemon=True)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pid: int | None = None
        self._pidfd: int | None = None
        self._slowdown: float | None = None
        self._gen = 0
        self._from_birth = False
        self._marker: str | None = None
        self._quit = False
        self.stops = 0  # SIGSTOPs sent (for status and tests)

    def _signal(self, sig: int) -> None:
        # Under self._lock. A pidfd cannot hit a recycled pid.
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            elif self._pid is not None:
                os.kill(self._pid, sig)
        except (ProcessLookupError, OSError):
            pass

    def set_target(self, pid: int | None, slow: float | None, from_birth: bool = False,
                   marker: str | None = None) -> None:
        """Throttle `pid` by `slow` (None: run it at full speed). Continues the old target.
        `from_birth`: the CPU time the process used before this call is owed too (a new
        interpreter ran unthrottled for a few milliseconds before its pid was known).
        `marker`: throttle only from when a file whose path contains it is mapped into the
        process (the MicroPython runtime inside a CPython launcher: the launcher's own
        start-up is not the board's)."""
        with self._lock:
            self._signal(signal.SIGCONT)
            if pid != self._pid:
                if self._pidfd is not None:
                    os.close(self._pidfd)
                self._pidfd = None
                if pid is not None:
                    try:
                        self._pidfd = os.pidfd_open(pid)
                    except (AttributeError, OSError):
                        self._pidfd = None
                self._pid = pid
            self._slowdown = slow
            self._from_birth = from_birth
            self._marker = marker
            self._gen += 1
        self._wake.set()

    def close(self) -> None:
        self.set_target(None, None)
        with self._lock:
            self._quit = True
        self._wake.set()

    def _pause(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()

    def run(self) -> None:
        gen = -1
        credit = last_t = last_c = 0.0
        stopped = started = loaded = False
        while True:
            with self._lock:
                if self._quit:
                    return
                pid, slow, now_gen, birth, marker = (self._pid, self._slowdown, self._gen, self._from_birth,
                                                     self._marker)
            if now_gen != gen:  # a new target or speed (set_target has continued the process)
                gen, stopped, started, loaded = now_gen, False, False, marker is None
            if pid is None or not slow:
                self._pause(0.5)
                continue
            if not loaded:
                loaded = _maps_contain(pid, marker)
                if not loaded:
                    self._pause(0.002)
                    continue
            c = cpu_seconds(pid)
            if c is None:  # exited; the bridge will set the next interpreter
                self._pause(0.05)
                continue
            now = time.monotonic()
            if not started:  # what it ran so far is owed (from birth) or free (a speed switch)
                started, credit, last_t, last_c = True, 0.0, now, (0.0 if birth else c)
            credit += (now - last_t) / slow - (c - last_c)
            last_t, last_c = now, c
            with self._lock:
                if self._gen != gen:
                    continue
                if not stopped:  # the end of a run window
                    if credit > 0 and not _runnable(pid):
                        credit = 0.0  # it slept: the rest of the window is not banked
                    self._signal(signal.SIGSTOP)
                    self.stops += 1
                    stopped = True
                elif credit >= self.QUANTUM:  # the next window is paid for
                    self._signal(signal.SIGCONT)
                    stopped = False
            if stopped:
                self._pause(min((self.QUANTUM - credit) * slow, self.MAX_STOP))
            else:
                self._pause(self.QUANTUM)
