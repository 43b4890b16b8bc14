"""Pytest plugin: firmware tests run inside the real MicroPython interpreter.

Any `fwtest_*.py` under tests/ is a MicroPython test module: its top-level `test_*`
functions become pytest items, once per board profile (`test_x[esp32]`, `test_x[rp2040]`).
For each (file, board) the module runs once in `micropython -X heapsize=<board heap>`
through tests/firmware/_runner.py; every function passes or fails on its own, with its
MicroPython traceback in the report. Writing one is like writing a host test: plain
functions and `assert`, plus helpers from tests/firmware/mpytest.py.
"""
from __future__ import annotations

import ast
import json
import subprocess
from pathlib import Path

import pytest

from tessera.boards import profile
from tessera.boards.interp import micropython_path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
RUNNER = TESTS / "firmware" / "_runner.py"
TIMEOUT = 300


def pytest_collect_file(file_path: Path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("fwtest_"):
        return MpyFile.from_parent(parent, path=file_path)
    return None


class MpyFailure(Exception):
    pass


class MpyFile(pytest.File):
    def collect(self):
        tree = ast.parse(self.path.read_text(), filename=str(self.path))
        names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
        self._names = names
        self._results: dict[str, dict] = {}
        for prof in profile.load_all():
            for name in names:
                yield MpyItem.from_parent(self, name=f"{name}[{prof.name}]", func=name, board=prof)

    def results_for(self, board) -> dict:
        if board.name not in self._results:
            self._results[board.name] = self._run(board)
        return self._results[board.name]

    def _run(self, board) -> dict:
        argv = [micropython_path(), "-X", f"heapsize={board.heap_bytes}", str(RUNNER), str(ROOT),
                str(self.path), board.name, *self._names]
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=TIMEOUT, cwd=ROOT)
            out = proc.stdout.decode(errors="replace")
            crash = proc.returncode != 0
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode(errors="replace")
            crash = True
            proc = None
        results: dict[str, dict] = {}
        current = None
        buf: list[str] = []
        for line in out.splitlines():
            if line.startswith("@@BEGIN "):
                current, buf = line[8:].strip(), []
            elif line.startswith("@@END ") and current:
                status = json.loads(line[6:])
                status["output"] = "\n".join(buf)
                results[current] = status
                current = None
            else:
                buf.append(line)
        results["__process__"] = {
            "crash": crash,
            "rc": None if proc is None else proc.returncode,
            "tail": "\n".join(out.splitlines()[-30:]) + ("\n" + proc.stderr.decode(errors="replace") if proc else "\n(timed out)"),
        }
        return results


class MpyItem(pytest.Item):
    def __init__(self, *, func: str, board, **kw):
        super().__init__(**kw)
        self.func = func
        self.board = board
        self.add_marker(pytest.mark.firmware)

    def runtest(self):
        results = self.parent.results_for(self.board)
        r = results.get(self.func)
        if r is None:
            p = results["__process__"]
            raise MpyFailure(f"no result: the MicroPython process ended (rc={p['rc']}) before this test finished\n{p['tail']}")
        if not r["ok"]:
            raise MpyFailure(r["output"])

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, MpyFailure):
            return (f"MicroPython ({self.board.name}, heap {self.board.heap_bytes} bytes) "
                    f"{self.path.name}::{self.func} failed:\n{excinfo.value}")
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{self.path.name}::{self.name} [micropython heap={self.board.heap_bytes}]"


def pytest_configure(config):
    config.addinivalue_line("markers", "firmware: a test run inside the MicroPython interpreter")
