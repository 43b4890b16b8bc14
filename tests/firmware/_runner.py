# Runs inside MicroPython (not CPython): executes the named test functions of one firmware
# test module and frames each result for tests/mpy_plugin.py.
#   micropython -X heapsize=N _runner.py ROOT TEST_FILE BOARD NAME...
import gc
import io
import sys

root, path, board = sys.argv[1], sys.argv[2], sys.argv[3]
names = sys.argv[4:]
sys.path.insert(0, root + "/tests/firmware")
sys.path.insert(0, root + "/firmware")
d = path.rsplit("/", 1)[0]
if d not in sys.path:
    sys.path.insert(0, d)

import mpytest

mpytest.ROOT = root
mpytest.BOARD = board
modname = path.rsplit("/", 1)[-1][:-3]
mod = __import__(modname)

for name in names:
    print("@@BEGIN " + name)
    gc.collect()
    free0 = gc.mem_free()
    ok = True
    try:
        getattr(mod, name)()
    except Exception as e:  # noqa: BLE001 - every failure is reported, then the next test runs
        ok = False
        buf = io.StringIO()
        sys.print_exception(e, buf)
        print(buf.getvalue())
    gc.collect()
    print('@@END {"ok": %s, "free_before": %d, "free_after": %d}' % ("true" if ok else "false", free0, gc.mem_free()))
