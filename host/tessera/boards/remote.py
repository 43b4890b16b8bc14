"""Drive a board (real or virtual) through mpremote.

Every command uses `resume` so mpremote does not soft-reset the board first: on a unix-port
virtual board a soft reset ends the process, and on hardware it keeps the board's state.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import PurePosixPath
from pathlib import Path

from tessera.errors import TesseraError

log = logging.getLogger(__name__)


class Remote:
    def __init__(self, port: str, timeout: float = 120.0) -> None:
        self.port = port
        self.timeout = timeout

    def _argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "mpremote", "connect", self.port, "resume", *args]

    def run(self, *args: str, on_line: Callable[[str], None] | None = None) -> str:
        """Run one mpremote invocation; stream stdout lines to on_line; return stdout."""
        proc = subprocess.Popen(self._argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        # The deadline covers the whole call: a board that never answers leaves mpremote
        # (and the read below) blocked, so a timer kills it.
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            proc.kill()

        timer = threading.Timer(self.timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if on_line:
                    on_line(line.rstrip("\n"))
            proc.wait()
        finally:
            timer.cancel()
        if expired.is_set():
            raise TesseraError(f"mpremote on {self.port} timed out after {self.timeout:.0f}s (is the board "
                               "busy with Ctrl-C disabled, or not a MicroPython board?)")
        err = proc.stderr.read() if proc.stderr else ""
        if proc.returncode != 0:
            tail = (err or "".join(lines)).strip().splitlines()[-5:]
            raise TesseraError(f"mpremote on {self.port} failed: " + " | ".join(tail))
        return "".join(lines)

    def exec(self, code: str, on_line: Callable[[str], None] | None = None) -> str:
        return self.run("exec", code, on_line=on_line)

    def eval_json(self, code: str) -> object:
        """Run code that prints one JSON document as its last line."""
        out = self.exec(code).strip().splitlines()
        if not out:
            raise TesseraError("board printed nothing")
        try:
            return json.loads(out[-1])
        except ValueError:
            raise TesseraError(f"board answered {out[-1]!r}") from None

    def put_tree(self, files: list[tuple[Path, str]], clean: str | None = None,
                 progress: Callable[[int, int, str, int], None] | None = None) -> None:
        """Copy local files to remote paths in one mpremote session, creating directories;
        `clean` names a remote directory removed first so no stale module survives."""
        dirs = sorted({str(PurePosixPath(r).parent) for _, r in files if str(PurePosixPath(r).parent) not in ("", ".")})
        prep = [
            "import os",
            "def _rm(p):",
            "    try: m = os.stat(p)[0]",
            "    except OSError: return",
            "    if m & 0x4000:",
            "        for n in os.listdir(p): _rm(p + '/' + n)",
            "        os.rmdir(p)",
            "    else: os.remove(p)",
        ]
        if clean:
            prep.append(f"_rm({clean!r})")
        for d in dirs:
            parts = d.split("/")
            for i in range(1, len(parts) + 1):
                sub = "/".join(parts[:i])
                prep.append(f"try: os.mkdir({sub!r})\nexcept OSError: pass")
        args: list[str] = ["exec", "\n".join(prep)]
        for local, remote in files:
            args += ["+", "fs", "cp", str(local), ":" + remote]
        total = len(files)
        sizes = {remote: os.path.getsize(local) for local, remote in files}
        done = 0

        def on_line(line: str) -> None:
            nonlocal done
            if line.startswith("cp ") and progress:
                done += 1
                remote = line.rsplit(":", 1)[-1]
                progress(done, total, remote, sizes.get(remote, 0))

        self.run(*args, on_line=on_line)
        if done != total:
            raise TesseraError(f"copied {done} of {total} files to {self.port}")

    def repl(self) -> int:
        return subprocess.call(self._argv("repl"))
