"""Boot the deployed firmware in a MicroPython unix-port process as a board boots it, without
a virtual board's pty and bridge: for heap measurements (bench/mpy/boot_heap.py) and the
test that the firmware boots and serves in the ESP32's first heap area (issue 9 #9).

The filesystem holds what `tessera board deploy --main` puts on a board (the firmware as
.mpy in lib/, boot.py, main.py) and an scpm.json. The interpreter runs the bridge's boot
script (tessera.boards.virtual.BOOT_SCRIPT: boot.py, then main.py) in `-X heapsize=N`; when
the firmware soft-resets (the process ends with SOFT_RESET_EXIT) a new interpreter starts
in the same filesystem, as the board's VM restarts with a fresh heap.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import IO

from tessera.boards.interp import micropython_path
from tessera.boards.virtual import BOOT_SCRIPT, SOFT_RESET_EXIT, udp_port_bound
from tessera.paths import firmware_dir

MAX_SOFT_RESETS = 4  # main.py soft-resets once per power-on; more is a boot loop


def prepare(fs: Path, lib: Path, scpm: dict, main_py: str | None = None) -> None:
    """A board filesystem in `fs`: the compiled firmware `lib` as lib/, the boot templates
    boot.py and main.py (or `main_py`'s text), scpm.json from `scpm`."""
    shutil.copytree(lib, fs / "lib")
    shutil.copy(firmware_dir() / "boot.py", fs / "boot.py")
    (fs / "main.py").write_text(main_py if main_py is not None else (firmware_dir() / "main.py").read_text())
    (fs / "scpm.json").write_text(json.dumps(scpm))
    (fs / ".vboot.py").write_text(BOOT_SCRIPT)


class BootRun:
    """One powered-on board: boot() starts it, serving() follows its soft resets until the
    device binds its UDP port, stop() cuts the power. The console is in `console_path`."""

    def __init__(self, fs: Path, heap: int, console_path: Path) -> None:
        self.fs, self.heap = fs, heap
        self.console_path = console_path
        self.proc: subprocess.Popen | None = None
        self.soft_resets = 0
        self._out: IO[str] | None = None

    def _spawn(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MICROPY")}
        env["MICROPYPATH"] = ".frozen:./lib"
        assert self._out is not None
        self.proc = subprocess.Popen(
            [micropython_path(), "-X", f"heapsize={self.heap}", ".vboot.py"], cwd=self.fs, env=env,
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT)

    def boot(self) -> None:
        self._out = open(self.console_path, "a")
        self._spawn()

    def serving(self, port: int, timeout: float = 30.0) -> bool:
        """Wait until the firmware holds UDP `port` on 127.0.0.1, restarting the interpreter
        after each soft reset. False if it ended otherwise or did not bind in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            rc = self.proc.poll()
            if rc == SOFT_RESET_EXIT and self.soft_resets < MAX_SOFT_RESETS:
                self.soft_resets += 1
                self._spawn()
                continue
            if rc is not None:
                return False
            if udp_port_bound(port):
                return True
            time.sleep(0.05)
        return False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> str:
        """Kill the interpreter; return the whole console."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
        if self._out is not None:
            self._out.close()
            self._out = None
        return self.console_path.read_text()

    def __enter__(self) -> BootRun:
        self.boot()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
