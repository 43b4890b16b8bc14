"""The firmware test harness itself: items per board, real heap limits, failures isolated."""
import sys
from pathlib import Path

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parents[1]


def test_harness_runs_in_micropython_under_board_heap(pytester):
    sys.path.insert(0, str(TESTS))
    pytester.makeconftest('pytest_plugins = ["mpy_plugin"]')
    pytester.makepyfile(fwtest_demo='''
import sys
import gc

def test_is_micropython():
    assert sys.implementation.name == "micropython"

def test_fails_alone():
    assert 1 == 2, "deliberate"

def test_heap_limit_enforced():
    # Within the board heap: fine. Past it: MemoryError, which only a real limit gives.
    gc.collect()
    free = gc.mem_free()
    try:
        bytearray(free + 4096)
    except MemoryError:
        return
    raise AssertionError("allocated past the heap limit")

def test_after_failure_still_runs():
    assert True
''')
    res = pytester.runpytest("-q", "-p", "no:cacheprovider")
    res.assert_outcomes(passed=6, failed=2)
    out = res.stdout.str()
    assert "deliberate" in out
    assert "fwtest_demo.py::test_fails_alone[esp32]" in out
    assert "heap 112640 bytes" in out


def test_crash_is_reported_per_item(pytester):
    sys.path.insert(0, str(TESTS))
    pytester.makeconftest('pytest_plugins = ["mpy_plugin"]')
    pytester.makepyfile(fwtest_crash='''
import sys

def test_ok():
    pass

def test_exits():
    sys.exit(3)

def test_never_reached():
    pass
''')
    res = pytester.runpytest("-q", "-p", "no:cacheprovider")
    res.assert_outcomes(passed=2, failed=4)
    assert "MicroPython process ended" in res.stdout.str()
