"""Boards, real (a serial port) or virtual (the MicroPython unix port behind a pty), through
one object: `Board`.

    board = Board.virtual("bench-1", "esp32").start()
    board.deploy(progress=lambda i, n, path, size: print(i, n, path))
    print(board.selftest().summary)
    board.set_speed("board")          # a virtual board as slow as the real MCU
    print(board.bridge())             # BridgeStatus(speed='board', slowdown=72.1, ...)

The work is done by tessera.boards.ops (internal), which the `tessera board` command reaches
through this class too, so a script and the command cannot drift apart.

Everything here is synchronous (a board is driven through mpremote, one command at a
time); call it from asyncio code with `asyncio.to_thread`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tessera.api.errors import BoardError
from tessera.errors import TesseraError

DeployProgress = Callable[[int, int, str, int], None]
"""Called once per file copied: (index from 1, number of files, remote path, size in bytes)."""

Speed = Literal["fast", "board"]
"""A virtual board's speed: "fast" runs the MicroPython unix port at this machine's speed;
"board" throttles it so that the firmware's DH takes as long as on the real board
(docs/boards.md, "Board speed")."""


@dataclass(frozen=True)
class DeployResult:
    """What `Board.deploy` put on the board."""

    firmware: str  # tessera_fw.VERSION as the board reports it after the copy
    files: int
    total_bytes: int  # of .mpy
    arch: str | None  # mpy-cross architecture; None = portable bytecode (virtual boards)


@dataclass(frozen=True)
class SelftestReport:
    """The firmware self-test (every suite in tessera_fw.selftest.SUITES) as run on a board."""

    passed: bool
    summary: str  # the "SELFTEST PASS 12/12 in 94ms peak_heap=..." line
    lines: list[str] = field(default_factory=list)  # everything the board printed


@dataclass(frozen=True)
class BridgeStatus:
    """What the bridge of a running virtual board knows that the board itself does not."""

    speed: Speed
    slowdown: float | None  # how many times slower than this machine at "board" speed; None when fast
    console_dropped: int  # console output dropped (bytes) because nobody read the port
    boots: int  # interpreter starts: 1 after start, +1 per reset or power cut
    udp_port: int | None  # the UDP port of its scpm.json at the last boot, None without one
    pty: str  # the "USB serial port" (the same as Board.port)
    fs: Path  # its filesystem on the host (the same as Board.files)

    @classmethod
    def _from_state(cls, st: dict[str, Any]) -> BridgeStatus:
        from tessera.boards.ops import virtual_status

        v = virtual_status(st)
        return cls(v["speed"], v.get("slowdown"), int(v["console_dropped"]), int(v["boots"]), v["udp_port"],
                   str(st["pty"]), Path(st["fs"]))


@dataclass(frozen=True)
class BoardStatus:
    """tessera_fw.selftest.status() as the board reports it (the firmware must be deployed),
    and for a virtual board its bridge's status."""

    firmware: str | None  # tessera_fw.VERSION
    micropython: str
    platform: str
    mem_free: int
    mem_alloc: int
    raw: dict[str, Any] = field(default_factory=dict)  # all of it, as `tessera board status --json` prints it
    bridge: BridgeStatus | None = None  # a virtual board's bridge; None for a real board


def _board_error(e: TesseraError) -> BoardError:
    return e if isinstance(e, BoardError) else BoardError(str(e))


class Board:
    """One board. Make it with `Board.serial(port, profile)` or `Board.virtual(name,
    profile)`; `profile` names a board profile in boards/ ("esp32", "rp2040").

    Every method raises BoardError when the board does not answer or a command fails."""

    def __init__(self, port: str | None, profile: str = "esp32", *, virtual_name: str | None = None,
                 timeout: float = 120.0) -> None:
        from tessera.boards import profile as profiles

        try:
            self.profile = profiles.load(profile)
        except TesseraError as e:
            raise BoardError(str(e)) from None
        self._port = port
        self._virtual_name = virtual_name
        self.timeout = timeout

    # ------------------------------------------------------------------ construction
    @classmethod
    def serial(cls, port: str, profile: str = "esp32", timeout: float = 120.0) -> Board:
        """A real board on a serial port (e.g. /dev/ttyUSB0)."""
        return cls(port, profile, timeout=timeout)

    @classmethod
    def virtual(cls, name: str, profile: str = "esp32", timeout: float = 120.0) -> Board:
        """A virtual board named `name` (its files live in $TESSERA_VAR/boards/<name>); it may
        be running already, else call `start()`."""
        return cls(None, profile, virtual_name=name, timeout=timeout)

    def __repr__(self) -> str:
        where = f"virtual {self._virtual_name!r}" if self.is_virtual else self._port
        return f"<Board {self.profile.name} {where}>"

    @property
    def is_virtual(self) -> bool:
        return self._virtual_name is not None

    @property
    def name(self) -> str:
        """The virtual board's name, or the serial port."""
        return self._virtual_name or str(self._port)

    @property
    def port(self) -> str:
        """The serial port (a pty for a virtual board, which must be running)."""
        if self._virtual_name is not None:
            try:
                return self._vb().port
            except TesseraError as e:
                raise _board_error(e) from None
        assert self._port is not None
        return self._port

    def _remote(self):
        return self._target().remote

    def _target(self):
        from tessera.boards.ops import Target

        vb = self._vb() if self.is_virtual else None
        return Target(self.profile, self.port, self.is_virtual, vb, self.timeout)

    def _vb(self):
        from tessera.boards.virtual import VirtualBoard

        if self._virtual_name is None:
            raise BoardError(f"{self.name} is a real board: start, stop and power cut are for virtual boards")
        return VirtualBoard(self._virtual_name, self.profile.name)

    # ------------------------------------------------------------------ virtual boards
    def start(self, fresh: bool = False, timeout: float = 20.0, speed: Speed | None = None) -> Board:
        """Start the virtual board (nothing happens when it runs already). `fresh` empties
        its filesystem first. `speed` ("fast", the default for a new board, or "board")
        also switches a board that runs already. Returns the board, so
        `Board.virtual(...).start()` chains. A board whose scpm.json names a UDP port that
        another board or process holds does not start (BoardError says who holds it)."""
        try:
            self._vb().start(timeout=timeout, fresh=fresh, speed=speed)
        except TesseraError as e:
            raise _board_error(e) from None
        return self

    def set_speed(self, speed: Speed, timeout: float = 30.0) -> BridgeStatus:
        """Switch a running virtual board between "fast" and "board" speed (switching to
        "board" calibrates this machine first, a few seconds once per bridge); return its
        bridge's status. Deploying at board speed is slow (docs/boards.md): deploy fast,
        then switch."""
        try:
            return BridgeStatus._from_state(self._vb().set_speed(speed, timeout))
        except TesseraError as e:
            raise _board_error(e) from None

    def bridge(self) -> BridgeStatus | None:
        """A running virtual board's bridge: speed, slow-down, console bytes dropped, boots,
        UDP port. It does not talk to the board (no firmware needed, main.py goes on).
        None for a real board; BoardError when the virtual board is not running."""
        if not self.is_virtual:
            return None
        vb = self._vb()
        st = vb.state()
        if st is None:
            raise BoardError(f"virtual board {self.name!r} is not running")
        return BridgeStatus._from_state(st)

    def stop(self) -> bool:
        """Stop the virtual board; False when it was not running."""
        return self._vb().stop()

    def is_running(self) -> bool:
        """Whether the virtual board is running (a real board: always True)."""
        return self._vb().is_running() if self.is_virtual else True

    def power_cut(self, wait_udp_port: int | None = None, timeout: float = 15.0) -> None:
        """Kill the virtual board's interpreter with no clean-up at all, as a power cut does;
        return when it has booted again (and, if given, its firmware holds UDP
        `wait_udp_port` on 127.0.0.1 again)."""
        try:
            self._vb().power_cut(wait_udp_port, timeout)
        except TesseraError as e:
            raise _board_error(e) from None

    @property
    def files(self):
        """The virtual board's filesystem root on the host (a pathlib.Path): write its
        configuration files (scpm.json, wlan.json) here, then `reset()`."""
        return self._vb().fs

    # ------------------------------------------------------------------ every board
    def connect(self) -> BoardStatus:
        """Check that the board answers and return its status."""
        return self.status()

    def deploy(self, with_main: bool = False, progress: DeployProgress | None = None) -> DeployResult:
        """Compile the firmware for the board (portable bytecode for a virtual board), check
        the profile's flash budget, and copy it to /lib/tessera_fw, replacing what was there.
        `with_main` also installs boot.py and main.py (the boot application: self-test, then
        the SCPM device when the board has an scpm.json). Without `progress` each file is
        logged (INFO, logger tessera.board) as `tessera board deploy` shows it. A virtual
        board whose scpm.json names a UDP port another board or process holds is refused."""
        from tessera.boards import ops

        try:
            d = ops.install(self._target(), with_main, progress)
        except TesseraError as e:
            raise _board_error(e) from None
        return DeployResult(d.version, d.files, d.build.total, d.arch)

    def selftest(self, on_line: Callable[[str], None] | None = None) -> SelftestReport:
        """Run the firmware self-test on the board; `on_line` sees each line as it comes."""
        from tessera.boards import ops

        try:
            res = ops.selftest(self._target(), on_line)
        except TesseraError as e:
            raise _board_error(e) from None
        return SelftestReport(res.passed, res.summary, res.lines)

    def status(self) -> BoardStatus:
        """Firmware version, MicroPython version, platform and heap use (this runs code on
        the board: it interrupts main.py); for a virtual board also its bridge's status."""
        from tessera.boards import ops

        t = self._target()
        try:
            st = ops.board_status(t)
        except TesseraError as e:
            raise _board_error(e) from None
        bst = t.bridge_state()
        return BoardStatus(st.get("firmware"), str(st.get("micropython", "")), str(st.get("platform", "")),
                           int(st.get("mem_free", 0)), int(st.get("mem_alloc", 0)),
                           {**st, **ops.virtual_status(bst)}, BridgeStatus._from_state(bst) if bst else None)

    def run(self, code: str, on_line: Callable[[str], None] | None = None) -> str:
        """Run MicroPython `code` on the board (interrupting whatever main.py was doing) and
        return what it printed. An exception on the board raises BoardError."""
        try:
            return self._remote().exec(code, on_line=on_line)
        except TesseraError as e:
            raise _board_error(e) from None

    def eval_json(self, code: str) -> Any:
        """Run `code`, which must print one JSON document as its last line; return it decoded."""
        try:
            return self._remote().eval_json(code)
        except TesseraError as e:
            raise _board_error(e) from None

    def reset(self, wait_udp_port: int | None = None, timeout: float = 15.0) -> None:
        """Reboot the board: boot.py and main.py run again. A virtual board's interpreter is
        restarted (on the unix port a soft reset ends the process); a real board gets
        mpremote's soft reset."""
        if self.is_virtual:
            self.power_cut(wait_udp_port, timeout)
            return
        try:
            self._remote().run("soft-reset")
        except TesseraError as e:
            raise _board_error(e) from None


def virtual_boards() -> list[Board]:
    """Every running virtual board (of $TESSERA_VAR), by name."""
    from tessera.boards.virtual import running_boards

    return [Board.virtual(vb.name, vb.board) for vb, _ in running_boards()]


def serial_ports() -> list[str]:
    """Serial ports that look like a USB board (those with a USB vendor id)."""
    from serial.tools import list_ports

    return sorted(p.device for p in list_ports.comports() if p.vid is not None)


__all__ = ["Board", "BoardStatus", "BridgeStatus", "DeployProgress", "DeployResult", "SelftestReport", "Speed",
           "serial_ports", "virtual_boards"]
