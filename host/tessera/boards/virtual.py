"""Virtual boards: a pseudo-terminal bridged to a MicroPython unix-port process.

The process runs with the board profile's heap (-X heapsize=) in its own filesystem
directory, with ./lib on its module path like /lib on a real board. A second pty is the
"USB serial port" that mpremote connects to; the bridge copies bytes between the two.
At start the interpreter runs boot.py and main.py from its filesystem like a board, then
waits in the REPL. When it exits (a soft reset ends a unix process; a test may kill it to
simulate a power cut) the bridge starts it again, as a board reboots, so `mpremote connect
<pty> resume ...` works exactly as on hardware.

Speed: "fast" runs the interpreter at this machine's speed (unit tests); "board" throttles it
so that the firmware's DH takes as long as on the real board (tessera.boards.throttle,
docs/boards.md). The console never blocks the board: output nobody reads is kept up to
CONSOLE_BUFFER bytes and then dropped (counted in the state as console_dropped).

One bridge per board directory (a lock the interpreter inherits), and a board refuses to
boot with a UDP port in its scpm.json that another virtual board or process holds.

Run the bridge with `python -m tessera.boards.virtual --board esp32 --dir DIR`; normally
`tessera board virtual start` or VirtualBoard.start() does that.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import termios
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tessera.boards import ports
from tessera.boards import profile as profiles
from tessera.boards import throttle
from tessera.boards.interp import micropython_path
from tessera.errors import TesseraError
from tessera.paths import var_dir

STATE_FILE = "state.json"
LOCK_FILE = "bridge.lock"  # held by the bridge and its interpreter while they run
START_LOCK = "start.lock"  # serialises starts of one board
HALTED_FILE = "halted.txt"  # why the bridge refused to boot the board
SPEED_FILE = "speed.req"  # the speed asked for at run time (with SIGUSR1 to the bridge)
SCPM_CONFIG = "scpm.json"
SCPM_DEFAULT_PORT = 24767
CONSOLE_BUFFER = 16 * 1024  # console output kept for a host that does not read, beyond the pty's own
CONSOLE_STALL_S = 0.25  # a host that read recently gets back-pressure this long before drops


def _alive(pid: int) -> bool:
    """A running process (a killed bridge nobody has reaped yet is a zombie: not running)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _lock_held(directory: Path) -> bool:
    """Whether a bridge (or an interpreter it started) holds the board directory."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextlib.contextmanager
def _locked(path: Path, timeout: float) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TesseraError(f"{path} is locked by another start of this board") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


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
            if not _alive(st["pid"]):
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not _lock_held(self.dir):  # a stale file whose pid was recycled
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

    def halted(self) -> str | None:
        """Why the bridge last refused to boot this board, if it did."""
        try:
            return (self.dir / HALTED_FILE).read_text().strip() or None
        except OSError:
            return None

    def udp_config(self) -> tuple[int, str] | None:
        """(port, bind address) from the board's scpm.json, or None without one."""
        try:
            cfg = json.loads((self.fs / SCPM_CONFIG).read_text())
            return int(cfg.get("port", SCPM_DEFAULT_PORT)), str(cfg.get("bind", "0.0.0.0"))
        except (OSError, ValueError, TypeError, AttributeError):
            return None

    def check_udp_port(self, own_pid: int | None = None) -> None:
        """Refuse (TesseraError) the UDP port of this board's scpm.json when another
        virtual board claims it or another process holds it. `own_pid`: this board's own
        running interpreter, which may hold it."""
        cfg = self.udp_config()
        if cfg is None:
            return
        port, bind = cfg
        where = f"give {self.name!r} another \"port\" in {self.fs / SCPM_CONFIG}"
        for vb, st in running_boards():
            if vb.name != self.name and st.get("udp_port") == port:
                raise TesseraError(f"UDP port {port} is already held by virtual board {vb.name!r} "
                                   f"({vb.board} on {st['pty']}, interpreter pid {st.get('interp_pid')}); {where}")
        if ports.port_free(port, bind):
            return
        others = [p for p in ports.holders(port) if p != own_pid]
        if own_pid is not None and not others and own_pid in ports.holders(port):
            return
        who = "; ".join(ports.describe(p) for p in others) or "a process this user cannot see"
        raise TesseraError(f"UDP port {port} on {bind} is already held by {who}; {where}")

    def start(self, timeout: float = 20.0, fresh: bool = False, speed: str | None = None) -> str:
        """Start the bridge in the background (idempotent); return the pty path. `speed`
        ("fast" or "board") also changes the speed of a board that already runs."""
        profiles.load(self.board)  # validate the name early
        if speed is not None and speed not in throttle.SPEEDS:
            raise TesseraError(f"unknown speed {speed!r}; choose one of {', '.join(throttle.SPEEDS)}")
        self.dir.mkdir(parents=True, exist_ok=True)
        with _locked(self.dir / START_LOCK, timeout):
            st = self.state()
            if st:
                if speed is not None and st.get("speed") != speed:
                    self.set_speed(speed)
                return st["pty"]
            for _ in range(40):  # an interpreter whose bridge just died is still exiting
                if not _lock_held(self.dir):
                    break
                time.sleep(0.05)
            else:
                raise TesseraError(f"virtual board {self.name!r}: {self.dir} is held by a process without a "
                                   "running bridge (an interpreter left over from a killed bridge?); "
                                   f"see {self.dir / 'bridge.log'}")
            if fresh and self.fs.exists():
                shutil.rmtree(self.fs)
            (self.dir / HALTED_FILE).unlink(missing_ok=True)
            self.check_udp_port()
            log = open(self.dir / "bridge.log", "ab")
            proc = subprocess.Popen(
                [sys.executable, "-m", "tessera.boards.virtual", "--board", self.board, "--dir", str(self.dir),
                 "--speed", speed or "fast"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                env={**os.environ, "TESSERA_VAR": str(var_dir())},
            )
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                st = self.state()
                if st:
                    return st["pty"]
                if proc.poll() is not None:
                    why = self.halted() or f"the bridge exited with {proc.returncode}"
                    raise TesseraError(f"virtual board {self.name!r} did not start: {why}; "
                                       f"see {self.dir / 'bridge.log'}")
                time.sleep(0.05)
        raise TesseraError(f"virtual board {self.name!r} did not start; see {self.dir / 'bridge.log'}")

    def set_speed(self, speed: str, timeout: float = 30.0) -> dict:
        """Switch a running board between "fast" and "board" speed; return its state."""
        if speed not in throttle.SPEEDS:
            raise TesseraError(f"unknown speed {speed!r}; choose one of {', '.join(throttle.SPEEDS)}")
        st = self.state()
        if not st:
            raise TesseraError(f"virtual board {self.name!r} is not running")
        (self.dir / SPEED_FILE).write_text(speed)
        os.kill(st["pid"], signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.state()
            if st is None:
                break
            if st.get("speed") == speed:
                return st
            time.sleep(0.05)
        raise TesseraError(f"virtual board {self.name!r} did not switch to {speed} speed; "
                           f"see {self.dir / 'bridge.log'}")

    def stop(self) -> bool:
        st = self.state()
        if not st:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(st["pid"], signal.SIGTERM)
        for _ in range(100):  # gone when the bridge and its interpreter let go of the directory
            if not _lock_held(self.dir):
                return True
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(st["pid"], signal.SIGKILL)  # its interpreter dies with it (PR_SET_PDEATHSIG)
        for _ in range(40):
            if not _lock_held(self.dir):
                break
            time.sleep(0.05)
        return True

    def power_cut(self, wait_udp_port: int | None = None, timeout: float = 15.0) -> None:
        """Kill the interpreter as a power cut would (no clean-up of any kind) and wait
        until the bridge has booted it again and, if given, the firmware has bound its
        UDP port on 127.0.0.1 again. A board-speed board boots at board speed: give it
        the time (its self-test alone runs the DH once)."""
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
            if now is None and self.halted():
                raise TesseraError(f"virtual board {self.name!r} refused to boot: {self.halted()}")
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
    return not ports.port_free(port, "127.0.0.1")


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
# scripts compiled from the file (execfile streams it through the lexer, as a board's
# pyexec_file does: the source text is never held on the heap); Ctrl-C or an exception in them drops to the REPL, where mpremote takes over.
# SystemExit in them (machine.soft_reset(), sys.exit()) soft-resets a board: the firmware
# restarts the VM with a fresh heap and runs boot.py and main.py again. Here the process
# ends with SOFT_RESET_EXIT and the runner (the bridge, tessera.boards.bootrun) starts a new
# interpreter in the same filesystem: a fresh heap and qstr pool, as on the board. The
# interpreter runs without -i: the script asks for the REPL (MICROPYINSPECT, read by the
# unix port after the script) unless it soft-resets.
SOFT_RESET_EXIT = 75  # defined by this project: "the firmware soft-reset the board"
BOOT_SCRIPT = """\
import os, sys
sys.path[0] = ''
_reset = False
for _f in ('boot.py', 'main.py'):
    try:
        os.stat(_f)
    except OSError:
        continue
    try:
        execfile(_f, {'__name__': '__main__'})
    except KeyboardInterrupt:
        print('%s interrupted' % _f)
        break
    except SystemExit:
        _reset = True
        break
    except Exception as _e:
        sys.print_exception(_e)
        break
if _reset:
    print('MPY: soft reboot')
    sys.exit(""" + str(SOFT_RESET_EXIT) + """)
os.putenv('MICROPYINSPECT', '1')
"""

try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None
_PR_SET_PDEATHSIG = 1


def _spawn(interp: str, heap: str, fs: Path, slave: int, boot: Path, lock_fd: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICROPY")}
    env["MICROPYPATH"] = ".frozen:./lib"

    def as_console() -> None:
        # New session with the pty as controlling terminal, so the Ctrl-C that mpremote
        # sends becomes SIGINT and interrupts a running main.py, as on a board.
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        # The board dies with its bridge: an interpreter left running without one would keep
        # its UDP port and its directory (docs/boards.md, "one board per port").
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return subprocess.Popen(
        [interp, "-X", f"heapsize={heap}", str(boot)], stdin=slave, stdout=slave, stderr=slave,
        cwd=fs, env=env, preexec_fn=as_console, pass_fds=(lock_fd,),
    )


def _console_mode(fd: int) -> None:
    """Raw (no \\n -> \\r\\n rewriting: mpremote expects the exact bytes) but with ISIG,
    so Ctrl-C raises SIGINT in the interpreter while it runs code."""
    tty.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[3] |= termios.ISIG
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def _is_script(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"#!"
    except OSError:
        return False


def _take_lock(directory: Path) -> int | None:
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    for _ in range(100):  # a status check holds a shared lock for microseconds
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            time.sleep(0.01)
    os.close(fd)
    return None


class Console:
    """The bytes between the interpreter's console and the "USB serial port", both ways,
    without ever blocking on either side. Output waits in a buffer bounded by
    CONSOLE_BUFFER beyond the pty's own; when a host that read recently stops reading it
    gets CONSOLE_STALL_S of back-pressure (as a connected USB host would), after that the
    oldest output is dropped and counted. Input for the interpreter is never dropped: past
    its bound the bridge stops reading the host, whose writes then wait."""

    IN_MAX = 4096

    def __init__(self, dev: int, usb: int) -> None:
        self.dev, self.usb = dev, usb
        os.set_blocking(dev, False)
        os.set_blocking(usb, False)
        self.to_usb = bytearray()
        self.to_dev = bytearray()
        self.dropped = 0
        self.last_drain = time.monotonic()

    def wants(self) -> tuple[list[int], list[int]]:
        rd = []
        if len(self.to_usb) < CONSOLE_BUFFER or time.monotonic() - self.last_drain > CONSOLE_STALL_S:
            rd.append(self.dev)
        if len(self.to_dev) < self.IN_MAX:
            rd.append(self.usb)
        wr = ([self.usb] if self.to_usb else []) + ([self.dev] if self.to_dev else [])
        return rd, wr

    @staticmethod
    def _read(fd: int) -> bytes:
        try:
            return os.read(fd, 4096)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError as e:  # EIO: the other side of a pty is closed for a moment
            if e.errno == errno.EIO:
                return b""
            raise

    @staticmethod
    def _write(fd: int, buf: bytearray) -> int:
        try:
            return os.write(fd, buf)
        except (BlockingIOError, InterruptedError):
            return 0

    def pump(self, readable: list[int]) -> None:
        if self.dev in readable:
            self.to_usb += self._read(self.dev)
        if self.usb in readable:
            self.to_dev += self._read(self.usb)
        if self.to_usb:
            n = self._write(self.usb, self.to_usb)
            if n:
                del self.to_usb[:n]
                self.last_drain = time.monotonic()
        if self.to_dev:
            n = self._write(self.dev, self.to_dev)
            if n:
                del self.to_dev[:n]
        excess = len(self.to_usb) - CONSOLE_BUFFER
        if excess > 0:  # nobody reads the port: keep the newest output
            del self.to_usb[:excess]
            self.dropped += excess


def serve(board: str, directory: Path, speed: str = "fast") -> int:
    prof = profiles.load(board)
    directory.mkdir(parents=True, exist_ok=True)
    lock_fd = _take_lock(directory)
    if lock_fd is None:
        print(f"virtual board in {directory} is already running (its lock is held)", flush=True)
        return 3
    vb = VirtualBoard(directory.name, board)
    fs = directory / "fs"
    (fs / "lib").mkdir(parents=True, exist_ok=True)
    interp = micropython_path()
    marker = "micropython_run" if _is_script(interp) else None
    dev_master, dev_slave = os.openpty()  # the board's side: the interpreter's console
    usb_master, usb_slave = os.openpty()  # the host's side: the "USB serial port"
    _console_mode(dev_slave)
    tty.setraw(usb_slave)
    boot = directory / "vboot.py"
    boot.write_text(BOOT_SCRIPT)
    port = os.ttyname(usb_slave)
    console = Console(dev_master, usb_master)
    thr = throttle.Throttle()
    thr.start()
    flags = {"stopping": False, "speed": False}

    def on_term(*_):
        flags["stopping"] = True

    def on_speed(*_):
        flags["speed"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGUSR1, on_speed)
    state: dict = {"pid": os.getpid(), "board": board, "pty": port, "heap_bytes": prof.heap_bytes, "fs": str(fs),
                   "speed": "fast", "slowdown": None, "console_dropped": 0, "boots": 0, "soft_resets": 0, "interp_pid": None,
                   "udp_port": None}
    slow: float | None = None

    def write_state() -> None:
        state["console_dropped"] = console.dropped
        state["throttle_stops"] = thr.stops
        tmp = directory / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, directory / STATE_FILE)

    def apply_speed(new: str) -> None:
        nonlocal slow
        if new == "board":
            cal = throttle.calibrate(prof.heap_bytes)
            slow = throttle.slowdown(prof, cal)
            state.update(slowdown=round(slow, 2), host_pow_ms=[round(cal.pow_g_s * 1e3, 2), round(cal.pow_y_s * 1e3, 2)],
                         board_pow_s=[prof.speed.pow_g_s, prof.speed.pow_y_s], clock_hz=prof.speed.clock_hz)
        else:
            slow = None
            state["slowdown"] = None
        state["speed"] = new
        thr.set_target(proc.pid if proc else None, slow)
        print(f"speed {new}" + (f": slow-down {slow:.1f}x against this machine" if slow else ""), flush=True)

    def boot_board(soft: bool = False) -> subprocess.Popen | None:
        """Boot the interpreter, unless the board's UDP port is taken (then halt). `soft`:
        the firmware soft-reset the board (SOFT_RESET_EXIT), counted apart from boots."""
        try:
            vb.check_udp_port()
        except TesseraError as exc:
            (directory / HALTED_FILE).write_text(str(exc) + "\n")
            print(f"refusing to boot: {exc}", flush=True)
            flags["stopping"] = True
            return None
        cfg = vb.udp_config()
        state["udp_port"], state["udp_bind"] = cfg if cfg else (None, None)
        # The REPL turns ISIG off while it waits for input and restores it on a clean exit
        # only: after a power cut (SIGKILL) in the REPL the console would stay without ISIG,
        # and mpremote's Ctrl-C could no longer stop main.py. A board's UART has no such
        # memory, so reset the console mode as a reboot does.
        _console_mode(dev_slave)
        p = _spawn(interp, prof.heapsize_arg, fs, dev_slave, boot, lock_fd)
        # Throttled from its first MicroPython instruction. The PyPI interpreter is a CPython
        # launcher that loads the runtime as an extension module: its start-up is not the
        # board's. A native binary is throttled from birth (what ran before this line is owed).
        thr.set_target(p.pid, slow, from_birth=marker is None, marker=marker)
        state["soft_resets" if soft else "boots"] += 1
        state["interp_pid"] = p.pid
        return p

    proc: subprocess.Popen | None = None
    try:
        if speed == "board":
            apply_speed("board")
        proc = boot_board()
        if proc is None:
            return 4
        write_state()
        print(f"virtual {board} on {port} (heap {prof.heap_bytes} bytes, fs {fs}, {state['speed']} speed)", flush=True)
        saved = (0, 0)
        last_save = time.monotonic()
        while not flags["stopping"]:
            rd, wr = console.wants()
            try:
                readable, _, _ = select.select(rd, wr, [], 0.2)
            except InterruptedError:
                readable = []
            console.pump(readable)
            if flags["speed"]:
                flags["speed"] = False
                try:
                    req = (directory / SPEED_FILE).read_text().strip()
                    apply_speed(req if req in throttle.SPEEDS else "fast")
                except (OSError, TesseraError) as exc:
                    print(f"speed change failed: {exc}", flush=True)
                write_state()
            if proc.poll() is not None and not flags["stopping"]:
                # The interpreter ended (soft reset, sys.exit, crash): reboot the "board".
                soft = proc.returncode == SOFT_RESET_EXIT
                print("the firmware soft-reset the board" if soft else
                      f"interpreter exited with {proc.returncode}; rebooting", flush=True)
                proc = boot_board(soft)
                if proc is None:
                    break
                write_state()
            now = time.monotonic()
            # drops are news (0.5 s), the stop count of a throttled board changes always (5 s)
            if (console.dropped != saved[0] and now - last_save > 0.5) or (
                    thr.stops != saved[1] and now - last_save > 5):
                write_state()
                saved, last_save = (console.dropped, thr.stops), now
    finally:
        thr.close()  # continues a stopped interpreter, so that it can take SIGTERM
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        (directory / STATE_FILE).unlink(missing_ok=True)
    return 0 if proc is not None else 4


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run one virtual board bridge in the foreground.")
    ap.add_argument("--board", required=True)
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--speed", choices=throttle.SPEEDS, default="fast")
    a = ap.parse_args(argv)
    return serve(a.board, a.dir, a.speed)


if __name__ == "__main__":
    raise SystemExit(main())
