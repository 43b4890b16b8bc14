# Firmware self-test: known-answer checks of every subsystem, run on the board itself.
# Each suite module exposes CHECKS, a tuple of (name, function); a check raises on failure.
# Output: one line per check, then "SELFTEST PASS n/n ..." or "SELFTEST FAIL k/n ...".
# Each suite is imported on demand and unloaded after its checks, with every module it
# imported (issue 9 #9): the self-test at boot then leaves nothing behind, and its peak is
# the largest suite's, not the sum, so that boot + the SCPM device fit the ESP32's first
# 56 KB heap area (docs/scpm-firmware.md).
import gc
import sys
import time

SUITES = ("tessera_fw.crypto.selftest", "tessera_fw.scpm.selftest")


def _ticks_ms():
    try:
        return time.ticks_ms()
    except AttributeError:
        return int(time.time() * 1000)


def _ms_since(t):
    # through ticks_diff: a self-test across the tick counter's wrap (2^30 ms on a board)
    try:
        return time.ticks_diff(time.ticks_ms(), t)
    except AttributeError:
        return _ticks_ms() - t


def unload(before):
    """Forget every module imported since `before` (a set of sys.modules names), so that
    the heap they hold can be collected; a later import loads them again."""
    import tessera_fw

    for name in list(sys.modules):
        if name not in before:
            tessera_fw.release(name)
    gc.collect()


def run(suites=SUITES, out=print):
    gc.collect()
    base = gc.mem_alloc()
    free0 = low_free = gc.mem_free()
    passed = failed = 0
    t0 = _ticks_ms()
    for suite in suites:
        before = set(sys.modules)
        mod = __import__(suite, None, None, ("CHECKS",))
        checks = mod.CHECKS
        mod = None
        for name, fn in checks:
            gc.collect()
            start = _ticks_ms()
            try:
                fn()
                ok = True
                why = ""
            except Exception as e:  # report and keep going: every check gets its line
                ok = False
                why = "%s: %s" % (type(e).__name__, e)
            free = gc.mem_free()
            if free < low_free:
                low_free = free
            if ok:
                passed += 1
            else:
                failed += 1
            out("%s %s %dms%s" % ("ok  " if ok else "FAIL", name, _ms_since(start), (" " + why) if why else ""))
        checks = fn = None
        unload(before)
    gc.collect()
    total = passed + failed
    # peak_heap: most heap in use above the starting point, seen between checks (before
    # collection, so it includes each check's garbage); retained: still in use afterwards.
    out("SELFTEST %s %d/%d in %dms peak_heap=%d retained=%d min_free=%d platform=%s" % (
        "PASS" if not failed else "FAIL", passed, total, _ms_since(t0),
        free0 - low_free, gc.mem_alloc() - base, low_free, sys.platform))
    return failed == 0


VERDICT = "selftest.txt"


def boot(path=VERDICT):
    """The first life of a board's boot (main.py, issue 9 #9): run the self-test, write its
    summary line to `path` and soft-reset, so that the application starts in a fresh heap
    that never held the self-test (machine.soft_reset() restarts the VM; every object and
    every name interned since power-on is gone). Returns False without a reset when `path`
    cannot be written (a soft reset would then run the self-test again, forever)."""
    last = ["SELFTEST FAIL (no summary)"]

    def out(s):
        print(s)
        last[0] = s

    try:
        run(out=out)
    except Exception as e:  # noqa: BLE001 - a self-test that cannot run is a failed one
        out("SELFTEST FAIL %s: %s" % (type(e).__name__, e))
    try:
        with open(path, "w") as f:
            f.write(last[0])
    except OSError:
        return False
    import machine

    machine.soft_reset()  # raises SystemExit: the board's firmware restarts the VM
    return True


def status():
    """One JSON line describing the board (used by `tessera board status`)."""
    import json
    import os
    import tessera_fw

    gc.collect()
    try:
        files = sorted(os.listdir("lib/tessera_fw")) if "tessera_fw" in os.listdir("lib") else []
    except OSError:
        files = []
    print(json.dumps({
        "firmware": tessera_fw.VERSION,
        "platform": sys.platform,
        "micropython": ".".join(str(v) for v in sys.implementation.version[:3]),
        "mem_free": gc.mem_free(),
        "mem_alloc": gc.mem_alloc(),
        "lib": files,
    }))
