"""Board operations shared by the CLI, the demo and the tests: deploy, self-test, status."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from tessera.boards import build
from tessera.boards.profile import BoardProfile
from tessera.boards.remote import Remote
from tessera.boards.virtual import VirtualBoard
from tessera.errors import TesseraError
from tessera.paths import firmware_dir

log = logging.getLogger("tessera.board")


@dataclass
class Target:
    """A board to talk to: its profile, its serial port, and whether it is virtual."""

    profile: BoardProfile
    port: str
    virtual: bool
    vboard: VirtualBoard | None = None  # the virtual board behind `port`, when known

    @property
    def remote(self) -> Remote:
        return Remote(self.port)

    def bridge_state(self) -> dict | None:
        return self.vboard.state() if self.vboard is not None else None


def deploy(target: Target, with_main: bool = False) -> build.BuildResult:
    """Compile (for the board's arch; portable bytecode for a virtual board, since the unix
    port refuses another arch's native code) and copy to /lib/tessera_fw with progress."""
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

    def progress(i: int, n: int, path: str, size: int) -> None:
        log.info("  [%*d/%d] %-40s %6d B", len(str(n)), i, n, path, size)

    target.remote.put_tree(files, clean="lib/tessera_fw", progress=progress)
    version = target.remote.exec("import tessera_fw; print(tessera_fw.VERSION)").strip()
    log.info("deployed tessera_fw %s to %s", version, target.profile.name)
    return result


@dataclass
class SelftestResult:
    passed: bool
    lines: list[str]

    @property
    def summary(self) -> str:
        return next((ln for ln in reversed(self.lines) if ln.startswith("SELFTEST")), "no SELFTEST line")


def selftest(target: Target) -> SelftestResult:
    lines: list[str] = []
    target.remote.exec("import tessera_fw.selftest as _t; _t.run()", on_line=lines.append)
    summary = next((ln for ln in reversed(lines) if ln.startswith("SELFTEST")), None)
    if summary is None:
        raise TesseraError("self-test printed no summary:\n" + "\n".join(lines[-10:]))
    return SelftestResult(summary.startswith("SELFTEST PASS"), lines)


def status(target: Target) -> dict:
    st = target.remote.eval_json("import tessera_fw.selftest as _t; _t.status()")
    if not isinstance(st, dict):
        raise TesseraError(f"unexpected status {st!r}")
    return {**st, **virtual_status(target.bridge_state())}


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
