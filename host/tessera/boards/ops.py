"""Board operations: deploy, self-test, status. The one implementation behind the public
`tessera.api.boards.Board` (and so the `tessera board` command), the demo and the tests."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from tessera.boards import build
from tessera.boards.profile import BoardProfile
from tessera.boards.remote import Remote
from tessera.boards.virtual import VirtualBoard
from tessera.errors import TesseraError
from tessera.paths import firmware_dir

log = logging.getLogger("tessera.board")

Progress = Callable[[int, int, str, int], None]  # (index from 1, files, remote path, bytes)


@dataclass
class Target:
    """A board to talk to: its profile, its serial port, and whether it is virtual."""

    profile: BoardProfile
    port: str
    virtual: bool
    vboard: VirtualBoard | None = None  # the virtual board behind `port`, when known
    timeout: float = 120.0  # per mpremote call

    @property
    def remote(self) -> Remote:
        return Remote(self.port, self.timeout)

    def bridge_state(self) -> dict | None:
        return self.vboard.state() if self.vboard is not None else None


@dataclass(frozen=True)
class Deployed:
    """What a deploy put on the board."""

    build: build.BuildResult
    version: str  # tessera_fw.VERSION as the board reports it after the copy
    files: int  # copied, boot.py and main.py included
    arch: str | None  # mpy-cross arch; None = portable bytecode (virtual boards)


def log_progress(i: int, n: int, path: str, size: int) -> None:
    """The deploy progress of the `tessera board deploy` command: one log line per file."""
    log.info("  [%*d/%d] %-40s %6d B", len(str(n)), i, n, path, size)


def install(target: Target, with_main: bool = False, progress: Progress | None = None) -> Deployed:
    """Compile (for the board's arch; portable bytecode for a virtual board, since the unix
    port refuses another arch's native code), check the flash budget and copy to
    /lib/tessera_fw, replacing what was there. `progress` sees every file copied (default:
    log_progress). A virtual board's scpm.json UDP port must be its own first."""
    arch = None if target.virtual else target.profile.mpy_arch
    st = target.bridge_state()
    if st is not None:  # its scpm.json port must be its own (docs/boards.md, one board per port)
        target.vboard.check_udp_port(own_pid=st.get("interp_pid"))
    result = build.compile_firmware(arch)
    build.check_budget(target.profile, result)
    files = [(result.out_dir / rel, f"lib/{rel}") for rel, _ in result.files]
    if with_main:  # the boot application: boot.py (WLAN from wlan.json) and main.py
        files.append((firmware_dir() / "boot.py", "boot.py"))
        files.append((firmware_dir() / "main.py", "main.py"))
    log.info("deploying %d files (%d bytes of .mpy, %s) to %s", len(files), result.total,
             arch or "portable bytecode", target.port)
    # put_tree counts the copies through its callback only: it always gets one
    target.remote.put_tree(files, clean="lib/tessera_fw", progress=progress or log_progress)
    version = target.remote.exec("import tessera_fw; print(tessera_fw.VERSION)").strip()
    log.info("deployed tessera_fw %s to %s", version, target.profile.name)
    return Deployed(result, version, len(files), arch)


def deploy(target: Target, with_main: bool = False, progress: Progress | None = None) -> build.BuildResult:
    """install() for callers that want only the build (the demo, the tests)."""
    return install(target, with_main, progress).build


@dataclass
class SelftestResult:
    passed: bool
    lines: list[str]

    @property
    def summary(self) -> str:
        return next((ln for ln in reversed(self.lines) if ln.startswith("SELFTEST")), "no SELFTEST line")


def selftest(target: Target, on_line: Callable[[str], None] | None = None) -> SelftestResult:
    """Run every firmware self-test suite on the board; `on_line` sees each line as it comes."""
    lines: list[str] = []

    def line(s: str) -> None:
        lines.append(s)
        if on_line is not None:
            on_line(s)

    target.remote.exec("import tessera_fw.selftest as _t; _t.run()", on_line=line)
    summary = next((ln for ln in reversed(lines) if ln.startswith("SELFTEST")), None)
    if summary is None:
        raise TesseraError("self-test printed no summary:\n" + "\n".join(lines[-10:]))
    return SelftestResult(summary.startswith("SELFTEST PASS"), lines)


def board_status(target: Target) -> dict:
    """tessera_fw.selftest.status() as the board prints it."""
    st = target.remote.eval_json("import tessera_fw.selftest as _t; _t.status()")
    if not isinstance(st, dict):
        raise TesseraError(f"unexpected status {st!r}")
    return st


def status(target: Target) -> dict:
    """The board's status plus, for a virtual board, what its bridge knows (virtual_status)."""
    return {**board_status(target), **virtual_status(target.bridge_state())}


def virtual_status(st: dict | None) -> dict:
    """What the bridge of a virtual board knows that the board does not: its speed (and
    slow-down against this machine), the console bytes dropped because nobody read them,
    its boots and its UDP port."""
    if st is None:
        return {}
    out = {"speed": st.get("speed", "fast"), "console_dropped": st.get("console_dropped", 0),
           "boots": st.get("boots", 1), "udp_port": st.get("udp_port")}
    if st.get("slowdown"):
        out["slowdown"] = st["slowdown"]
    return out
