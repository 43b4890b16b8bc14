"""Virtual boards: a pseudo-terminal bridged to a MicroPython unix-port process.

The process runs with the board profile's heap (-X heapsize=) in its own filesystem
directory, with ./lib on its module path like /lib on a real board. A second pty is the
"USB serial port" that mpremote connects to; the bridge copies bytes between the two.
At start the interpreter runs boot.py and main.py from its filesystem like a board, then
waits in the REPL. When it exits (a soft reset ends a unix process; a test may kill it to
simulate a power cut) the bridge starts it again, as a board reboots, so `mpremote connect <pty> resume ...` works exactly as on hardware.

Run the bridge with `python -m tessera.boards.virtual --board esp32 --dir DIR`; normally
`tessera board virtual start` or VirtualBoard.start() does that.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import termios
import time
import tty
from dataclasses import dataclass
from pathlib import Path

from tessera.boards import profile as profiles
from tessera.boards.interp import micropython_path
from tessera.errors import TesseraError
from tessera.paths import var_dir

STATE_FILE = "state.json"


@dataclass
class VirtualBoard:
    name: str
    board: str

    @property
    def dir(self) -> Path:
        return var_dir() / "boards" / self.name

    @property
    def fs(self) -> Path:
        return self.dir / "fs"

    def state(self) -> dict | None:
        try:
            st = json.loads((self.dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None
        try:
            os.kill(st["pid"], 0)
        except (OSError, KeyError):
            return None
        return st

    @property
    def port(self) -> str:
        st = self.state()
        if not st:
            raise TesseraError(f"virtual board {self.name!r} is not running (tessera board virtual start {self.board})")
        return st["pty"]

    def is_running(self) -> bool:
        return self.state() is not None

    def start(self, timeout: float = 10.0, fresh: bool = False) -> str:
        """Start the bridge in the background (idempotent); return the pty path."""
        profiles.load(self.board)  # validate the name early
        if self.is_running():
            return self.port
        self.dir.mkdir(parents=True, exist_ok=True)
        if fresh and self.fs.exists():
            import shutil

            shutil.rmtree(self.fs)
        (self.dir / STATE_FILE).unlink(missing_ok=True)
        log = open(self.dir / "bridge.log", "ab")
        subprocess.Popen(
            [sys.executable, "-m", "tessera.boards.virtual", "--board", self.board, "--dir", str(self.dir)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            env={**os.environ, "TESSERA_VAR": str(var_dir())},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state():
                return self.port
            time.sleep(0.05)
        raise TesseraError(f"virtual board {self.name!r} did not start; see {self.dir / 'bridge.log'}")

    def stop(self) -> bool:
        st = self.state()
        if not st:
            return False
        os.kill(st["pid"], signal.SIGTERM)
        for _ in range(100):
            if not self.state():
                return True
            time.sleep(0.05)
        os.kill(st["pid"], signal.SIGKILL)
        return True

    def power_cut(self, wait_udp_port: int | None = None, timeout: float = 15.0) -> None:
        """Kill the interpreter as a power cut would (no clean-up of any kind) and wait
        until the bridge has booted it again and, if given, the firmware has bound its
        UDP port on 127.0.0.1 again."""
        st = self.state()
        if not st:
            raise TesseraError(f"virtual board {self.name!r} is not running")
        try:
            os.kill(st["interp_pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.state()
            if now and now.get("boots", 0) > st.get("boots", 0) and (
                    wait_udp_port is None or udp_port_bound(wait_udp_port)):
                return
            time.sleep(0.05)
        raise TesseraError(f"virtual board {self.name!r} did not come back after a power cut; "
                           f"see {self.dir / 'bridge.log'}")


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nothing holds right now (for a virtual board's firmware)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def udp_port_bound(port: int) -> bool:
    """Whether something (a virtual board's firmware) holds UDP `port` on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
        return False


def running_boards() -> list[tuple[VirtualBoard, dict]]:
    out = []
    root = var_dir() / "boards"
    for st_path in sorted(root.glob(f"*/{STATE_FILE}")):
        try:
            board = json.loads(st_path.read_text())["board"]
        except (OSError, ValueError, KeyError):
            continue
        vb = VirtualBoard(st_path.parent.name, board)
        st = vb.state()
        if st:
            out.append((vb, st))
    return out


# ---------------------------------------------------------------- the bridge process


# Boot sequence of a real board: run boot.py then main.py from the filesystem root, as
# scripts; Ctrl-C or an exception in them drops to the REPL (-i), where mpremote takes over.
BOOT_SCRIPT = """\
import os, sys
sys.path[0] = ''
for _f in ('boot.py', 'main.py'):
    try:
        os.stat(_f)
    except OSError:
        continue
    try:
        exec(open(_f).read(), {'__name__': '__main__'})
    except KeyboardInterrupt:
        print('%s interrupted' % _f)
        break
    except Exception as _e:
        sys.print_exception(_e)
        break
"""


def _spawn(interp: str, heap: str, fs: Path, slave: int, boot: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICROPY")}
    env["MICROPYPATH"] = ".frozen:./lib"

    def as_console() -> None:
        # New session with the pty as controlling terminal, so the Ctrl-C that mpremote
        # sends becomes SIGINT and interrupts a running main.py, as on a board.
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    return subprocess.Popen(
        [interp, "-X", f"heapsize={heap}", "-i", str(boot)], stdin=slave, stdout=slave, stderr=slave,
        cwd=fs, env=env, preexec_fn=as_console,
    )


def _console_mode(fd: int) -> None:
    """Raw (no \\n -> \\r\\n rewriting: mpremote expects the exact bytes) but with ISIG,
    so Ctrl-C raises SIGINT in the interpreter while it runs code."""
    tty.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[3] |= termios.ISIG
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def serve(board: str, directory: Path) -> int:
    prof = profiles.load(board)
    fs = directory / "fs"
    (fs / "lib").mkdir(parents=True, exist_ok=True)
    interp = micropython_path()
    dev_master, dev_slave = os.openpty()  # the board's side: the interpreter's console
    usb_master, usb_slave = os.openpty()  # the host's side: the "USB serial port"
    _console_mode(dev_slave)
    tty.setraw(usb_slave)
    boot = directory / "vboot.py"
    boot.write_text(BOOT_SCRIPT)
    port = os.ttyname(usb_slave)
    proc = _spawn(interp, prof.heapsize_arg, fs, dev_slave, boot)
    boots = 1
    stopping = False

    def on_term(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    state = {"pid": os.getpid(), "board": board, "pty": port, "heap_bytes": prof.heap_bytes, "fs": str(fs)}

    def write_state():
        tmp = directory / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps({**state, "boots": boots, "interp_pid": proc.pid}))
        os.replace(tmp, directory / STATE_FILE)

    write_state()
    print(f"virtual {board} on {port} (heap {prof.heap_bytes} bytes, fs {fs})", flush=True)
    try:
        while not stopping:
            try:
                ready, _, _ = select.select([dev_master, usb_master], [], [], 0.2)
            except InterruptedError:
                continue
            if dev_master in ready:
                data = os.read(dev_master, 4096)
                if data:
                    os.write(usb_master, data)
            if usb_master in ready:
                data = os.read(usb_master, 4096)
                if data:
                    os.write(dev_master, data)
            if proc.poll() is not None and not stopping:
                # The interpreter ended (soft reset, sys.exit, crash): reboot the "board".
                print(f"interpreter exited with {proc.returncode}; rebooting", flush=True)
                # The REPL turns ISIG off while it waits for input and restores it on a clean
                # exit only: after a power cut (SIGKILL) in the REPL the console would stay
                # without ISIG, and mpremote's Ctrl-C could no longer stop main.py. A board's
                # UART has no such memory, so reset the console mode as a reboot does.
                _console_mode(dev_slave)
                proc = _spawn(interp, prof.heapsize_arg, fs, dev_slave, boot)
                boots += 1
                write_state()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                proc.kill()
        (directory / STATE_FILE).unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run one virtual board bridge in the foreground.")
    ap.add_argument("--board", required=True)
    ap.add_argument("--dir", required=True, type=Path)
    a = ap.parse_args(argv)
    return serve(a.board, a.dir)


if __name__ == "__main__":
    raise SystemExit(main())
