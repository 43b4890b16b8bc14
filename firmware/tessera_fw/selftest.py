# Firmware self-test: known-answer checks of every subsystem, run on the board itself.
# Each suite module exposes CHECKS, a tuple of (name, function); a check raises on failure.
# Output: one line per check, then "SELFTEST PASS n/n ..." or "SELFTEST FAIL k/n ...".
# Each suite is imported on demand and unloaded after its checks, with every module it
# imported (issue 9 #9); at boot (boot(), from main.py) each suite runs in its own
# interpreter life, ended by a soft reset, so that the peak is the largest suite's alone and
# the application starts in a heap the self-test never touched (docs/scpm-firmware.md).
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


def _run(suites, out):
    """Run the checks of `suites`, one line each; return [passed, failed, ms, peak_heap,
    retained, min_free] (peak_heap: most heap in use above the starting point, seen between
    checks before collection, so it includes each check's garbage; retained: still in use
    afterwards)."""
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
    return [passed, failed, _ms_since(t0), free0 - low_free, gc.mem_alloc() - base, low_free]


def _summary(st):
    passed, failed, ms, peak, retained, low_free = st
    return "SELFTEST %s %d/%d in %dms peak_heap=%d retained=%d min_free=%d platform=%s" % (
        "PASS" if not failed else "FAIL", passed, passed + failed, ms, peak, retained, low_free, sys.platform)


def run(suites=SUITES, out=print):
    st = _run(suites, out)
    out(_summary(st))
    return st[1] == 0


VERDICT = "selftest.txt"
PART = "selftest.part"


def boot(path=VERDICT, part=PART):
    """The self-test lives of a board's boot (main.py, issue 9 #9): one suite per
    interpreter life, each ended by a soft reset (machine.soft_reset() restarts the VM with
    a fresh heap; every object and every name interned since is gone), so that no suite
    runs in a heap another one left its names in, and the application starts in a heap
    that never held the self-test. `part` holds the figures of the suites done (one line
    each); after the last one the summary line goes to `path`, which main.py prints, removes
    and serves after. Returns False, without a reset, when a file cannot be written (a
    soft reset would then run the same suite again, forever)."""
    try:
        f = open(part)
        rows = [[int(v) for v in ln.split()] for ln in f.read().split("\n") if ln]
        f.close()
    except (OSError, ValueError):  # none yet (or torn by a power cut: test again)
        rows = []
    if len(rows) < len(SUITES):
        try:
            st = _run((SUITES[len(rows)],), print)
        except Exception as e:  # noqa: BLE001 - a suite that cannot run is a failed one
            print("FAIL %s %s: %s" % (SUITES[len(rows)], type(e).__name__, e))
            st = [0, 1, 0, 0, 0, 0]
        rows.append(st)
    try:
        if len(rows) < len(SUITES):
            with open(part, "w") as f:
                for r in rows:
                    f.write(" ".join(str(v) for v in r) + "\n")
        else:
            tot = [sum(r[i] for r in rows) for i in range(3)] + [max(r[i] for r in rows) for i in (3, 4)] + [
                min(r[5] for r in rows)]
            with open(path, "w") as f:
                f.write(_summary(tot) + " lives=%d" % len(rows))
            try:
                import os

                os.remove(part)
            except OSError:
                pass
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
